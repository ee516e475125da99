#!/usr/bin/env python
"""Loom throughput and latency benchmark (project issue 4).

Starts the real stack (`loom serve` in its own process group on free loopback
ports) on generated random-weight Llamas, measures it from the client's side
and compares it with an in-process baseline (a plain KV-cache decode loop with
transformers on the same model and torch thread count, run in a subprocess so
it shares nothing with the client or the server). See bench/README.md.

    python bench/throughput.py --quick          # ~2-3 minutes smoke run
    python bench/throughput.py                  # full run (~10-15 minutes on 2 cores)
    python bench/throughput.py --skip-big       # only the ~4M-parameter model

The figures are benchmark results, not assertions: the process exits 0 unless
the stack could not start (exit 2) or the models could not be made (exit 3).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The pieces live in modules of their own (bench/common.py, make_models.py,
# baseline.py, stack.py, clients.py, measures.py, figures.py); their names are
# re-exported here because other scripts import them from this module.
from bench.baseline import Baseline, baseline_main, contention_probe  # noqa: E402,F401
from bench.clients import ZClient, _many, _sse_stream, http_streams, stream_stats  # noqa: E402,F401
from bench.common import (BENCH, BIG, DEFAULT_CACHE, DEFAULT_OUT, MESSAGES, MODELS, SMALL, free_port,  # noqa: E402,F401
                          loadavg, log, machine_info, make_models, med, pct, proc_cpu_ns, rnd, run_json_subprocess,
                          watch_cpu, write_json)
from bench.figures import build_table, print_table  # noqa: E402,F401
from bench.make_models import _big_tokenizer, make_models_main  # noqa: E402,F401
from bench.measures import (bench_cancel, bench_concurrency, bench_hidden_rss, bench_http_twin,  # noqa: E402,F401
                            bench_relay, bench_single, health_idle)
from bench.stack import HealthPoller, Stack, health_poll_main  # noqa: E402,F401

# --- main ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Loom throughput/latency benchmark against an in-process transformers "
                                            "baseline. Figures, not assertions: exits 0 unless the stack cannot start.")
    p.add_argument("--quick", action="store_true", help="short smoke run (~2-3 minutes): fewer repetitions, shorter streams")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path (default %(default)s)")
    p.add_argument("--skip-big", action="store_true", help="skip the ~90M-parameter model (only the ~4M one)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="generated models and logs (default %(default)s)")
    p.add_argument("--reps", type=int, default=None, help="repetitions of the single-stream runs (default 5, quick 2)")
    p.add_argument("--workers", type=int, default=1, help="worker processes for `loom serve` (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for each worker and for the baseline (default: loom serve's own rule, "
                        "(cpu_count - 1) // workers, at least 1)")
    p.add_argument("--hidden-tokens", type=int, default=None, help="length of the hidden-state RSS stream (default 2000, quick 400)")
    # internal modes (this file re-runs itself for the baseline, model making and /health polling)
    p.add_argument("--_baseline", help=argparse.SUPPRESS)
    p.add_argument("--_make-models", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--_health-poll", help=argparse.SUPPRESS)
    p.add_argument("--_interval", type=float, default=0.02, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._baseline:
        baseline_main(args._baseline, args.threads or os.cpu_count() or 1)
        return 0
    if args._make_models:
        make_models_main(args.cache_dir, args._make_models)
        return 0
    if args._health_poll:
        health_poll_main(args._health_poll, args._interval)
        return 0

    quick = args.quick
    reps = args.reps or (2 if quick else 5)
    # loom/launcher.py's default: the cores less one for the API and broker, shared by the workers.
    worker_threads = args.threads or max(1, ((os.cpu_count() or 1) - 1) // max(1, args.workers))
    threads = worker_threads
    hidden_tokens = args.hidden_tokens or (400 if quick else 2000)
    names = [SMALL] if args.skip_big else [BIG, SMALL]
    t_begin = time.time()
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "quick": quick, "reps": reps,
                               "machine": machine_info(), "loadavg_start": loadavg(), "models": {}}

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)

    made = make_models(names, args.cache_dir)
    if made is None:
        return 3
    infos = made["models"]
    results["machine"].update({"torch": made["torch"], "baseline_threads": threads,
                               "worker_threads": worker_threads, "workers": args.workers})

    for name in names:
        results["models"][name] = {"info": infos[name]}

    results["stacks"] = {}
    for name in names:
        m = results["models"][name]
        stack = Stack([infos[name]["path"]], args.cache_dir / "logs", workers=args.workers, threads=worker_threads)
        try:
            log(f"{name}: starting loom serve on {stack.url} (broker frontend {stack.frontend}); log {stack.log_path}")
            try:
                h = stack.wait_ready()
            except Exception as exc:
                log(f"the stack did not start: {exc}")
                results["error"] = f"stack did not start: {exc}"
                write_json(args.out, results)
                return 2
            results["stacks"][name] = {
                "workers": [{k: w.get(k) for k in ("device", "capacity", "pid")} for w in h["workers"]],
                "pids": {**{role: p.pid for role, p in stack.children.items()}, "workers": stack.worker_pids()},
                "health_idle": health_idle(stack, 20 if quick else 60)}
            run_model(stack, name, m, infos[name], args, quick, reps, threads, hidden_tokens)
            results["stacks"][name]["log_warnings"] = [l for l in stack.log_tail(20000).splitlines()
                                                       if " WARNING " in l or " ERROR " in l][-20:]
        except KeyboardInterrupt:
            log("interrupted; stopping the stack")
            results["interrupted"] = True
            break
        finally:
            stack.stop()
    results["loadavg_end"] = loadavg()
    results["elapsed_s"] = round(time.time() - t_begin, 1)
    rows = build_table(results)
    results["table"] = [{k: v for k, v in r.items() if k != "shown"} for r in rows]
    print()
    print(f"Loom benchmark ({'quick' if quick else 'full'}), {results['machine']['cpu_count']} CPUs "
          f"({results['machine']['cpu_model']}), torch {results['machine']['torch']}, {threads} threads; "
          f"load average {results['loadavg_start']} -> {results['loadavg_end']}; {results['elapsed_s']} s")
    if rows:
        print_table(rows)
    write_json(args.out, results)
    print(f"\nJSON: {args.out}")
    return 0


def run_model(stack: Stack, name: str, m: dict[str, Any], info: dict[str, Any], args: argparse.Namespace,
              quick: bool, reps: int, threads: int, hidden_tokens: int) -> None:
    step = lambda what: log(f"{name}: {what}")  # noqa: E731
    log(f"{name}: starting the baseline process ({info['parameters_m']}M params, {threads} threads)")
    try:
        baseline = Baseline(info["path"], threads)
    except Exception as exc:
        m.setdefault("failures", {})["baseline"] = str(exc)
        log(f"  baseline failed: {exc}")
        return
    try:
        m["baseline"] = baseline.info
        guard(m, "single", step, f"single stream, 128 tokens x {reps}, alternating with the baseline",
              lambda: bench_single(stack, baseline, name, 128, reps))
    finally:
        baseline.close()
    guard(m, "relay", step, "relay latency, 1 stream (direct ZeroMQ)", lambda: bench_relay(stack, name, 128, reps))
    guard(m, "relay8", step, "relay latency, 8 streams (direct ZeroMQ)",
          lambda: bench_relay(stack, name, 64, 1, streams=8))
    guard(m, "http_twin", step, "HTTP per-token latency (twin ZeroMQ stream)",
          lambda: bench_http_twin(stack, name, 128 if not quick else 64))
    single_tps = (m.get("single") or {}).get("decode_tps")
    guard(m, "conc8", step, "8 streams x 64 tokens + /health polling",
          lambda: bench_concurrency(stack, name, 8, 64, single_tps, health=True))
    guard(m, "conc32", step, "32 streams x 64 tokens + API/broker RSS",
          lambda: bench_concurrency(stack, name, 32, 64, single_tps, rss=True))
    if name == BIG or args.skip_big:
        step_ms = (m.get("relay") or {}).get("worker_step_ms_p50")
        guard(m, "cancel", step, "cancel / disconnect -> worker stops",
              lambda: bench_cancel(stack, name, step_ms, 2 if quick else 5))
    if name == SMALL:
        guard(m, "hidden_rss", step, f"worker RSS over a {hidden_tokens}-token stream with hidden states",
              lambda: bench_hidden_rss(stack, name, hidden_tokens, info))


def guard(m: dict[str, Any], key: str, step, what: str, fn) -> None:
    """Run one measurement; a failure is recorded, not raised (these are figures, not tests)."""
    step(what)
    t0 = time.time()
    try:
        m[key] = fn()
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        import traceback

        m[key] = None
        m.setdefault("failures", {})[key] = f"{exc.__class__.__name__}: {exc}"
        log(f"  {key} failed: {exc}\n{traceback.format_exc()[-1500:]}")
    log(f"  {key} done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
