#!/usr/bin/env python
"""Efficiency at scale (issue 13): the stack against a bare batched decode loop, in one run.

    python bench/efficiency.py                  # ~5-8 minutes on 2 cores
    python bench/efficiency.py --quick          # one repetition, shorter scaling runs
    python bench/efficiency.py --profile        # also py-spy the API, broker and worker under 64 streams

Figures (each against a baseline measured in this run, on the same model and
torch thread count; see bench/README.md):
  (a) 64 streams x 200 tokens on the 4M model, temperature 0.8: aggregate
      tok/s over HTTP / the bare loop's tok/s at batch 64 with the same sampling;
  (b) CPU time (every thread's run time, bench/profiling.py) of the API, broker
      and worker processes over that run / tokens relayed; the worker's CPU
      outside the forward pass: its engine thread's, measured in process with
      the forward wrapped (bench/step_overhead.py, same batch and sampling),
      plus its other threads' from this run (and, with --profile, from the
      share of py-spy samples outside it);
  (c) time to first token on the 90M model, server minus the in-process baseline, on a traced stack
      of its own (bench/ttft_path.py): robustly, each request's TTFT minus the worker's own prefill
      forward plus the prefill's CPU-time difference, and the paired median as before;
  (d) 8 and 32 streams aggregate / one stream on the 90M model, next to the
      bare loop's own batch scaling (tok/s at batch 8 and 32 / batch 1).
Figures, not assertions: exits 0 unless the stack could not start (2) or the
models could not be made (3).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import profiling, ttft_path  # noqa: E402
from bench.bare_loop import BareLoop  # noqa: E402
from bench.clients import _sse_stream, stream_stats  # noqa: E402
from bench.common import (BIG, DEFAULT_CACHE, SMALL, loadavg, log, machine_info, make_models, med,  # noqa: E402
                          write_json)
from bench.stack import Stack  # noqa: E402


def http_run(url: str, model: str, n: int, tokens: int, temperature: float, top_p: float, seed: int = 0):
    """n concurrent SSE streams (seeds seed..seed+n-1) on one event loop: (t_start, per-stream results)."""
    import httpx

    async def go():
        limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600, connect=10), limits=limits) as c:
            t_start = time.time()
            extra = lambda i: {"temperature": temperature, "top_p": top_p, "seed": seed + i}  # noqa: E731
            return t_start, await asyncio.gather(*[_sse_stream(c, model, tokens, extra=extra(i)) for i in range(n)])

    return asyncio.run(go())


def aggregate(t_start: float, results: list[dict[str, Any]]) -> dict[str, Any]:
    stats = [stream_stats(r) for r in results]
    errors = [s["error"] for s in stats if s["error"]]
    total = sum(s["completion_tokens"] or 0 for s in stats if not s["error"])
    wall = max(r["t_send"] + s["end_s"] for r, s in zip(results, stats)) - t_start
    ttfts = [s["ttft_s"] for s in stats if s["ttft_s"] is not None]
    return {"streams": len(results), "tokens": total, "wall_s": wall, "tps": total / wall if wall > 0 else None,
            "errors": errors[:3], "error_count": len(errors), "ttft_s_max": max(ttfts) if ttfts else None,
            "stats": stats}


def measure_batch(stack: Stack, bare: BareLoop, model: str, args: argparse.Namespace) -> dict[str, Any]:
    """(a) and (b): 64 sampled streams against the bare loop at batch 64, alternating, with CPU per role."""
    procs = {k: v for k, v in profiling.roles(stack).items() if k in ("api", "broker", "worker")}
    http_run(stack.url, model, 8, 16, args.temperature, args.top_p)  # warm-up
    pairs = []
    for rep in range(args.reps):
        b = bare.run(batch=args.streams, tokens=args.tokens, temperature=args.temperature, top_p=args.top_p, seed=rep,
                     stop_at_eos=True)
        before, c0 = profiling.cpu_seconds(procs), time.process_time()
        threads0 = profiling.thread_cpu_seconds(procs["worker"])
        t_start, res = http_run(stack.url, model, args.streams, args.tokens, args.temperature, args.top_p,
                                seed=1000 * rep)
        after, client = profiling.cpu_seconds(procs), time.process_time() - c0
        threads1 = profiling.thread_cpu_seconds(procs["worker"])
        busiest = max((threads1[t] - threads0.get(t, 0.0) for t in threads1), default=0.0)
        agg = aggregate(t_start, res)
        n = max(1, agg["tokens"])
        cpu = {role: (after[role] - before[role]) / n * 1e6 for role in procs}
        cpu["bench client"] = client / n * 1e6
        cpu["worker engine thread"] = busiest / n * 1e6  # the busiest thread: the step loop and the forward
        cpu["worker other threads"] = cpu["worker"] - cpu["worker engine thread"]
        ended_early = sum(1 for s in agg.pop("stats") if (s["completion_tokens"] or 0) < args.tokens)
        pairs.append({"server": {**agg, "streams_ended_early": ended_early}, "bare": b, "cpu_us_per_token": cpu,
                      "ratio": agg["tps"] / b["tps"] if agg["tps"] else None})
        log(f"  rep {rep}: server {agg['tps']:.0f} tok/s ({agg['tokens']} tokens, {ended_early} streams ended "
            f"early), bare {b['tps']:.0f} tok/s ({b['generated']} tokens); CPU us/token {({k: round(v, 1) for k, v in cpu.items()})}")
    cpu = {role: med([p["cpu_us_per_token"][role] for p in pairs]) for role in pairs[0]["cpu_us_per_token"]}
    bare_forward = med([p["bare"]["forward_cpu_us_per_token"] for p in pairs])
    return {"pairs": pairs, "ratio": med([p["ratio"] for p in pairs if p["ratio"]]),
            "server_tps": med([p["server"]["tps"] for p in pairs if p["server"]["tps"]]),
            "bare_tps": med([p["bare"]["tps"] for p in pairs]), "cpu_us_per_token": cpu,
            "bare_forward_cpu_us_per_token": bare_forward,
            "bare_cpu_us_per_token": med([p["bare"]["cpu_us_per_token"] for p in pairs]),
            "bare_sample_cpu_us_per_token": med([p["bare"]["sample_cpu_us_per_token"] for p in pairs]),
            "worker_outside_forward_us_by_subtraction": cpu["worker"] - bare_forward,
            "api_plus_broker_us": cpu["api"] + cpu["broker"]}


def measure_engine_outside(path: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """The worker's engine thread outside the model's forward at batch 64 (bench/step_overhead.py, a process of
    its own): the same runner and step batch, the forward timed by wrapping it, each step's message written to
    a socket. The bare loop's forward is not the worker's (another cache), so subtracting it cannot give this."""
    out = Path(tempfile.mkdtemp(prefix="loom-steps-")) / "steps.json"
    cmd = [sys.executable, str(REPO / "bench" / "step_overhead.py"), "--model", path, "--batch", str(args.streams),
           "--tokens", str(args.tokens), "--temperature", str(args.temperature), "--top-p", str(args.top_p),
           "--single-tokens", "0", "--no-pieces", "--reps", str(args.reps), "--threads", "1", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not out.exists():
        log(f"step_overhead.py failed: {done.stderr[-500:]}")
        return None
    case = next(iter(json.loads(out.read_text()).values()))
    return {"server_us_per_token": case["server"]["outside_us_per_token"],
            "bare_us_per_token": case["bare"]["outside_us_per_token"]}


def measure_profile(stack: Stack, model: str, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """py-spy on the API, broker and worker during one more 64-stream run (not a measured one)."""
    procs = {k: v for k, v in profiling.roles(stack).items() if k in ("api", "broker", "worker")}
    spy = profiling.Profiler(procs, out_dir)
    time.sleep(1.0)  # py-spy attaches
    try:
        t_start, res = http_run(stack.url, model, args.streams, args.tokens, args.temperature, args.top_p, seed=77)
    finally:
        files = spy.stop()
    out = {role: profiling.summarize(path) for role, path in files.items()}
    out["files"] = {role: str(path) for role, path in files.items()}
    out["tokens"] = aggregate(t_start, res)["tokens"]
    return out


def measure_ttft(path: str, model: str, reps: int, threads: int, cache: Path) -> dict[str, Any]:
    """(c), on a traced stack of its own (bench/ttft_path.py): rounds of baseline, a fresh httpx client (as
    before) and a kept-alive connection, in rotating order; the paired median as before, and the robust
    overhead (each request's TTFT minus the worker's own prefill forward, plus the prefill CPU difference)."""
    m = ttft_path.measure(path, model, reps, threads, cache, ways=("baseline", "httpx", "raw"))
    fresh, kept = m["ways"]["httpx"], m["ways"]["raw"]
    return {"server_ms": fresh["ttft_ms"]["median"], "baseline_ms": m["baseline_ttft_ms"]["median"],
            "overhead_ms": fresh["overhead_ms"]["median"], "overhead_spread_ms": fresh["overhead_ms"],
            "robust_overhead_ms": fresh["robust_overhead_ms"], "kept_alive_robust_overhead_ms": kept["robust_overhead_ms"],
            "kept_alive_overhead_ms": kept["overhead_ms"]["median"],
            "prefill_cpu_difference_ms": m["prefill_cpu_difference_ms"], "pairs": reps,
            "prompt_tokens": m["prompt_tokens"], "hop_by_hop": m}


def measure_scaling(stack: Stack, bare: BareLoop, model: str, tokens: int) -> dict[str, Any]:
    """(d): greedy, as bench/throughput.py: aggregate over (first send -> last token) / one stream's decode rate."""
    http_run(stack.url, model, 2, 8, 0.0, 1.0)  # warm-up
    singles = []
    for _ in range(2):
        _, res = http_run(stack.url, model, 1, tokens, 0.0, 1.0)
        singles.append(stream_stats(res[0]).get("decode_tps"))
    single = med([s for s in singles if s])
    out: dict[str, Any] = {"tokens": tokens, "server_single_decode_tps": single}
    bare_runs = {b: bare.run(batch=b, tokens=tokens) for b in (1, 8, 32)}
    for n in (8, 32):
        agg = aggregate(*http_run(stack.url, model, n, tokens, 0.0, 1.0))
        agg.pop("stats")
        out[f"server_{n}"] = agg
        out[f"server_ratio_{n}"] = agg["tps"] / single if agg["tps"] and single else None
        out[f"bare_ratio_{n}"] = bare_runs[n]["tps"] / bare_runs[1]["decode_tps"]
        out[f"bare_decode_ratio_{n}"] = bare_runs[n]["decode_tps"] / bare_runs[1]["decode_tps"]
    out["bare"] = bare_runs
    return out


def report(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []

    def add(figure: str, value: Any, target: str = "info", fmt: str = "{:.3f}") -> None:
        rows.append((figure, "n/a" if value is None else fmt.format(value), target))

    a = r.get("batch") or {}
    if a:
        add(f"(a) {SMALL} {r['args']['streams']} streams aggregate / bare loop", a.get("ratio"), ">= 0.9")
        add("    server | bare tok/s", None if a.get("server_tps") is None else
            (a["server_tps"], a["bare_tps"]), fmt="{0[0]:.0f} | {0[1]:.0f}")
        c = a["cpu_us_per_token"]
        # Wall-clock ratios on a busy machine favour the side with more
        # processes (the scheduler shares CPU by thread); CPU per token is not
        # skewed that way.
        add("    bare loop CPU per token / worker CPU per token (load-robust proxy)",
            a["bare_cpu_us_per_token"] / c["worker"] if c.get("worker") else None)
        add("(b) API + broker CPU per relayed token", a.get("api_plus_broker_us"), "<= 20 us", "{:.1f} us")
        add("    API | broker", (c["api"], c["broker"]), fmt="{0[0]:.1f} | {0[1]:.1f} us")
        add("    worker CPU per token | bare loop CPU per token", (c["worker"], a["bare_cpu_us_per_token"]),
            fmt="{0[0]:.1f} | {0[1]:.1f} us")
        add("    bare loop: forward | sampling CPU per token",
            (a["bare_forward_cpu_us_per_token"], a["bare_sample_cpu_us_per_token"]), fmt="{0[0]:.1f} | {0[1]:.1f} us")
        add("    worker engine thread | other threads CPU per token", (c["worker engine thread"], c["worker other threads"]),
            fmt="{0[0]:.1f} | {0[1]:.1f} us")
        e = r.get("engine_outside")
        if e:
            add("    worker outside the forward: engine thread in process (step_overhead.py) + other threads",
                e["server_us_per_token"] + c["worker other threads"], "<= 15 us", "{:.1f} us")
            add("    engine thread outside the forward | the bare loop's own outside", (e["server_us_per_token"],
                e["bare_us_per_token"]), fmt="{0[0]:.1f} | {0[1]:.1f} us")
        p = r.get("profile") or {}
        share = ((p.get("worker") or {}).get("forward_share_by_thread") or {}).get("Engine._run")
        if share is not None:
            add("    worker outside the forward (py-spy share of the engine thread + other threads)",
                c["worker engine thread"] * (1 - share) + c["worker other threads"], "<= 15 us", "{:.1f} us")
        add("    bench client CPU per token (same machine)", c["bench client"], fmt="{:.1f} us")
    t = r.get("ttft") or {}
    if t:
        add(f"(c) {BIG} TTFT server - in-process baseline, robust (TTFT - worker forward + prefill CPU difference)",
            t.get("robust_overhead_ms"), "<= 10 ms", "{:.1f} ms")
        add("    the same, kept-alive connection (no new connection per request)", t.get("kept_alive_robust_overhead_ms"),
            fmt="{:.1f} ms")
        add(f"    paired median of {t['pairs']} (fresh httpx client per request) [p10, p90]",
            (t["overhead_ms"], t["overhead_spread_ms"]["p10"], t["overhead_spread_ms"]["p90"]),
            fmt="{0[0]:.1f} [{0[1]:.1f}, {0[2]:.1f}] ms")
        add("    server | baseline TTFT", (t["server_ms"], t["baseline_ms"]), fmt="{0[0]:.1f} | {0[1]:.1f} ms")
        add("    prefill CPU time, worker - baseline", t.get("prefill_cpu_difference_ms"), fmt="{:+.2f} ms")
    d = r.get("scaling") or {}
    if d:
        for n, target in ((8, ">= 4x"), (32, ">= 8x")):
            add(f"(d) {BIG} {n} streams / 1 stream (server)", d.get(f"server_ratio_{n}"), target, "{:.2f}x")
            add(f"    bare loop batch {n} / batch 1 (same definition)", d.get(f"bare_ratio_{n}"), fmt="{:.2f}x")
            add(f"    bare loop batch {n} / batch 1, decode only", d.get(f"bare_decode_ratio_{n}"), fmt="{:.2f}x")
    return rows


def print_profile(p: dict[str, Any]) -> None:
    for role in ("worker", "broker", "api"):
        s = p.get(role)
        if not s:
            continue
        inside = (s.get("forward_share_by_thread") or {}).get("Engine._run")
        print(f"\npy-spy, {role}: {s['samples']} samples" +
              (f", {s['forward_share']:.1%} under the model forward ({inside:.1%} of the engine thread's)"
               if role == "worker" and inside is not None else ""))
        for name, share in s["categories"]:
            print(f"  {share:6.1%}  {name}")
        print("  by thread: " + ", ".join(f"{name} {share:.1%}" for name, share in s["threads"][:4]))
        print("  top leaf functions:")
        for name, share in s["leaves"][:8]:
            print(f"  {share:6.1%}  {name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--quick", action="store_true", help="one repetition, 32-token scaling runs, 3 TTFT pairs")
    p.add_argument("--profile", action="store_true", help="py-spy the API, broker and worker during an extra 64-stream run")
    p.add_argument("--skip-big", action="store_true", help="only the 4M model: figures (a) and (b)")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus cut for (a); 1.0 (none) by default, so the "
                                                          "bare loop's sampling is a softmax and one multinomial")
    p.add_argument("--reps", type=int, default=None, help="repetitions of (a) (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the worker and the baselines (default: loom serve's rule, cpu_count - 1)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "efficiency.json")
    args = p.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    threads = args.threads or max(1, (os.cpu_count() or 1) - 1)
    names = [SMALL] if args.skip_big else [SMALL, BIG]
    r: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine_info(),
                         "loadavg_start": loadavg(), "threads": threads,
                         "args": {k: v for k, v in vars(args).items() if k not in ("cache_dir", "out")}}
    made = make_models(names, args.cache_dir)
    if made is None:
        return 3
    infos = made["models"]
    for name in names:
        path = infos[name]["path"]
        stack = Stack([path], args.cache_dir / "logs", threads=threads)
        try:
            log(f"{name}: starting loom serve on {stack.url}; log {stack.log_path}")
            try:
                stack.wait_ready()
            except Exception as exc:
                log(f"the stack did not start: {exc}")
                return 2
            bare = BareLoop(path, threads)
            try:
                if name == SMALL:
                    log(f"{name}: (a)+(b) {args.streams} streams x {args.tokens} tokens, temperature "
                        f"{args.temperature}, top_p {args.top_p}, alternating with the bare loop, x{args.reps}")
                    r["batch"] = measure_batch(stack, bare, name, args)
                    log(f"{name}: the engine thread's CPU outside the forward, in process (bench/step_overhead.py)")
                    r["engine_outside"] = measure_engine_outside(path, args)
                    if args.profile:
                        log(f"{name}: py-spy on the API, broker and worker during one more run")
                        r["profile"] = measure_profile(stack, name, args, args.cache_dir / "profiles")
                else:
                    log(f"{name}: (d) 1, 8 and 32 streams and the bare loop at batch 1, 8 and 32")
                    r["scaling"] = measure_scaling(stack, bare, name, 32 if args.quick else 64)
            finally:
                bare.close()
        finally:
            stack.stop()
        if name == BIG:
            log(f"{name}: (c) time to first token against the in-process baseline, hop by hop (bench/ttft_path.py)")
            try:
                r["ttft"] = measure_ttft(path, name, 7 if args.quick else 21, threads, args.cache_dir)
            except Exception as exc:
                log(f"(c): the traced stack did not serve: {exc}")
    r["loadavg_end"] = loadavg()
    m = r["machine"]
    print(f"\nLoom efficiency ({'quick' if args.quick else 'full'}), {m['cpu_count']} CPUs ({m['cpu_model']}), "
          f"torch {made['torch']}, {threads} torch thread(s) for the worker and the baselines; load average "
          f"{r['loadavg_start']} -> {r['loadavg_end']} (the machine is shared: read the figures with that in mind)")
    rows = report(r)
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    for figure, value, target in rows:
        print(f"{figure:<{w[0]}}  {value:>{w[1]}}  {target}")
    if r.get("profile"):
        print_profile(r["profile"])
    write_json(args.out, r)
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
