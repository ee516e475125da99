"""Timestamps along a request's path in every Loom process, for bench/ttft_path.py (bench use only).

bench/ttft_path.py starts `loom serve` with this directory on PYTHONPATH and
LOOM_TTFT_TRACE naming an output directory; Python imports this module at
start in each process (API, broker, worker), and it wraps a few functions of
the modules below as they are imported, so each writes `stage key time` lines
(time.time(), the clock every process and the bench client share) to
<dir>/<role>-<pid>.tsv. Nothing in Loom's own code changes, and without
LOOM_TTFT_TRACE this module does nothing. A wrap whose target has gone (the
code was refactored) is noted in the file as `missing`, not an error.

Each line costs one small os.write (a few microseconds): fine for single
requests spaced apart, not for throughput runs.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
import time

_DIR = os.environ.get("LOOM_TTFT_TRACE")
_fd = -1
_last = {"front_in": 0.0, "back_in": 0.0, "api_decode": 0.0}  # entry times of the current handler
_seen: set = set()


def mark(stage: str, key: str, t: float | None = None) -> None:
    global _fd
    if _fd < 0:
        role = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
        if "-m" in sys.orig_argv and "loom" in sys.orig_argv:
            i = sys.orig_argv.index("loom")
            role = sys.orig_argv[i + 1] if i + 1 < len(sys.orig_argv) else "loom"
        _fd = os.open(os.path.join(_DIR, f"{role}-{os.getpid()}.tsv"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_fd, f"{stage}\t{key}\t{time.time() if t is None else t:.6f}\n".encode())


def _first(stage: str, key: str, t: float | None = None) -> None:
    """Mark only the first time `stage` happens for `key` (a request's later tokens are not the path)."""
    if (stage, key) not in _seen:
        _seen.add((stage, key))
        mark(stage, key, t)


def _wrap(module, owner_name: str | None, attr: str, make):
    owner = getattr(module, owner_name, None) if owner_name else module
    original = getattr(owner, attr, None) if owner is not None else None
    if original is None:
        mark("missing", f"{module.__name__}.{owner_name + '.' if owner_name else ''}{attr}")
        return
    setattr(owner, attr, functools.wraps(original)(make(original)))


# --- the API process ----------------------------------------------------------------------

def _patch_request_ids(m) -> None:
    def make(original):
        async def http(self, scope, receive, send):
            given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode("latin-1")
            mark("api.asgi_in", given)
            first_body = [True]

            async def traced_send(message):
                await send(message)
                if message["type"] == "http.response.start":
                    mark("api.response_start", given)
                elif first_body[0] and message.get("body"):
                    first_body[0] = False
                    mark("api.first_body_written", given)

            inner = scope.get("loom.send")  # a stream may write its body on the server's own send (api/asgi.py)
            if inner is not None:
                async def traced_inner(message):
                    await inner(message)
                    if first_body[0] and message.get("body"):
                        first_body[0] = False
                        mark("api.first_body_written", given)
                scope["loom.send"] = traced_inner
            await original(self, scope, receive, traced_send)
        return http
    _wrap(m, "RequestIdMiddleware", "http", make)


def _patch_relay(m) -> None:
    from loom.logs import current_request_id

    def make(original):
        async def run(request, *args, **kwargs):
            mark("api.relay_run", current_request_id())
            return await original(request, *args, **kwargs)
        return run
    _wrap(m, None, "run", make)


def _patch_broker_client(m) -> None:
    from loom import protocol as P

    def make_send(original):
        def _send(self, msg):
            if type(msg) is P.Generate:
                mark("api.generate_sent", msg.rid)  # before: the next hop includes its encode and send
            original(self, msg)
            if type(msg) is P.Generate:
                mark("rid", f"{msg.rid}={msg.request_id}")
        return _send
    _wrap(m, "BrokerClient", "_send", make_send)

    def make_put(original):
        def put(self, frame):
            msg = frame[0]
            if type(msg) is P.Token:
                _first("api.frames_decoded", msg.rid, _last["api_decode"])
                _first("api.mailbox_put", msg.rid)
            original(self, frame)
        return put
    _wrap(m, "Mailbox", "put", make_put)

    def make_take(original):
        async def take(self):
            frames = await original(self)
            msg = frames[0][0] if frames else None
            if type(msg) is P.Token:
                _first("api.handler_took", msg.rid)
            return frames
        return take
    _wrap(m, "Mailbox", "take", make_take)

    # The reader decodes each message the moment recv returns: its entry time is the arrival.
    def make_decode(original):
        def decode(frames, *args, **kwargs):
            _last["api_decode"] = time.time()
            return original(frames, *args, **kwargs)
        return decode
    _wrap(m.P, None, "decode", make_decode)


# --- the broker -----------------------------------------------------------------------------

def _patch_broker(m) -> None:
    from loom import protocol as P

    def entry(slot):
        def make(original):
            def handler(self, frames, *args, **kwargs):
                _last[slot] = time.time()
                return original(self, frames, *args, **kwargs)
            return handler
        return make
    _wrap(m, "Broker", "on_frontend", entry("front_in"))
    _wrap(m, "Broker", "on_backend", entry("back_in"))

    def make_to_worker(original):
        def _to_worker(self, identity, msg):
            if type(msg) is P.Generate:
                mark("broker.frontend_in", msg.rid, _last["front_in"])
                mark("broker.to_worker", msg.rid)
            return original(self, identity, msg)
        return _to_worker
    _wrap(m, "Broker", "_to_worker", make_to_worker)

    def make_relay(original):
        def _relay_tokens(self, identity, worker, msg, *args, **kwargs):
            now = time.time()
            for rid in msg.rids:
                _first("broker.backend_in", rid, _last["back_in"])
                _first("broker.to_api", rid, now)
            return original(self, identity, worker, msg, *args, **kwargs)
        return _relay_tokens
    _wrap(m, "Broker", "_relay_tokens", make_relay)


# --- the worker -----------------------------------------------------------------------------

_prefilling: list = []  # rids of the prefill under way (engine thread only)
_cpu = [0.0]  # the worker's process_time() when that prefill started


class _TracedInbox:
    """The engine's queue, stamping each Generate as the socket thread puts it."""

    def __init__(self, inner, generate) -> None:
        self._inner, self._generate = inner, generate
        self.get, self.get_nowait = inner.get, inner.get_nowait

    def put(self, item, *args, **kwargs):
        if type(item) is self._generate:
            mark("worker.inbox_put", item.rid)
        self._inner.put(item, *args, **kwargs)


def _patch_engine(m) -> None:
    from loom import protocol as P

    def make_init(original):
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            self.inbox = _TracedInbox(self.inbox, P.Generate)
        return __init__
    _wrap(m, "Engine", "__init__", make_init)

    def make_generate(original):
        def _generate(self, req):
            mark("worker.engine_got", req.rid)
            original(self, req)
            mark("worker.admitted", req.rid)
        return _generate
    _wrap(m, "Engine", "_generate", make_generate)


def _patch_runner(m) -> None:
    def make_admit(original):
        def admit(self, req):
            original(self, req)
            mark("worker.sequence_built", req.rid)
        return admit
    _wrap(m, "ModelRunner", "admit", make_admit)

    def make_prefill(original):
        def _prefill(self, seqs):
            rids = [s.rid for s in seqs]
            for rid in rids:
                mark("worker.prefill_start", rid)
            _prefilling[:] = rids
            _cpu[0] = time.process_time()
            try:
                return original(self, seqs)
            finally:
                _prefilling.clear()
                for rid in rids:
                    mark("worker.prefill_done", rid)
        return _prefill
    _wrap(m, "ModelRunner", "_prefill", make_prefill)

    def make_forward(original):
        def _forward(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            if _prefilling:
                cpu = time.process_time() - _cpu[0]
                for rid in _prefilling:
                    mark("worker.forward_done", rid)
                    mark("cpu.prefill", rid, cpu)  # the worker's CPU seconds from the prefill's start to here
            return out
        return _forward
    _wrap(m, "ModelRunner", "_forward", make_forward)

    def make_choose(original):
        def choose_tokens(*args, **kwargs):
            out = original(*args, **kwargs)
            for rid in _prefilling:
                mark("worker.sampled", rid)
            return out
        return choose_tokens
    _wrap(m, None, "choose_tokens", make_choose)


def _patch_step_batch(m) -> None:
    def make_flush(original):
        def flush(self):
            now = time.time()
            for group in self._groups.values():
                for rid in group.rids:
                    _first("worker.flush", rid, now)
            return original(self)
        return flush
    _wrap(m, "StepBatch", "flush", make_flush)


def _patch_data_socket(m) -> None:
    """The engine thread sends a step's Tokens itself (workers/data_socket.py): stamped before and after."""
    from loom import protocol as P

    def make_put(original):
        def put(self, msg, buffers):
            rids = list(msg.rids) if type(msg) is P.Tokens else []
            for rid in rids:
                _first("worker.outbox_put", rid)
            original(self, msg, buffers)
            now = time.time()
            for rid in rids:
                _first("worker.socket_took", rid, now)
        return put
    _wrap(m, "DataSocket", "put", make_put)


PATCHES = {
    "api.request_ids": _patch_request_ids,
    "api.relay": _patch_relay,
    "api.broker_client": _patch_broker_client,
    "broker.broker": _patch_broker,
    "workers.engine": _patch_engine,
    "workers.runner": _patch_runner,
    "workers.step_batch": _patch_step_batch,
    "workers.data_socket": _patch_data_socket,
}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of a module in PATCHES so the patch runs once it is loaded."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return None

            def exec_module(self, module):
                exec_module(module)
                PATCHES[name](module)

        spec.loader = Loader()
        return spec


if _DIR:
    sys.meta_path.insert(0, _AfterImport())
