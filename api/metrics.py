"""GET /metrics: Prometheus figures for the whole server, written by prometheus_client.

Two kinds of figures:
- counted in the API process: HTTP requests by endpoint, method and status;
  their duration; tokens generated; time to first token and inter-token
  latency (from the frames this process relays). With several API processes
  set PROMETHEUS_MULTIPROC_DIR (an empty directory, wiped before each start)
  and the library's multiprocess mode sums them across processes.
- reported by the workers in their heartbeats and read from the broker at
  scrape time: which workers are up, their batch size, waiting requests,
  KV-cache bytes and loaded models; and the server's running and waiting
  requests.
"""
from __future__ import annotations

import bisect
import os
import time
from typing import Any, Iterable

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from api.asgi import HttpMiddleware
from api.broker_client import BrokerError
from loom import protocol as P

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

# This process's own figures (in multiprocess mode their values live in files).
REGISTRY = CollectorRegistry()

HTTP_REQUESTS = Counter("loom_http_requests", "HTTP requests answered, by endpoint, method and status code",
                        ["endpoint", "method", "status"], registry=REGISTRY)
REQUEST_SECONDS = Histogram("loom_request_duration_seconds",
                            "Time from an HTTP request's arrival to the last byte of its answer (streams included)",
                            ["endpoint"], registry=REGISTRY,
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
TOKENS = Counter("loom_generated_tokens", "Tokens generated, by model id", ["model"], registry=REGISTRY)
TTFT = Histogram("loom_time_to_first_token_seconds",
                 "Time from sending a generation to the broker to its first token arriving", registry=REGISTRY,
                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
INTER_TOKEN = Histogram("loom_inter_token_latency_seconds", "Time between a stream's consecutive tokens",
                        registry=REGISTRY,
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

GONE_WORKERS_KEPT_S = 300.0  # a lost worker shows `up 0` this long, then leaves the scrape

router = APIRouter()


class MetricsMiddleware(HttpMiddleware):
    """Counts and times every HTTP request (pure ASGI, so streams are timed to their last byte)."""

    async def http(self, scope: dict, receive: Any, send: Any) -> None:
        started = time.perf_counter()
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            # The route's template, never the raw path: one series per endpoint, whatever clients send.
            endpoint = getattr(route, "path", None) or "unmatched"
            HTTP_REQUESTS.labels(endpoint, scope["method"], str(status)).inc()
            REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - started)


class GenerationMetrics:
    """Token timings and counts, from the frames the broker client hands to request handlers.

    Inter-token gaps are held here and put into the histogram many at a time
    (one write per bucket, not two per token: in multiprocess mode each write
    takes a lock and touches a file); a request's are all in before its
    answer ends, so a scrape after a request sees all of them.
    """

    FLUSH_AT = 512  # gaps held before they go into the histogram

    def __init__(self) -> None:
        self._open: dict[str, list[float]] = {}  # rid -> [sent at, last token at (0: none yet)]
        self._gaps: list[float] = []

    def sent(self, msg: P.Message) -> None:
        if isinstance(msg, P.Generate):
            self._open[msg.rid] = [time.perf_counter(), 0.0]

    def received(self, rid: str, frames: list[tuple[P.Message, Any]]) -> None:
        """Frames of request `rid` that arrived together."""
        times = self._open.get(rid)
        if times is None:
            return
        now = 0.0
        for msg, _ in frames:
            if type(msg) is P.Token:
                now = now or time.perf_counter()
                if times[1]:
                    self._gaps.append(now - times[1])
                else:
                    TTFT.observe(now - times[0])
                times[1] = now
            elif isinstance(msg, P.Final):
                TOKENS.labels(msg.model).inc(msg.completion_tokens)
        if len(self._gaps) >= self.FLUSH_AT:
            self.flush()

    def token(self, rid: str, now: float) -> None:
        """As `received` for one plain Token of request `rid`, arrived at `now` (time.perf_counter())."""
        times = self._open.get(rid)
        if times is None:
            return
        if times[1]:
            self._gaps.append(now - times[1])
            if len(self._gaps) >= self.FLUSH_AT:
                self.flush()
        else:
            TTFT.observe(now - times[0])
        times[1] = now

    def closed(self, rid: str) -> None:
        self._open.pop(rid, None)
        self.flush()

    def flush(self) -> None:
        if self._gaps:
            gaps, self._gaps = self._gaps, []
            observe_all(INTER_TOKEN, gaps)


def observe_all(histogram: Histogram, values: list[float]) -> None:
    """histogram.observe(v) for each v, as one increment per bucket touched and one of the sum."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:  # another prometheus_client: the public way
        for v in values:
            histogram.observe(v)
        return
    counts = [0] * len(bounds)
    for v in values:
        counts[bisect.bisect_left(bounds, v)] += 1  # the first bucket with v <= bound, as observe() picks
    total.inc(sum(values))
    for bucket, n in zip(buckets, counts):
        if n:
            bucket.inc(n)


class WorkerFigures:
    """Per-worker gauges from the broker's table; remembers lost workers for a while to show them down."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], float] = {}  # (worker id, device) -> when last seen

    def families(self, status: P.Status | None) -> list[Metric]:
        labels = ["worker_id", "device"]
        broker_up = GaugeMetricFamily("loom_broker_up", "1 when the broker answered this scrape")
        up = GaugeMetricFamily("loom_worker_up", "1 for each worker the broker hears from; 0 for one lost lately",
                               labels=labels)
        batch = GaugeMetricFamily("loom_worker_batch_size", "Rows in the worker's running batch", labels=labels)
        waiting = GaugeMetricFamily("loom_worker_waiting_requests", "Requests admitted but not yet prefilled",
                                    labels=labels)
        kv = GaugeMetricFamily("loom_worker_kv_cache_bytes", "Bytes held by the worker's KV caches", labels=labels)
        n_models = GaugeMetricFamily("loom_worker_models_loaded", "Models loaded on the worker", labels=labels)
        model = GaugeMetricFamily("loom_worker_model_loaded", "1 for each model loaded on each worker",
                                  labels=[*labels, "model_id"])
        running_all = GaugeMetricFamily("loom_requests_running", "Requests decoding on every worker")
        waiting_all = GaugeMetricFamily("loom_requests_waiting", "Requests waiting for their prefill on every worker")
        now = time.monotonic()
        workers = status.workers if status is not None else []
        broker_up.add_metric([], 1 if status is not None else 0)
        for w in workers:
            key = (str(w["worker_id"]), str(w["device"]))
            self._seen[key] = now
            up.add_metric(key, 1)
            batch.add_metric(key, w.get("running", 0))
            waiting.add_metric(key, w.get("waiting", 0))
            kv.add_metric(key, w.get("kv_cache_bytes", 0))
            n_models.add_metric(key, len(w["models"]))
            for m in w["models"]:
                model.add_metric([*key, str(m["model_id"])], 1)
        if status is not None:
            live = {(str(w["worker_id"]), str(w["device"])) for w in workers}
            for key, seen in list(self._seen.items()):
                if key in live:
                    continue
                if now - seen > GONE_WORKERS_KEPT_S:
                    del self._seen[key]
                else:
                    up.add_metric(key, 0)
        running_all.add_metric([], sum(w.get("running", 0) for w in workers))
        waiting_all.add_metric([], sum(w.get("waiting", 0) for w in workers))
        return [broker_up, up, batch, waiting, kv, n_models, model, running_all, waiting_all]


class _Families:
    """A collector that yields what it was given (or what a registry yields now)."""

    def __init__(self, source: Iterable[Metric] | CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterable[Metric]:
        return self.source.collect() if isinstance(self.source, CollectorRegistry) else self.source


def exposition(worker_families: list[Metric]) -> bytes:
    registry = CollectorRegistry()
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_Families(REGISTRY))
    registry.register(_Families(worker_families))
    return generate_latest(registry)


@router.get("/metrics", summary="Prometheus metrics (text format)", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "the Prometheus text format"}})
async def metrics(request: Request) -> Response:
    try:
        status = await request.app.state.broker.status()
    except BrokerError:
        status = None
    body = exposition(request.app.state.worker_figures.families(status))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def mark_process_dead() -> None:
    """Multiprocess mode: this process's live gauges stop counting (called at exit)."""
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())
