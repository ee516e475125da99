"""Where /analyze/* compute: processes beside the API's event loop.

A process pool rather than threads: reading a large body (orjson.loads, then
the list-to-array copy) holds the GIL for as long as it runs, which threads
would make /health wait for; processes also give a request's memory back
when it is done, and one killed for memory takes no one else with it (the
pool is replaced and that request gets a 500). A job gets the path of the
body, spooled to a file by the route: pickling a 160 MB body across to the
pool held the API's GIL for up to a third of a second.

Sized for the machine: half its cores, at most 4, since the API's own
torch workers and broker share them. Each analysis process runs BLAS on one
thread: on a machine where other processes are busy, OpenBLAS's threads
wait on one another at each small step of an SVD, and two threads ran
1,000 x 4,096 analyses 4 to 10 times slower than one.
"""
from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

import orjson
from pydantic import ValidationError

from api.analysis_schemas import AnalysisOptions
from loom.analysis import InputError, analyze_bilateral, analyze_geometry, check_same_dims, check_vectors

log = logging.getLogger("loom.api.analysis")

Job = Callable[[str], dict[str, Any]]


class BadRequest(Exception):
    """What was wrong with the body, as FastAPI validation errors (plain data, so it pickles)."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors)
        self.errors = errors


def _error(field: str | None, message: str, kind: str = "value_error") -> dict[str, Any]:
    return {"loc": ("body", field) if field else ("body",), "msg": message, "type": kind}


def _object(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        body = f.read()
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            # Python's json writes NaN and Infinity, which are not JSON; read
            # them so that the answer names the field that holds them.
            parsed = json.loads(body)
        except ValueError as exc:
            raise BadRequest([_error(None, f"the body is not valid JSON: {exc}", "json_invalid")]) from None
    if not isinstance(parsed, dict):
        raise BadRequest([_error(None, "the body must be a JSON object")])
    return parsed


def _read(path: str, vector_fields: tuple[str, ...]) -> tuple[int, list[Any]]:
    """(seed, [checked array per vector field]) from the body in file `path`; every problem found is
    reported at once."""
    fields = _object(path)
    errors: list[dict[str, Any]] = []
    seed = 0
    try:
        seed = AnalysisOptions.model_validate({k: v for k, v in fields.items() if k not in vector_fields}).seed or 0
    except ValidationError as exc:
        errors += [{"loc": ("body", *e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    arrays = []
    for name in vector_fields:
        if name not in fields:
            errors.append(_error(name, "Field required", "missing"))
            continue
        try:
            arrays.append(check_vectors(name, fields.pop(name)))
        except InputError as exc:
            errors.append(_error(exc.field, exc.message))
    if errors:
        raise BadRequest(errors)
    return seed, arrays


def geometry_job(path: str) -> dict[str, Any]:
    seed, (vectors,) = _read(path, ("vectors",))
    return analyze_geometry(vectors, seed).as_json()


def bilateral_job(path: str) -> dict[str, Any]:
    seed, (sender, receiver) = _read(path, ("sender_vectors", "receiver_vectors"))
    try:
        check_same_dims("sender_vectors", sender, "receiver_vectors", receiver)
    except InputError as exc:
        raise BadRequest([_error(exc.field, exc.message)]) from None
    return analyze_bilateral(sender, receiver, seed).as_json()


_blas_limits: Any = None


def _start_worker() -> None:
    global _blas_limits
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the API's to handle; it ends the pool
    from threadpoolctl import threadpool_limits

    _blas_limits = threadpool_limits(1)


def default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores // 2))


class AnalysisPool:
    """Runs jobs in worker processes, started on first use."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or default_workers()
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            # spawn, not fork: the API process runs threads (zmq, the executor's own).
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_start_worker)
        return self._executor

    async def run(self, job: Job, path: str) -> dict[str, Any]:
        executor = self._pool()
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, job, path)
        except BrokenProcessPool:
            log.error("an analysis process died (out of memory?); starting a new pool")
            if self._executor is executor:
                self._executor = None
                executor.shutdown(wait=False, cancel_futures=True)
            raise

    def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        # A running analysis may have minutes left; shutting down must not wait for it.
        processes = list(getattr(executor, "_processes", {}).values())
        executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
