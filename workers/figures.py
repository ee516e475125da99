"""A worker's load figures for the broker's table and /metrics."""
from __future__ import annotations

from typing import Any, Iterable


def worker_figures(runners: Iterable[Any]) -> dict[str, int]:
    """Rows decoding now, requests waiting for their prefill, bytes held by KV caches."""
    running = waiting = kv_bytes = 0
    for runner in runners:
        running += len(runner.rows)
        waiting += len(runner.pending)
        kv_bytes += runner.kv.nbytes
    return {"running": running, "waiting": waiting, "kv_cache_bytes": kv_bytes}
