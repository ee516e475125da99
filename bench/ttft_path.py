#!/usr/bin/env python
"""Time to first token, hop by hop along the real stack (issue 13, figure (c)).

    python bench/ttft_path.py                       # both models, 20 rounds each (~2-3 minutes on 2 cores)
    python bench/ttft_path.py --skip-big --reps 40  # the 4M model only: prefill ~11 ms on 1 thread, the path weighs more
    python bench/ttft_path.py --out /tmp/ttft.json

Starts `loom serve` (bench/stack.py) with bench/ttft_trace/ on PYTHONPATH: every
process stamps its stages of each request (time.time(), shared by all of them;
see bench/ttft_trace/sitecustomize.py). Each round sends one request (greedy,
max_tokens 2, the bench's chat prompt) each way, in a rotating order so all see
the same background load:
  baseline  the in-process baseline (bench/baseline.py): prefill + argmax;
  httpx     as efficiency.py's figure (c): a fresh httpx.AsyncClient under a fresh asyncio.run;
  raw_new   a plain socket, a new connection for each request (the server's share of httpx's new connection);
  raw       a kept-alive plain socket writing the HTTP request (no client library cost);
  zmq       a ZeroMQ DEALER on the broker's frontend, as the API talks to it (no HTTP).
It prints, per way, the TTFT and its difference from the round's baseline
(median, p10, p90), then each hop's median and p10-p90 spread, and writes JSON.

The paired difference is as noisy as the prefill itself (p10-p90 of ~20 ms on
the 90M model even on an idle machine), so it is also given robustly: the
path (each request's TTFT minus the worker's own prefill forward, stamped in
the worker) plus the difference of the prefill's CPU time in the worker and in
the baseline (medians; 0 when both run the same computation): "robust overhead".
Figures, not assertions: exits 0 unless the stack could not start (2) or the
models could not be made (3).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.baseline import Baseline  # noqa: E402
from bench.common import BIG, DEFAULT_CACHE, SMALL, loadavg, log, machine_info, make_models, med, pct, rnd, write_json  # noqa: E402
from bench.stack import Stack  # noqa: E402
from bench.ttft_clients import RawHttp, ZmqDirect, ask_httpx  # noqa: E402

TRACE_DIR = REPO / "bench" / "ttft_trace"
WAYS = ("baseline", "httpx", "raw_new", "raw", "zmq")

# The stages in path order; a hop is the time from one present stage to the next.
STAGES = [
    ("client.send", "client sends"),
    ("client.request_hook", "httpx built the request"),
    ("api.asgi_in", "API: request parsed, outermost middleware"),
    ("api.relay_run", "API: handler (middlewares, auth, body model)"),
    ("api.generate_sent", "API: Generate made (model, message)"),
    ("broker.frontend_in", "broker: Generate read (encode, ZeroMQ hop)"),
    ("broker.to_worker", "broker: routed"),
    ("worker.inbox_put", "worker socket thread: read, decoded, queued (encode, ZeroMQ hop)"),
    ("worker.engine_got", "worker engine thread: picked it up"),
    ("worker.sequence_built", "worker: request checked (template, tokenize)"),
    ("worker.admitted", "worker: admitted (logged, routed)"),
    ("worker.prefill_start", "worker: prefill starts"),
    ("worker.forward_done", "worker: prefill forward"),
    ("worker.sampled", "worker: first token chosen"),
    ("worker.flush", "worker: token accounted (detokenize)"),
    ("worker.outbox_put", "worker: Tokens message made"),
    ("worker.socket_took", "worker engine thread: encoded and handed to ZeroMQ"),
    ("broker.backend_in", "broker: Tokens read (ZeroMQ hop)"),
    ("broker.to_api", "broker: decoded, routes checked"),
    ("api.frames_decoded", "API: Tokens read (ZeroMQ hop)"),
    ("api.mailbox_put", "API: split into the mailbox"),
    ("api.handler_took", "API: handler task woken"),
    ("api.response_start", "API: response headers written"),
    ("api.first_body_written", "API: first SSE event written"),
    ("client.response_hook", "httpx: response headers read"),
    ("client.first", "client parsed the first content_block_delta"),
]
LABELS = dict(STAGES)
ORDER = [s for s, _ in STAGES]


# --- the servers' stamps ----------------------------------------------------------------------

def read_traces(trace_dir: Path) -> tuple[dict[str, dict[str, float]], dict[str, str], list[str]]:
    """(stage -> key -> time, rid -> request id, wraps that found no target)."""
    stamps: dict[str, dict[str, float]] = {}
    rids: dict[str, str] = {}
    missing: list[str] = []
    for path in sorted(trace_dir.glob("*.tsv")):
        for line in path.read_text().splitlines():
            stage, key, t = line.split("\t")
            if stage == "rid":
                rid, _, request_id = key.partition("=")
                rids[rid] = request_id
            elif stage == "missing":
                missing.append(f"{path.name.split('-')[0]}: {key}")
            else:
                stamps.setdefault(stage, {}).setdefault(key, float(t))
    return stamps, rids, missing


def path_of(marks: dict[str, float], stamps: dict[str, dict[str, float]], request_id: str, rid: str | None) -> dict[str, float]:
    """Every stage this request reached, by stage name (API stages before the rid is known are keyed by request id)."""
    out = dict(marks)
    for stage, by_key in stamps.items():
        t = by_key.get(rid) if rid is not None and rid in by_key else by_key.get(request_id)
        if t is not None:
            out[stage] = t
    return out


def hops(times: dict[str, float]) -> list[tuple[str, float]]:
    """(stage reached, seconds since the previous stage reached), in path order."""
    present = [s for s in ORDER if s in times]
    return [(b, times[b] - times[a]) for a, b in zip(present, present[1:])]


# --- one model --------------------------------------------------------------------------------

def measure(path: str, name: str, reps: int, threads: int, cache: Path, ways: tuple[str, ...] = WAYS) -> dict[str, Any]:
    """`reps` rounds of one request each way (the baseline always among them), on a traced `loom serve` of its own."""
    ways = ("baseline", *[w for w in ways if w != "baseline"])
    trace_dir = Path(tempfile.mkdtemp(prefix="loom-ttft-"))
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "LOOM_TTFT_TRACE")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TRACE_DIR), saved["PYTHONPATH"]]))
    os.environ["LOOM_TTFT_TRACE"] = str(trace_dir)
    try:
        stack = Stack([path], cache / "logs", threads=threads)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    baseline = raw = raw_new = zq = None
    rounds: list[dict[str, Any]] = []
    try:
        log(f"{name}: starting loom serve on {stack.url} (traced to {trace_dir}); log {stack.log_path}")
        stack.wait_ready()
        baseline = Baseline(path, threads)
        prompt_tokens = baseline.info.get("prompt_tokens")
        raw, raw_new, zq = RawHttp(stack.port), RawHttp(stack.port, keep_alive=False), ZmqDirect(stack.frontend)
        load_start = loadavg()

        def one(way: str, tag: str) -> dict[str, Any]:
            request_id = f"ttft-{tag}-{way}"
            if way == "baseline":
                b = baseline.run(2)
                return {"way": way, "ttft_s": b["ttft_s"], "ttft_cpu_s": b.get("ttft_cpu_s")}
            rid = None
            if way == "httpx":
                marks = ask_httpx(stack.url, name, request_id)
            elif way == "raw":
                marks = raw.ask(name, request_id)
            elif way == "raw_new":
                marks = raw_new.ask(name, request_id)
            else:
                rid = f"ttft{uuid.uuid4().hex[:12]}"
                marks = zq.ask(name, rid, request_id)
            return {"way": way, "request_id": request_id, "rid": rid, "marks": marks,
                    "ttft_s": marks["client.first"] - marks["client.send"]}

        for i in range(3):  # warm-up: connections, first-call paths in every process
            for way in ways:
                one(way, f"warm{i}")
        log(f"{name}: {reps} rounds of {', '.join(ways)} (rotating order)")
        for i in range(reps):
            order = ways[i % len(ways):] + ways[:i % len(ways)]
            rounds.append({r["way"]: r for r in (one(way, str(i)) for way in order)})
        load_end = loadavg()
    finally:
        for c in (raw, raw_new, zq, baseline):
            if c is not None:
                c.close()
        stack.stop()
    stamps, rids, missing = read_traces(trace_dir)
    by_request = {request_id: rid for rid, request_id in rids.items()}
    return summarize(rounds, ways, stamps, by_request, missing, {"loadavg_start": load_start, "loadavg_end": load_end,
                                                            "prompt_tokens": prompt_tokens, "trace_dir": str(trace_dir)})


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": rnd(med(values)), "p10": rnd(pct(values, 10)), "p90": rnd(pct(values, 90)), "n": len(values)}


def summarize(rounds: list[dict[str, Any]], ways, stamps, by_request, missing, info) -> dict[str, Any]:
    """Per way: TTFT, its paired difference from the round's baseline, the path (TTFT minus the worker's own
    prefill forward) and each hop; and the robust overhead: the path's median plus the difference between the
    worker's and the baseline's prefill CPU time (the same computation on both sides unless this says otherwise;
    CPU time is far less disturbed by other processes than either side's wall time)."""
    out: dict[str, Any] = {**info, "missing_wraps": missing, "ways": {}}
    base_cpu = [r["baseline"]["ttft_cpu_s"] * 1e3 for r in rounds if r["baseline"].get("ttft_cpu_s") is not None]
    all_cpu: list[float] = []
    for way in ways[1:]:
        ttft, over, prefill, path_ms, cpu = [], [], [], [], []
        per_hop: dict[str, list[float]] = {}
        for rnd_ in rounds:
            r = rnd_[way]
            times = path_of(r["marks"], stamps, r["request_id"], r["rid"] or by_request.get(r["request_id"]))
            ttft.append(r["ttft_s"] * 1e3)
            over.append((r["ttft_s"] - rnd_["baseline"]["ttft_s"]) * 1e3)
            if "worker.prefill_start" in times and "worker.forward_done" in times:
                fwd = (times["worker.forward_done"] - times["worker.prefill_start"]) * 1e3
                prefill.append(fwd)
                path_ms.append(r["ttft_s"] * 1e3 - fwd)
            if "cpu.prefill" in times:
                cpu.append(times["cpu.prefill"] * 1e3)
            for stage, dt in hops(times):
                per_hop.setdefault(stage, []).append(dt * 1e3)
        out["ways"][way] = {
            "ttft_ms": spread(ttft), "overhead_ms": spread(over), "worker_prefill_forward_ms": spread(prefill),
            "ttft_minus_worker_forward_ms": spread(path_ms), "worker_prefill_cpu_ms": spread(cpu),
            "hops_ms": {stage: spread(v) for stage, v in sorted(per_hop.items(), key=lambda kv: ORDER.index(kv[0]))},
        }
        all_cpu += cpu
    out["baseline_ttft_ms"] = spread([r["baseline"]["ttft_s"] * 1e3 for r in rounds])
    out["baseline_cpu_ms"] = spread(base_cpu)
    out["worker_prefill_cpu_ms"] = spread(all_cpu)
    cpu_diff = med(all_cpu) - med(base_cpu) if all_cpu and base_cpu else None
    out["prefill_cpu_difference_ms"] = rnd(cpu_diff)
    for w in out["ways"].values():
        path_med = w["ttft_minus_worker_forward_ms"]["median"]
        w["robust_overhead_ms"] = rnd(path_med + cpu_diff) if path_med is not None and cpu_diff is not None else None
    out["rounds"] = rounds
    return out


def print_model(name: str, m: dict[str, Any]) -> None:
    b = m["baseline_ttft_ms"]
    print(f"\n{name}: load average {m['loadavg_start']} -> {m['loadavg_end']}; in-process baseline TTFT "
          f"{b['median']:.2f} ms (p10 {b['p10']:.2f}, p90 {b['p90']:.2f})")
    if m["missing_wraps"]:
        print(f"  (trace points not found: {', '.join(sorted(set(m['missing_wraps'])))})")
    if m.get("prefill_cpu_difference_ms") is not None:
        print(f"  prefill CPU time: worker {m['worker_prefill_cpu_ms']['median']:.2f} ms, baseline "
              f"{m['baseline_cpu_ms']['median']:.2f} ms (medians): difference {m['prefill_cpu_difference_ms']:+.2f} ms")
    print(f"  {'way':<7} {'TTFT ms':>22} {'- baseline ms':>22} {'worker prefill fwd':>22} {'TTFT - worker fwd':>22}"
          f" {'robust overhead':>16}")
    fmt = lambda s: f"{s['median']:.2f} [{s['p10']:.2f}, {s['p90']:.2f}]" if s["median"] is not None else "n/a"  # noqa: E731
    for way, w in m["ways"].items():
        robust = w["robust_overhead_ms"]
        print(f"  {way:<7} {fmt(w['ttft_ms']):>22} {fmt(w['overhead_ms']):>22} {fmt(w['worker_prefill_forward_ms']):>22} "
              f"{fmt(w['ttft_minus_worker_forward_ms']):>22} {'n/a' if robust is None else f'{robust:.2f}':>16}")
    print(f"  hops, median [p10, p90] ms:{'':<38}" + "".join(f"{way:>22}" for way in m["ways"]))
    for stage in ORDER:
        cells = [m["ways"][way]["hops_ms"].get(stage) for way in m["ways"]]
        if not any(cells):
            continue
        print(f"  {'-> ' + LABELS[stage]:<65}" + "".join(f"{fmt(c) if c else '':>22}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--reps", type=int, default=20, help="rounds per model (default %(default)s)")
    p.add_argument("--skip-big", action="store_true", help=f"only {SMALL}")
    p.add_argument("--only-big", action="store_true", help=f"only {BIG}")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the worker and the baseline (default: loom serve's rule, cpu_count - 1)")
    p.add_argument("--ways", default=",".join(WAYS[1:]),
                   help="ways to ask besides the baseline, comma-separated (default %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ttft_path.json")
    args = p.parse_args(argv)
    threads = args.threads or max(1, (os.cpu_count() or 1) - 1)
    names = [BIG] if args.only_big else [SMALL] if args.skip_big else [SMALL, BIG]
    made = make_models(names, args.cache_dir)
    if made is None:
        return 3
    r: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine_info(), "threads": threads,
                         "reps": args.reps, "models": {}}
    for name in names:
        try:
            r["models"][name] = measure(made["models"][name]["path"], name, args.reps, threads, args.cache_dir,
                                        tuple(w for w in args.ways.split(",") if w in WAYS))
        except Exception as exc:
            log(f"{name}: the stack did not serve: {exc}")
            return 2
    m = r["machine"]
    print(f"\nTTFT path ({args.reps} rounds), {m['cpu_count']} CPUs, {threads} torch thread(s) for the worker and the "
          f"baseline, commit {m['git_commit']}; greedy, max_tokens 2. Each way's median [p10, p90] over the rounds.")
    for name, model in r["models"].items():
        print_model(name, model)
    write_json(args.out, r)
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
