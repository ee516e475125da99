"""The worker's busy loop: commands in, model steps, frames out.

It runs on its own thread and never waits on a socket: commands arrive on
`inbox` (a queue filled by the socket thread); request frames leave on the
engine's own socket (workers/data_socket.py: a send that never blocks), and
model lists through `outbox` (drained by the socket thread, in order with its
heartbeats). Loading a model happens on a loader thread so that running
streams keep streaming while a new model loads.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loom import protocol as P
from loom.heap import collect_all, freeze_heap
from loom.model_names import aliases_for, model_id_for
from workers.allocator import IdleRelease
from workers.data_socket import DataSocket
from workers.figures import worker_figures
from workers.model_store import LoadedModel, ModelLoadError, load_model, resolve_source
from workers.outbox import Outbox
from workers.patching import PatchJobs
from workers.request_log import RequestLog
from workers.runner import ModelRunner, RequestError
from workers.step_batch import StepBatch

log = logging.getLogger("loom.worker")


@dataclass
class _LoadDone:
    source: str
    loaded: LoadedModel | None
    error: ModelLoadError | None


@dataclass
class _Loading:
    """A load under way: the id it will have, every name it answers to, who waits for it."""

    model_id: str
    names: list[str]
    rids: list[str] = field(default_factory=list)


@dataclass
class _Preload:
    """A model the operator named at start: any local path is allowed."""

    load: P.Load


@dataclass
class _Reset:
    """The broker forgot us (it restarted): everything in flight is stale."""


class Engine:
    def __init__(self, device: str, outbox: Outbox, data: DataSocket, model_dirs: list[Path], capacity: int,
                 trust_remote_code: bool = False, release_when_idle: bool = False):
        self.device = device
        # Request frames go out on the engine's own socket; model lists (Loaded,
        # Unloaded) through the socket thread's, in order with its heartbeats.
        self.outbox = outbox
        self.data = data
        self.model_dirs = model_dirs
        self.capacity = capacity
        self.trust_remote_code = trust_remote_code
        # A SimpleQueue (C, no Condition in Python): a request reaches the idle engine ~15 us sooner.
        self.inbox: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self.runners: dict[str, ModelRunner] = {}  # by model id
        self._aliases: dict[str, str] = {}  # every name a model answers to -> model id
        self._loading: dict[str, _Loading] = {}  # by source
        self.requests = RequestLog()
        self.batch = StepBatch(self._out)  # a step's tokens: one message per API process
        self.patches = PatchJobs(self._send)  # POST /patch jobs, one forward pass per loop
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        # Read by the socket thread for heartbeats; each is replaced whole,
        # never mutated, so a read needs no lock.
        self.active = 0
        self.model_infos: list[dict[str, Any]] = []
        self.figures: dict[str, int] = worker_figures(())
        self._figures_at = 0.0
        self._idle_release = IdleRelease(release_when_idle)  # memory kept while busy goes back when idle

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(None)

    def reset(self) -> None:
        self.inbox.put(_Reset())

    def preload(self, model: str, dtype: str) -> None:
        """Load a model named by the operator (any local path allowed)."""
        self.inbox.put(_Preload(P.Load(rid="", model=model, dtype=dtype)))

    # --- the loop ------------------------------------------------------------

    def _run(self) -> None:
        # Nothing on this thread needs autograd; entered once instead of around every step.
        try:
            with torch.inference_mode():
                self._loop()
        finally:
            self.data.close()  # only this thread touches it

    def _out(self, msg: P.Message, buffers: list[Any]) -> None:
        if type(msg) in (P.Loaded, P.Unloaded):
            self.outbox.put(msg, buffers)
        else:
            self.data.put(msg, buffers)

    def _loop(self) -> None:
        while not self._stop.is_set():
            busy = any(r.active for r in self.runners.values())
            direct = self.data.direct
            if direct.pending:  # an API process's socket was full: write the rest before waiting long
                direct.flush()
            self._drain(block=not busy and not self.patches, timeout=0.01 if direct.pending else 0.5)
            for runner in list(self.runners.values()):
                if runner.active:
                    try:
                        runner.step()
                    except Exception as exc:  # a model bug must not kill the worker
                        log.exception("step failed for %s", runner.loaded.model_id)
                        runner.fail_all(P.ErrorType.INTERNAL, f"generation failed: {exc}")
            if self.patches:  # between decode steps, so running streams wait at most one chunk
                self.patches.step(shared=any(r.active for r in self.runners.values()))
            self.batch.flush()
            for rid in direct.take_lost():  # nobody reads these any more
                self._cancel(rid)
            self.active = sum(r.active for r in self.runners.values()) + len(self.patches)
            now = time.monotonic()
            if now - self._figures_at > 0.2 or not self.active:  # an emptied batch shows at once
                self.figures, self._figures_at = worker_figures(self.runners.values()), now
            self._idle_release.tick(bool(self.active or direct.pending), now)

    def _drain(self, block: bool, timeout: float) -> None:
        try:
            item = self.inbox.get(timeout=timeout) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is not None:
                self._handle_safely(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _handle_safely(self, item: Any) -> None:
        # The engine thread is the worker: no single request may end it.
        try:
            with self.requests.context(item):
                self._handle(item)
        except Exception as exc:
            log.exception("could not handle a %s message", getattr(item, "kind", type(item).__name__))
            rid = getattr(item, "rid", None)
            if rid:
                self._send(P.Error(rid=rid, type=P.ErrorType.INTERNAL, message=f"the worker failed on this request: {exc}"))

    def _runner(self, name: str) -> ModelRunner | None:
        return self.runners.get(self._aliases.get(name, name))

    def _handle(self, item: Any) -> None:
        if isinstance(item, P.Generate):
            self._generate(item)
        elif isinstance(item, P.Patch):
            self._patch(item)
        elif isinstance(item, P.Cancel):
            self._cancel(item.rid)
            self.data.direct.forget(item.rid)
        elif isinstance(item, P.Load):
            self._start_load(item, allow_any_path=False)
        elif isinstance(item, _Preload):
            self._start_load(item.load, allow_any_path=True)
        elif isinstance(item, P.Unload):
            self._unload(item)
        elif isinstance(item, _LoadDone):
            self._finish_load(item)
        elif isinstance(item, _Reset):
            for runner in self.runners.values():
                runner.fail_all(P.ErrorType.BROKER_LOST, "the broker restarted")
            self.patches.fail(P.ErrorType.BROKER_LOST, "the broker restarted")

    def _cancel(self, rid: str) -> None:
        if any(runner.cancel(rid) for runner in self.runners.values()) or self.patches.cancel(rid):
            self.requests.cancelled(rid)
        self.batch.forget(rid)

    def _send(self, msg: P.Message, buffers: list[Any] | None = None) -> None:
        self.requests.emitted(msg)
        self.batch.put(msg, buffers or [])

    def _generate(self, req: P.Generate) -> None:
        runner = self._runner(req.model)
        if runner is None:
            self._send(P.Error(rid=req.rid, type=P.ErrorType.MODEL_NOT_LOADED,
                               message=f"model {req.model!r} is not loaded on this worker"))
            return
        if self.active >= self.capacity:
            self._send(P.Error(rid=req.rid, type=P.ErrorType.OVERLOADED,
                               message="this worker is at capacity", retry_after=1.0))
            return
        try:
            runner.admit(req)
        except RequestError as exc:
            self._send(P.Error(rid=req.rid, type=exc.error_type, message=str(exc)))
            return
        self.requests.admitted(req)
        self.batch.route(req.rid, self.data.route(req.rid, req.api, req.reply_to))
        self.active += 1

    def _patch(self, req: P.Patch) -> None:
        runner = self._runner(req.model)
        if runner is None:
            self._send(P.Error(rid=req.rid, type=P.ErrorType.MODEL_NOT_LOADED,
                               message=f"model {req.model!r} is not loaded on this worker"))
            return
        try:
            self.patches.add(runner.loaded, req)  # checks everything before any work
        except RequestError as exc:
            self._send(P.Error(rid=req.rid, type=exc.error_type, message=str(exc)))
            return
        self.requests.admitted(req)
        self.active += 1

    # --- loading ----------------------------------------------------------------

    def _start_load(self, req: P.Load, allow_any_path: bool) -> None:
        runner = self._runner(req.model)
        pending = next((p for p in self._loading.values() if req.model in p.names), None)
        if runner is None and pending is None:
            try:
                source = resolve_source(req.model, self.model_dirs, allow_any_path)
            except ModelLoadError as exc:
                self._refuse(req, exc)
                return
            # The same directory under another spelling is the same model.
            runner = next((r for r in self.runners.values() if r.loaded.source == source), None)
            pending = self._loading.get(source)
            if runner is None and pending is None:
                taken = {**req.reserved, **{p.model_id: src for src, p in self._loading.items()},
                         **{r.loaded.model_id: r.loaded.source for r in self.runners.values()}}
                model_id = model_id_for(source, req.model, taken)
                pending = self._loading[source] = _Loading(model_id, aliases_for(req.model, source, model_id))
                threading.Thread(target=self._load, args=(req, source), name=f"load-{model_id}", daemon=True).start()
        if runner is not None:
            self._add_alias(runner, req.model)
            if req.rid:
                self._send(P.Loaded(rid=req.rid, info=runner.loaded.info()))
            return
        assert pending is not None
        if req.model not in pending.names:
            pending.names.append(req.model)
        pending.rids.append(req.rid)

    def _refuse(self, req: P.Load, exc: ModelLoadError) -> None:
        log.warning("could not load %s: %s", req.model, exc)
        if req.rid:
            self._send(P.Error(rid=req.rid, type=exc.error_type, message=str(exc)))

    def _add_alias(self, runner: ModelRunner, name: str) -> None:
        lm = runner.loaded
        if name not in lm.aliases:
            lm.aliases.append(name)
            self._aliases[name] = lm.model_id
            self._refresh_infos()

    def _load(self, req: P.Load, source: str) -> None:
        log.info("loading %s (dtype %s) on %s", req.model, req.dtype, self.device)
        try:
            done = _LoadDone(source, load_model(req.model, source, req.dtype, self.device, self.trust_remote_code), None)
        except ModelLoadError as exc:
            done = _LoadDone(source, None, exc)
        except Exception as exc:  # anything else from transformers or torch
            log.exception("loading %s failed", req.model)
            done = _LoadDone(source, None, ModelLoadError(P.ErrorType.MODEL_LOAD_FAILED,
                                                          f"could not load {req.model!r}: {exc}"))
        self.inbox.put(done)

    def _finish_load(self, done: _LoadDone) -> None:
        pending = self._loading.pop(done.source)
        rids = [rid for rid in pending.rids if rid]
        if done.loaded is None:
            assert done.error is not None
            log.warning("could not load %s: %s", pending.names[0], done.error)
            for rid in rids:
                self._send(P.Error(rid=rid, type=done.error.error_type, message=str(done.error)))
            return
        lm = done.loaded
        lm.model_id, lm.aliases = pending.model_id, pending.names
        self.runners[lm.model_id] = ModelRunner(lm, self._send, self.batch.flush, self.batch.put_texts)
        freeze_heap()
        self._aliases.update((name, lm.model_id) for name in lm.aliases)
        log.info("loaded %s from %s on %s as %s in %.2fs (hidden %d, %d layers; text by %s; also known as %s)",
                 lm.model_id, lm.source, self.device, lm.info()["dtype"], lm.load_time_s, lm.hidden_size,
                 lm.num_layers, "byte table" if lm.byte_table is not None else "decoding windows",
                 ", ".join(lm.aliases[1:]) or "nothing else")
        self._refresh_infos()
        for rid in rids:
            self._send(P.Loaded(rid=rid, info=lm.info()))

    def _unload(self, req: P.Unload) -> None:
        runner = self._runner(req.model)
        if runner is None:
            self._send(P.Error(rid=req.rid, type=P.ErrorType.MODEL_NOT_LOADED, message=f"model {req.model!r} is not loaded"))
            return
        runner.fail_all(P.ErrorType.MODEL_NOT_LOADED, f"model {req.model!r} was unloaded")
        model_id = runner.loaded.model_id
        self.patches.fail(P.ErrorType.MODEL_NOT_LOADED, f"model {req.model!r} was unloaded", model_id)
        del self.runners[model_id]
        self._aliases = {k: v for k, v in self._aliases.items() if v != model_id}
        del runner
        _free_memory(self.device)
        log.info("unloaded %s from %s", req.model, self.device)
        self._refresh_infos()
        self._send(P.Unloaded(rid=req.rid, model=req.model))

    def _refresh_infos(self) -> None:
        self.model_infos = [runner.loaded.info() for runner in self.runners.values()]


def _free_memory(device: str) -> None:
    collect_all()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
