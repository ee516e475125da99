"""The throughput bench's table: figure, value, target, met."""
from __future__ import annotations

from typing import Any

from bench.common import BIG, SMALL

def build_table(r: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(figure: str, value: Any, target: str, met: bool | None, unit: str = "") -> None:
        shown = "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))
        rows.append({"figure": figure, "value": value, "shown": f"{shown}{unit}", "target": target,
                     "met": None if value is None else met})

    targets = {BIG: 0.97, SMALL: 0.85}
    for name, m in r["models"].items():
        s = m.get("single")
        if s:
            ratio = s.get("ratio_paired_median")
            add(f"{name} 1 stream tok/s (client) / baseline", ratio, f">= {targets.get(name, 0.9)}",
                ratio is not None and ratio >= targets.get(name, 0.9))
            add(f"{name}   server tok/s: client | worker metadata",
                None if not s.get("decode_tps") else f"{s['decode_tps']:.1f} | {s.get('worker_tps')}", "info", None)
            add(f"{name}   baseline tok/s", s.get("baseline_decode_tps"), "info", None)
            ttft = s.get("ttft_overhead_ms_paired_median")
            add(f"{name} TTFT overhead (server - baseline)", ttft, "<= 10 ms", ttft is not None and ttft <= 10, " ms")
            add(f"{name}   TTFT server | baseline", None if s.get("ttft_s") is None else
                f"{s['ttft_s'] * 1e3:.1f} | {(s.get('baseline_ttft_s') or 0) * 1e3:.1f} ms", "info", None)
        for key, n, tgt in (("conc8", 8, 4), ("conc32", 32, 8)):
            c = m.get(key)
            if c:
                add(f"{name} {n} streams aggregate / single", c.get("speedup_vs_single"), f">= {tgt}x",
                    (c.get("speedup_vs_single") or 0) >= tgt, "x")
                if n == 8:
                    add(f"{name} slowest TTFT at 8 streams", c.get("ttft_s_max"), "<= 0.5 s",
                        (c.get("ttft_s_max") or 9) <= 0.5, " s")
                    h = c.get("health_during") or {}
                    if "p99_ms" in h:
                        add(f"{name} /health p50 during 8 streams", h.get("p50_ms"), "info", None, " ms")
                        add(f"{name} /health p99 during 8 streams", h.get("p99_ms"), "<= 20 ms",
                            (h.get("p99_ms") or 1e9) <= 20, " ms")
                if n == 32:
                    add(f"{name} slowest TTFT at 32 streams", c.get("ttft_s_max"), "info", None, " s")
                    for role, v in (c.get("rss_mb_peak") or {}).items():
                        add(f"{name} peak RSS {role} under 32 streams", v, "info", None, " MB")
        z = m.get("relay")
        if z:
            add(f"{name} relay worker->client p50 (ZMQ, 1 stream)", z.get("relay_ms_p50"), "info", None, " ms")
            add(f"{name} relay worker->client p99 (ZMQ, 1 stream)", z.get("relay_ms_p99"), "<= 2 ms",
                (z.get("relay_ms_p99") or 1e9) <= 2, " ms")
        z8 = m.get("relay8")
        if z8:
            add(f"{name} relay p99 (ZMQ, 8 streams)", z8.get("relay_ms_p99"), "info", None, " ms")
        t = m.get("http_twin")
        if t:
            add(f"{name} emit->SSE arrival p50 (HTTP, twin)", t.get("http_ms_p50"), "info", None, " ms")
            add(f"{name} emit->SSE arrival p99 (HTTP, twin)", t.get("http_ms_p99"), "info" + ("" if t.get("valid") else " (invalid)"), None, " ms")
        if s and z:
            add(f"{name} SSE inter-arrival p99 | worker step p99", f"{s.get('gap_ms_p99')} | {z.get('worker_step_ms_p99')} ms",
                "info", None)
        cx = m.get("cancel")
        if cx:
            step = cx.get("decode_step_ms") or 0
            for key, what in (("zmq_cancel", "ZMQ Cancel"), ("http_disconnect", "HTTP disconnect")):
                v = (cx.get(key) or {}).get("median_ms")
                add(f"{name} worker computes on after {what} (median)", v, f"<= 1 step ({step:.1f} ms)",
                    v is not None and v <= step, " ms")
            hh = cx.get("health_after_disconnect") or {}
            add(f"{name} /health active_requests==0 after disconnect", hh.get("active_requests_zero_ms"), "info", None, " ms")
            add(f"{name} /health generating==0 after disconnect", hh.get("generating_zero_ms"),
                "info (0.5 s resolution)", None, " ms")
        hr = m.get("hidden_rss")
        if hr:
            add(f"{name} worker RSS growth, {hr['tokens']}-tok stream + hidden (peak)", hr.get("growth_mb_peak"),
                f"info (KV {hr['kv_cache_mb']} MB)", None, " MB")
            add(f"{name} worker RSS growth after the stream", hr.get("growth_mb_after"), "info", None, " MB")
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    w1 = max(len(r["figure"]) for r in rows)
    w2 = max(len(r["shown"]) for r in rows)
    w3 = max(len(r["target"]) for r in rows)
    print(f"{'figure':<{w1}}  {'value':>{w2}}  {'target':<{w3}}  met")
    print("-" * (w1 + w2 + w3 + 9))
    for r in rows:
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        print(f"{r['figure']:<{w1}}  {r['shown']:>{w2}}  {r['target']:<{w3}}  {met}")
