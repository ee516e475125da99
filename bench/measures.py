"""The throughput bench's measurements, each against a running Stack."""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from bench.baseline import Baseline
from bench.clients import ZClient, _sse_stream, http_streams, stream_stats
from bench.common import med, pct, rnd, watch_cpu
from bench.stack import HealthPoller, Stack

def bench_single(stack: Stack, baseline: Baseline, model: str, tokens: int, reps: int) -> dict[str, Any]:
    """Alternate baseline and server runs so both see the same background load."""
    http_streams(stack.url, model, 1, 16)  # warm-up
    probe_before = baseline.probe()
    runs, base = [], []
    for _ in range(reps):
        base.append(baseline.run(tokens))
        _, _, res = http_streams(stack.url, model, 1, tokens)
        runs.append(stream_stats(res[0]))
    probe_after = baseline.probe()
    errors = [r["error"] for r in runs if r["error"]]
    gaps = [g for r in runs for g in r.get("gaps_s", [])]
    pairs = [(r, b) for r, b in zip(runs, base) if r.get("decode_tps") and b.get("decode_tps")]
    return {"runs": [{k: rnd(v, 4) for k, v in r.items() if k != "gaps_s"} for r in runs],
            "baseline_runs": [{k: rnd(v, 4) for k, v in b.items()} for b in base], "errors": errors,
            "decode_tps": med([r["decode_tps"] for r in runs if "decode_tps" in r]),
            "ttft_s": med([r["ttft_s"] for r in runs if r["ttft_s"] is not None]),
            "worker_tps": med([r["worker_tps"] for r in runs if r["worker_tps"]]),
            "baseline_decode_tps": med([b["decode_tps"] for b in base if b.get("decode_tps")]),
            "baseline_ttft_s": med([b["ttft_s"] for b in base]),
            "baseline_step_ms_p50": med([b["step_ms_p50"] for b in base if b.get("step_ms_p50")]),
            "ratio_paired_median": med([r["decode_tps"] / b["decode_tps"] for r, b in pairs]),
            "ttft_overhead_ms_paired_median": med([(r["ttft_s"] - b["ttft_s"]) * 1e3 for r, b in zip(runs, base)
                                                   if r["ttft_s"] is not None]),
            "contention_probe_before": probe_before, "contention_probe_after": probe_after,
            "deltas_per_run": [r["deltas"] for r in runs],
            "gap_ms_p50": rnd(pct(gaps, 50) * 1e3 if gaps else None), "gap_ms_p99": rnd(pct(gaps, 99) * 1e3 if gaps else None),
            "gap_ms_max": rnd(max(gaps) * 1e3 if gaps else None)}


def bench_relay(stack: Stack, model: str, tokens: int, reps: int, streams: int = 1) -> dict[str, Any]:
    z = ZClient(stack.frontend)
    try:
        z.run(model, 1, 8)  # warm-up
        relay, steps, ttfts, errors = [], [], [], []
        for _ in range(reps):
            out = z.run(model, streams, tokens)
            for s in out["streams"].values():
                if s["error"]:
                    errors.append(s["error"])
                toks = s["tokens"]
                relay += [recv - emit for emit, recv, _ in toks]
                steps += [b[0] - a[0] for a, b in zip(toks, toks[1:])]
                if toks:
                    ttfts.append(toks[0][1] - out["t_send"])
        return {"streams": streams, "tokens": len(relay), "errors": errors,
                "relay_ms_p50": rnd(pct(relay, 50) * 1e3 if relay else None, 4),
                "relay_ms_p99": rnd(pct(relay, 99) * 1e3 if relay else None, 4),
                "relay_ms_max": rnd(max(relay) * 1e3 if relay else None, 4),
                "worker_step_ms_p50": rnd(pct(steps, 50) * 1e3 if steps else None),
                "worker_step_ms_p99": rnd(pct(steps, 99) * 1e3 if steps else None),
                "ttft_s": rnd(med(ttfts), 4)}
    finally:
        z.close()


def bench_http_twin(stack: Stack, model: str, tokens: int) -> dict[str, Any]:
    """Per-token latency over the full HTTP path.

    SSE events carry no t_emit, so run a direct ZeroMQ stream and an HTTP stream
    in the same decode batch: both rows get their token in the same step, within
    microseconds, so the emit time of an HTTP token is the ZeroMQ twin's latest
    t_emit before the HTTP arrival (valid while the latency is under one step).
    """
    z = ZClient(stack.frontend)
    box: dict[str, Any] = {}

    rid = z.generate(model, 4000)
    emits: list[float] = []
    done = threading.Event()

    def zmq_side() -> None:
        while not done.is_set():
            msg, _ = z.recv(0.05)
            if msg is not None and isinstance(msg, z.P.Token):
                emits.append(msg.t_emit)
            elif msg is not None and isinstance(msg, (z.P.Final, z.P.Error)):
                break

    try:
        th = threading.Thread(target=zmq_side)
        th.start()
        t_wait = time.time() + 10
        while not emits and time.time() < t_wait:
            time.sleep(0.01)
        _, _, res = http_streams(stack.url, model, 1, tokens)
        time.sleep(0.05)
        done.set()
        th.join(timeout=30)
        z.cancel(rid)
        emits.sort()
        import bisect

        lat = []
        for a in res[0].get("arrivals", []):
            i = bisect.bisect_right(emits, a) - 1
            if i >= 0:
                if i < len(emits) - 1 or a - emits[i] < 0.2:  # an arrival after the twin ended is not matched
                    lat.append(a - emits[i])
        steps = [b - a for a, b in zip(emits, emits[1:])]
        step = pct(steps, 50) or 0
        return {"tokens": len(lat), "http_ms_p50": rnd(pct(lat, 50) * 1e3 if lat else None, 4),
                "http_ms_p99": rnd(pct(lat, 99) * 1e3 if lat else None, 4),
                "http_ms_max": rnd(max(lat) * 1e3 if lat else None, 4),
                "twin_step_ms_p50": rnd(step * 1e3),
                "valid": bool(lat) and (pct(lat, 99) or 0) < 0.8 * step and stack.n_workers == 1,
                "note": "" if stack.n_workers == 1 else "with several workers the twin may run on another worker"}
    finally:
        z.close()


def bench_concurrency(stack: Stack, model: str, n: int, tokens: int, single_tps: float | None,
                      health: bool = False, rss: bool = False) -> dict[str, Any]:
    poller = HealthPoller(stack.url) if health else None
    rss_peak: dict[str, float] = {}
    rss_before = {}
    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.is_set():
            for role in ("api", "broker"):
                try:
                    rss_peak[role] = max(rss_peak.get(role, 0.0), stack.rss_mb(role))
                except Exception:
                    pass
            stop.wait(0.05)

    sampler = None
    if rss:
        rss_before = {role: stack.rss_mb(role) for role in ("api", "broker")}
        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
    try:
        t_start, t_end, results = http_streams(stack.url, model, n, tokens)
    finally:
        stop.set()
        if sampler:
            sampler.join()
        hres = None
        if poller:
            try:
                hres = poller.finish()
            except Exception as exc:
                hres = {"error": str(exc)}
                poller.kill()
    stats = [stream_stats(r) for r in results]
    errors = [s["error"] for s in stats if s["error"]]
    total = sum(s["completion_tokens"] or 0 for s in stats if not s["error"])
    last = max((r["t_send"] + s["end_s"] for r, s in zip(results, stats)), default=t_start) - t_start
    agg = total / last if last > 0 else None
    ttfts = [s["ttft_s"] for s in stats if s["ttft_s"] is not None]
    out = {"streams": n, "tokens_each": tokens, "errors": errors, "total_tokens": total, "wall_s": rnd(last),
           "aggregate_tps": rnd(agg, 2), "speedup_vs_single": rnd(agg / single_tps if agg and single_tps else None),
           "ttft_s_max": rnd(max(ttfts) if ttfts else None, 4), "ttft_s_p50": rnd(pct(ttfts, 50), 4),
           "per_stream_decode_tps_p50": rnd(pct([s["decode_tps"] for s in stats if "decode_tps" in s], 50), 2)}
    if hres is not None:
        out["health_during"] = hres
    if rss:
        out["rss_mb_before"] = {k: rnd(v, 1) for k, v in rss_before.items()}
        out["rss_mb_peak"] = {k: rnd(v, 1) for k, v in rss_peak.items()}
    return out


def health_idle(stack: Stack, n: int = 50) -> dict[str, Any]:
    import httpx

    lat = []
    with httpx.Client(timeout=5) as c:
        c.get(f"{stack.url}/health")
        for _ in range(n):
            t0 = time.perf_counter()
            c.get(f"{stack.url}/health")
            lat.append(time.perf_counter() - t0)
            time.sleep(0.01)
    return {"n": n, "p50_ms": rnd(pct(lat, 50) * 1e3), "p99_ms": rnd(pct(lat, 99) * 1e3)}


def bench_cancel(stack: Stack, model: str, step_ms: float | None, trials: int) -> dict[str, Any]:
    """How long the worker keeps computing for a request after it is abandoned.

    The broker drops a request's route when it gets the Cancel, so no frame
    after that reaches any client: the worker's own CPU time (per-thread
    /proc schedstat, ns resolution, sampled every ~1 ms) tells when it stopped.
    """
    import httpx

    wpid = stack.worker_pids()
    step_s = (step_ms or 10) / 1e3
    window = max(0.02, 3 * step_s)
    out: dict[str, Any] = {"decode_step_ms": rnd(step_ms), "idle_window_ms": rnd(window * 1e3)}
    zmq_stops, http_stops, late_frames = [], [], 0
    z = ZClient(stack.frontend)
    try:
        for _ in range(trials):  # (a) direct ZeroMQ Cancel after 12 tokens
            res = z.run(model, 1, 3000, cancel_after=12, on_cancel=lambda t: watch_cpu(wpid, t, 1.0, window))
            zmq_stops.append((res.get("after_cancel") or {}).get("stopped_after_s"))
            while True:  # anything relayed after the Cancel (there should be nothing)
                msg, _ = z.recv(0.1)
                if msg is None:
                    break
                late_frames += 1
            time.sleep(0.3)
    finally:
        z.close()

    async def http_side() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as c:
            return await _sse_stream(c, model, 3000, close_after=12)

    for _ in range(trials):  # (b) HTTP client disconnect after 12 tokens
        res = asyncio.run(http_side())
        http_stops.append(watch_cpu(wpid, res["t_closed"], 1.0, window).get("stopped_after_s"))
        time.sleep(0.3)
    # (c) what /health shows after a disconnect: active_requests (the broker's
    # routes) and generating (the worker's count, sent with its 0.5 s heartbeat)
    res = asyncio.run(http_side())
    t_close, t_broker, t_gen = res["t_closed"], None, None
    with httpx.Client(timeout=5) as c:
        deadline = time.time() + 5
        while time.time() < deadline and (t_broker is None or t_gen is None):
            try:
                ws = c.get(f"{stack.url}/health").json().get("workers", [])
            except Exception:
                ws = None
            now = time.time()
            if ws is not None:
                if t_broker is None and all(w.get("active_requests", 0) == 0 for w in ws):
                    t_broker = now
                if t_gen is None and all(w.get("generating", 0) == 0 for w in ws):
                    t_gen = now
            time.sleep(0.01)

    def ms(v: list[float | None]) -> dict[str, Any]:
        got = [x for x in v if x is not None]
        return {"trials_ms": [rnd(x * 1e3) if x is not None else None for x in v],
                "median_ms": rnd(med(got) * 1e3 if got else None), "max_ms": rnd(max(got) * 1e3 if got else None),
                "median_steps": rnd(med(got) / step_s if got and step_ms else None)}

    out["zmq_cancel"] = {**ms(zmq_stops), "frames_after_cancel": late_frames}
    out["http_disconnect"] = ms(http_stops)
    out["health_after_disconnect"] = {
        "active_requests_zero_ms": rnd((t_broker - t_close) * 1e3 if t_broker else None),
        "generating_zero_ms": rnd((t_gen - t_close) * 1e3 if t_gen else None),
        "resolution_ms": 500, "note": "`generating` is the worker's count from its heartbeat, sent every 0.5 s"}
    return out


def bench_hidden_rss(stack: Stack, model: str, tokens: int, info: dict[str, Any]) -> dict[str, Any]:
    before = stack.workers_rss()
    peak = before
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, stack.workers_rss())
            except Exception:
                pass
            stop.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        _, _, res = http_streams(stack.url, model, 1, tokens,
                                 extra={"return_hidden_states": True, "hidden_state_layers": "all"})
    finally:
        stop.set()
        th.join()
    time.sleep(0.3)
    after = stack.workers_rss()
    s = stream_stats(res[0])
    kv = 2 * info["layers"] * info["kv_heads"] * info["head_dim"] * (tokens + 40) * 4
    final = res[0].get("final") or {}
    return {"tokens": s["completion_tokens"], "error": s["error"], "hidden_state_returned": "hidden_state" in final,
            "worker_rss_mb_before": rnd(before / 2**20, 1), "worker_rss_mb_peak": rnd(peak / 2**20, 1),
            "worker_rss_mb_after": rnd(after / 2**20, 1), "growth_mb_peak": rnd((peak - before) / 2**20, 1),
            "growth_mb_after": rnd((after - before) / 2**20, 1), "kv_cache_mb": rnd(kv / 2**20, 2)}
