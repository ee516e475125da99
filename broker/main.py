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
from loom.heap import freeze_startup_heap

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
    poller.register(backend, zmq.POLLIN)  # workers' frames first when both are ready
    poller.register(frontend, zmq.POLLIN)
    freeze_startup_heap()
    next_beat = time.monotonic()
    handlers = {backend: broker.on_backend, frontend: broker.on_frontend}
    while not stopping:
        # Per message, the relay's cost is mostly fixed work around it (this
        # process wakes for nearly every step's message): so no zmq.Again
        # raised to end a drain (the EVENTS check is the same libzmq call,
        # without the exception).
        for sock, _ in poller.poll(max(0.0, next_beat - time.monotonic()) * 1000):
            handle = handlers[sock]
            for _ in range(1000):  # drain a burst, then let the other socket and the heartbeat in
                try:
                    handle(_recv(sock))
                except zmq.Again:
                    break
                except Exception:  # one bad message must not stop the broker
                    log.exception("error handling a message; dropped")
                if not sock.get(zmq.EVENTS) & zmq.POLLIN:
                    break
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


def _recv(sock: zmq.Socket) -> list:
    """A message from a ROUTER: the sender's identity and the header as bytes (each is
    copied into bytes anyway), array parts as zero-copy frames."""
    frames = [sock.recv(zmq.NOBLOCK), sock.recv(zmq.NOBLOCK)]  # a ROUTER message has both, whole or not at all
    while sock.get(zmq.RCVMORE):
        frames.append(sock.recv(zmq.NOBLOCK, copy=False))
    return frames


def _is_loopback(address: str) -> bool:
    return address.startswith(("ipc://", "inproc://")) or any(
        h in address for h in ("://127.", "://localhost", "://[::1]"))
