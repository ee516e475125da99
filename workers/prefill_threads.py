"""More torch threads for a prefill that has the worker to itself, when that is faster (opt-in).

A CPU worker decodes on `--threads` threads (loom serve leaves a core to the
API and the broker, which stream tokens while a batch decodes). A prefill
that arrives when nothing is decoding has nothing to share those cores with,
so `loom worker --prefill-threads N` lets it use N: on an idle 2-core machine
a 37-token prompt of the 90M test model prefills in ~93 ms on 2 threads
against ~126 ms on 1. On a busy machine the same 2 threads can be many times
slower (~1.8 s against ~0.38 s, measured while tests ran: OpenMP threads wait
for a core at every operator), so the choice is measured, not assumed: each
thread count keeps a running mean of seconds per prompt token, the faster one
is used, and every EXPLORE_EVERY-th idle prefill runs on the other one to keep
both current.

Off by default (loom serve does not pass it): a different thread count sums
in a different order, so the same request's hidden states could differ in the
last bits from one run to the next (tests/test_streaming.py saw 1e-7), and a
greedy token on a near tie could differ too. With 1 thread for both, Loom's
time to first token is already within a few ms of the in-process baseline.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

import torch

log = logging.getLogger("loom.worker")

EXPLORE_EVERY = 8
MIN_TOKENS = 8  # shorter prompts time too coarsely to learn from
WEIGHT = 0.3  # of the newest measurement in the running mean


class PrefillThreads:
    def __init__(self) -> None:
        self.base = self.most = 0  # 0: not configured, prefill as any other step
        self._rate: dict[int, float] = {}  # threads -> mean seconds per prompt token
        self._count = 0

    def configure(self, base: int, most: int) -> None:
        self.base, self.most = base, max(base, most)
        if self.most > self.base:
            log.info("prefill on up to %d torch threads when nothing else is decoding (decode: %d); "
                     "the faster count is measured as it runs", self.most, self.base)

    def choose(self) -> int:
        if self.most <= self.base:
            return self.base
        self._count += 1
        untried = [n for n in (self.most, self.base) if n not in self._rate]
        if untried:
            return untried[0]
        best = min(self._rate, key=self._rate.__getitem__)
        if self._count % EXPLORE_EVERY == 0:
            return self.base if best == self.most else self.most
        return best

    def record(self, threads: int, tokens: int, seconds: float) -> None:
        if tokens < MIN_TOKENS or self.most <= self.base:
            return
        rate = seconds / tokens
        old = self._rate.get(threads)
        self._rate[threads] = rate if old is None else (1 - WEIGHT) * old + WEIGHT * rate

    @contextlib.contextmanager
    def around(self, idle: bool, tokens: int) -> Iterator[None]:
        """Run a prefill of `tokens` prompt tokens (`idle`: nothing else decodes on this worker)."""
        if not idle or self.most <= self.base:
            yield
            return
        threads = self.choose()
        torch.set_num_threads(threads)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.record(threads, tokens, time.perf_counter() - started)
            torch.set_num_threads(self.base)


# Torch's thread count belongs to the process: so does this.
PREFILL = PrefillThreads()
