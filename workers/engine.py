"""The worker's busy loop: commands in, model steps, frames out.

It runs on its own thread and never touches a socket: commands arrive on
`inbox` (a queue filled by the socket thread) and frames leave through
`outbox` (drained by the socket thread). Loading a model happens on a loader
thread so that running streams keep streaming while a new model loads.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loom import protocol as P
from workers.model_store import LoadedModel, ModelLoadError, load_model, resolve_source
from workers.outbox import Outbox
from workers.runner import ModelRunner, RequestError

log = logging.getLogger("loom.worker")


@dataclass
class _LoadDone:
    model: str
    loaded: LoadedModel | None
    error: ModelLoadError | None


@dataclass
class _Reset:
    """The broker forgot us (it restarted): everything in flight is stale."""


class Engine:
    def __init__(self, device: str, outbox: Outbox, model_dirs: list[Path], capacity: int,
                 trust_remote_code: bool = False):
        self.device = device
        self.outbox = outbox
        self.model_dirs = model_dirs
        self.capacity = capacity
        self.trust_remote_code = trust_remote_code
        self.inbox: "queue.Queue[Any]" = queue.Queue()
        self.runners: dict[str, ModelRunner] = {}  # by model id
        self._aliases: dict[str, str] = {}  # other names a model was loaded by (its path) -> model id
        self._loading: dict[str, list[str]] = {}  # model -> rids waiting for it
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        # Read by the socket thread for heartbeats; each is replaced whole,
        # never mutated, so a read needs no lock.
        self.active = 0
        self.model_infos: list[dict[str, Any]] = []

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(None)

    def reset(self) -> None:
        self.inbox.put(_Reset())

    def preload(self, model: str, dtype: str, allow_any_path: bool = True) -> None:
        """Load a model named by the operator (any local path allowed)."""
        self._start_load(P.Load(rid="", model=model, dtype=dtype), allow_any_path)

    # --- the loop ------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = any(r.active for r in self.runners.values())
            self._drain(block=not busy)
            for runner in list(self.runners.values()):
                if runner.active:
                    try:
                        runner.step()
                    except Exception as exc:  # a model bug must not kill the worker
                        log.exception("step failed for %s", runner.loaded.model_id)
                        runner.fail_all(P.ErrorType.INTERNAL, f"generation failed: {exc}")
            self.active = sum(r.active for r in self.runners.values())

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
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
        elif isinstance(item, P.Cancel):
            if any(runner.cancel(item.rid) for runner in self.runners.values()):
                log.info("cancelled %s", item.rid)
        elif isinstance(item, P.Load):
            self._start_load(item, allow_any_path=False)
        elif isinstance(item, P.Unload):
            self._unload(item)
        elif isinstance(item, _LoadDone):
            self._finish_load(item)
        elif isinstance(item, _Reset):
            for runner in self.runners.values():
                runner.fail_all(P.ErrorType.BROKER_LOST, "the broker restarted")

    def _send(self, msg: P.Message, buffers: list[Any] | None = None) -> None:
        self.outbox.put(msg, buffers or [])

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
        self.active += 1

    # --- loading ----------------------------------------------------------------

    def _start_load(self, req: P.Load, allow_any_path: bool) -> None:
        model = req.model
        runner = self._runner(model)
        if runner is not None:
            if req.rid:
                self._send(P.Loaded(rid=req.rid, info=runner.loaded.info()))
            return
        waiting = self._loading.get(model)
        if waiting is not None:
            waiting.append(req.rid)
            return
        self._loading[model] = [req.rid]
        threading.Thread(target=self._load, args=(req, allow_any_path), name=f"load-{model}", daemon=True).start()

    def _load(self, req: P.Load, allow_any_path: bool) -> None:
        log.info("loading %s (dtype %s) on %s", req.model, req.dtype, self.device)
        try:
            source = resolve_source(req.model, self.model_dirs, allow_any_path)
            loaded = load_model(_model_id(req.model, source, allow_any_path), source, req.dtype, self.device,
                                self.trust_remote_code)
            self.inbox.put(_LoadDone(req.model, loaded, None))
        except ModelLoadError as exc:
            self.inbox.put(_LoadDone(req.model, None, exc))
        except Exception as exc:  # anything else from transformers or torch
            log.exception("loading %s failed", req.model)
            self.inbox.put(_LoadDone(req.model, None, ModelLoadError(P.ErrorType.MODEL_LOAD_FAILED,
                                                                     f"could not load {req.model!r}: {exc}")))

    def _finish_load(self, done: _LoadDone) -> None:
        rids = self._loading.pop(done.model, [])
        if done.loaded is not None:
            lm = done.loaded
            self.runners[lm.model_id] = ModelRunner(lm, self._send)
            if lm.model_id != done.model:
                self._aliases[done.model] = lm.model_id
            log.info("loaded %s from %s on %s as %s in %.2fs (hidden %d, %d layers)", lm.model_id, lm.source,
                     self.device, lm.info()["dtype"], lm.load_time_s, lm.hidden_size, lm.num_layers)
            self._refresh_infos()
            for rid in rids:
                if rid:
                    self._send(P.Loaded(rid=rid, info=lm.info()))
        else:
            assert done.error is not None
            log.warning("could not load %s: %s", done.model, done.error)
            for rid in rids:
                if rid:
                    self._send(P.Error(rid=rid, type=done.error.error_type, message=str(done.error)))

    def _unload(self, req: P.Unload) -> None:
        runner = self._runner(req.model)
        if runner is None:
            self._send(P.Error(rid=req.rid, type=P.ErrorType.MODEL_NOT_LOADED, message=f"model {req.model!r} is not loaded"))
            return
        runner.fail_all(P.ErrorType.MODEL_NOT_LOADED, f"model {req.model!r} was unloaded")
        model_id = runner.loaded.model_id
        del self.runners[model_id]
        self._aliases = {k: v for k, v in self._aliases.items() if v != model_id}
        del runner
        _free_memory(self.device)
        log.info("unloaded %s from %s", req.model, self.device)
        self._refresh_infos()
        self._send(P.Unloaded(rid=req.rid, model=req.model))

    def _refresh_infos(self) -> None:
        self.model_infos = [runner.loaded.info() for runner in self.runners.values()]


def _model_id(requested: str, source: str, from_operator: bool) -> str:
    """Operator-given paths are known by their directory name (models/loom-tiny -> loom-tiny)."""
    if from_operator and Path(source).is_dir():
        return Path(source).name
    return requested


def _free_memory(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
