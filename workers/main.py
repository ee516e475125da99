"""`loom worker`: one process per device, serving models over the broker.

The main thread owns the ZeroMQ socket: it forwards commands to the engine
thread, sends the engine's frames the moment they are produced, and
heartbeats the broker. It never waits on the model.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import zmq

from loom import protocol as P
from loom.config import DEFAULT_BACKEND, add_common_arguments, env, setup_logging
from loom.curve import add_curve_client_arguments
from loom.heap import freeze_startup_heap
from workers.data_socket import DataSocket, broker_dealer, send_now

log = logging.getLogger("loom.worker")

# How long a stopping worker waits for the engine thread to finish its step.
ENGINE_STOP_WAIT_S = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", default=env("LOOM_BROKER_BACKEND", DEFAULT_BACKEND),
                        help="the broker's worker address (env LOOM_BROKER_BACKEND; default %(default)s)")
    parser.add_argument("--device", default=env("LOOM_DEVICE", "cpu"),
                        help="torch device for this worker: cpu, cuda:0, ... (default %(default)s)")
    parser.add_argument("--model", action="append", default=[],
                        help="model to load at start: hub id or local directory (repeatable)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                        help="dtype for --model (default auto: bf16/fp16 on GPU, fp32 on CPU)")
    parser.add_argument("--model-dir", action="append", default=None, type=Path,
                        help="directory whose subdirectories can be loaded by name over HTTP "
                             "(repeatable; env LOOM_MODEL_DIRS, colon-separated; the bundled models/ is always included)")
    parser.add_argument("--capacity", type=int, default=int(env("LOOM_WORKER_CAPACITY", "64") or 64),
                        help="most requests this worker runs at once (env LOOM_WORKER_CAPACITY; default %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--prefill-threads", type=int, default=None,
                        help="CPU threads a prefill may use while nothing else decodes, if measured faster "
                             "(default: --threads, i.e. no more)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow models that ship their own Python code (off by default: it runs arbitrary code)")
    add_curve_client_arguments(parser)
    add_common_arguments(parser)


def model_dirs(args: argparse.Namespace) -> list[Path]:
    from workers.model_store import BUNDLED_MODEL_DIR

    dirs = list(args.model_dir or [])
    dirs += [Path(p) for p in (env("LOOM_MODEL_DIRS", "") or "").split(os.pathsep) if p]
    dirs.append(BUNDLED_MODEL_DIR)
    return dirs


def run(args: argparse.Namespace) -> int:
    setup_logging(f"worker:{args.device}", args.log_level, args.log_format)
    from workers.allocator import keep_freed_memory

    keeps_freed = keep_freed_memory()  # before torch allocates anything
    import torch

    from workers.engine import Engine
    from workers.outbox import Outbox

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prefill_threads and not args.device.startswith("cuda"):
        from workers.prefill_threads import PREFILL

        PREFILL.configure(torch.get_num_threads(), args.prefill_threads)
    # The socket thread must get the GIL soon after a request arrives; the
    # default 5 ms switch interval would add up to 5 ms to its hand-over.
    sys.setswitchinterval(0.0005)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log.error("device %s asked for, but torch sees no CUDA device; use --device cpu", args.device)
        return 2
    worker_id = f"{socket.gethostname()}/{args.device}/{os.getpid()}/{uuid.uuid4().hex[:6]}"
    freeze_startup_heap()  # torch and transformers, imported: before the engine thread makes anything
    outbox = Outbox()
    ctx = zmq.Context()
    engine = Engine(args.device, outbox, DataSocket(ctx, worker_id, args), model_dirs(args), args.capacity,
                    args.trust_remote_code, release_when_idle=keeps_freed)
    engine.start()
    for model in args.model:
        engine.preload(model, args.dtype)
    log.info("worker %s on %s (torch %s, %d threads), broker %s; the engine thread sends request frames itself",
             worker_id, args.device, torch.__version__, torch.get_num_threads(), args.broker)
    return SocketLoop(worker_id, args, engine, outbox, ctx).run()


class SocketLoop:
    def __init__(self, worker_id: str, args: argparse.Namespace, engine, outbox, ctx: zmq.Context) -> None:
        self.worker_id = worker_id
        self.args = args
        self.engine = engine
        self.outbox = outbox
        self.ctx = ctx
        self.sock = broker_dealer(ctx, worker_id.encode(), args)
        self.stopping = False
        self.last_heard = time.monotonic()

    def _send(self, msg: P.Message) -> None:
        try:
            self.sock.send_multipart(P.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            pass  # broker unreachable; heartbeats will re-register us

    def _send_frames(self, batch: list[list[Any]]) -> None:
        for frames in batch:
            if not send_now(self.sock, frames):
                log.warning("broker not accepting frames; dropped one")

    def _register(self) -> None:
        self._send(P.Register(worker_id=self.worker_id, device=self.args.device, host=socket.gethostname(),
                              pid=os.getpid(), capacity=self.args.capacity, models=self.engine.model_infos,
                              active=self.engine.active))

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "stopping", True))
        poller = zmq.Poller()
        poller.register(self.outbox.fileno, zmq.POLLIN)  # the engine's frames first when both are ready
        poller.register(self.sock, zmq.POLLIN)
        self._register()
        next_beat = time.monotonic() + P.HEARTBEAT_INTERVAL_S
        known_models: list = []
        sock, outbox = self.sock, self.outbox
        while not self.stopping:
            timeout = max(0.0, next_beat - time.monotonic())
            # This thread wakes for every step's tokens: the least work per wake-up.
            for ready, _ in poller.poll(timeout * 1000):
                if ready is sock:
                    self._receive()
                    continue
                self._send_frames(outbox.drain())
            now = time.monotonic()
            if now >= next_beat:
                late = outbox.overdue()
                if late:
                    log.warning("%d frame(s) waited a heartbeat with no wake-up from the engine thread; sent now "
                                "(a lost wake-up in workers/outbox.py: please report it)", len(late))
                    self._send_frames(late)
            if now >= next_beat or self.engine.model_infos is not known_models:
                # A changed model list is announced at once, not at the next beat.
                known_models = self.engine.model_infos
                self._send(P.Heartbeat(sender=self.worker_id, active=self.engine.active,
                                       models=self.engine.model_infos, **self.engine.figures))
                next_beat = now + P.HEARTBEAT_INTERVAL_S
        log.info("worker %s stopping", self.worker_id)
        self.engine.stop()
        self.sock.close(0)
        # The engine thread closes its own socket when its step ends; a context
        # with a socket open would wait for it, so one stuck in a long forward is left to exit.
        self.engine.thread.join(ENGINE_STOP_WAIT_S)
        if not self.engine.thread.is_alive():
            self.ctx.term()
        return 0

    def _receive(self) -> None:
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg, _ = P.decode(frames)
            except P.ProtocolError as exc:
                log.warning("dropped a malformed message from the broker: %s", exc)
                continue
            self.last_heard = time.monotonic()
            if isinstance(msg, (P.Generate, P.Patch, P.Cancel, P.Load, P.Unload)):
                self.engine.inbox.put(msg)
            elif isinstance(msg, P.Reregister):
                log.warning("broker %s does not know this worker (restarted?): dropping in-flight work, registering",
                            msg.broker_id)
                self.engine.reset()
                self._register()
            elif isinstance(msg, P.Heartbeat):
                pass
            else:
                log.warning("unexpected %s message from the broker; dropped", msg.kind)
