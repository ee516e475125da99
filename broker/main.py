"""`loom broker`: the process between API processes and workers."""
from __future__ import annotations

import argparse
import logging
import signal
import time
from pathlib import Path

import zmq

from broker.broker import Broker
from loom import protocol as P
from loom.config import DEFAULT_BACKEND, DEFAULT_FRONTEND, add_common_arguments, env, setup_logging

log = logging.getLogger("loom.broker")

# Frames queued per peer before sends to it fail fast instead of piling up.
PEER_HWM = 10_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frontend", default=env("LOOM_BROKER_FRONTEND", DEFAULT_FRONTEND),
                        help="address to bind for API processes (env LOOM_BROKER_FRONTEND; default %(default)s)")
    parser.add_argument("--backend", default=env("LOOM_BROKER_BACKEND", DEFAULT_BACKEND),
                        help="address to bind for workers (env LOOM_BROKER_BACKEND; default %(default)s). "
                             "Bind tcp://0.0.0.0:PORT to let workers on other hosts join, with --curve-keys.")
    parser.add_argument("--curve-keys", type=Path, default=env("LOOM_CURVE_KEYS"),
                        help="key directory from `loom keys`: encrypt both sockets and admit only authorized keys")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    setup_logging("broker", args.log_level, args.log_format)
    ctx = zmq.Context()
    auth = None
    sockets = []
    for address in (args.frontend, args.backend):
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, PEER_HWM)
        sock.setsockopt(zmq.RCVHWM, PEER_HWM)
        if args.curve_keys:
            from loom.curve import apply_curve_server, start_curve_server

            auth = auth or start_curve_server(ctx, Path(args.curve_keys))
            apply_curve_server(sock, Path(args.curve_keys))
        elif not _is_loopback(address):
            log.warning("binding %s without --curve-keys: traffic is unencrypted and anyone who can reach it "
                        "can join; make keys with `loom keys DIR`", address)
        sock.bind(address)
        sockets.append(sock)
    frontend, backend = sockets
    broker = Broker(frontend, backend)
    log.info("broker %s: API processes on %s, workers on %s%s", broker.broker_id, args.frontend, args.backend,
             ", CURVE on" if args.curve_keys else "")

    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    poller = zmq.Poller()
    poller.register(frontend, zmq.POLLIN)
    poller.register(backend, zmq.POLLIN)
    next_beat = time.monotonic()
    while not stopping:
        events = dict(poller.poll(max(0.0, next_beat - time.monotonic()) * 1000))
        # Drain bursts without going back to poll for every message.
        for sock, handle in ((backend, broker.on_backend), (frontend, broker.on_frontend)):
            if sock in events:
                for _ in range(1000):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        handle(frames)
                    except Exception:  # one bad message must not stop the broker
                        log.exception("error handling a message; dropped")
        if time.monotonic() >= next_beat:
            broker.heartbeat()
            next_beat = time.monotonic() + P.HEARTBEAT_INTERVAL_S
    log.info("broker stopping")
    if auth is not None:
        auth.stop()
    for sock in sockets:
        sock.close(0)
    ctx.term()
    return 0


def _is_loopback(address: str) -> bool:
    return address.startswith(("ipc://", "inproc://")) or any(
        h in address for h in ("://127.", "://localhost", "://[::1]"))
