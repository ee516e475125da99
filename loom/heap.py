"""Keeping the cycle collector off what a process keeps for its whole life.

A Loom process holds a large heap made once (imported modules, FastAPI's
routes and pydantic's validators, a loaded model's modules and tensors) and
makes short-lived objects per token. Every full collection walked all of it
again, holding the GIL: ~200 ms in a worker with the 90M model loaded (every
stream stalls for it) and 58-127 ms in the API process, where it also came
back while relaying. Frozen objects sit in a generation the collector never
scans; reference counting still frees them.
"""
from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """At the end of startup: collect once, then leave whatever survived out of later collections."""
    gc.collect()
    gc.freeze()


def freeze_heap() -> None:
    """Leave everything alive now (a model just loaded) out of later collections, without a pass first."""
    gc.freeze()


def collect_all() -> None:
    """A full collection that includes the frozen objects (a model just unloaded may be in a cycle), then refreeze."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
