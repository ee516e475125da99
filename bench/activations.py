#!/usr/bin/env python
"""Activations benchmark (issues 10 and 11): per-token hidden states, embeddings and steering at batch speed.

Starts the real stack (`loom serve`, its own process group, stopped in a
`finally`) on the 90M bench model (bench/README.md) and measures, each ratio
against a baseline taken in the same run, alternating so both see the same
background load:

1. one stream of 128 tokens, base64: tok/s with per-token states of 1 and of 3
   layers ÷ tok/s without (target >= 0.9);
2. 8 concurrent streams with per-token states of 3 layers ÷ without (>= 0.85);
3. worker RSS over a 2000-token stream with per-token states of 3 layers,
   beyond the same stream without states (<= +50 MB);
4. bytes on the wire per token and layer (SSE, base64 and list), at hidden 768;
5. /embed/batch of 64 texts ÷ 64 single /embed calls in sequence (<= 0.3 of the time);
6. steering: a steered stream ÷ an unsteered one (>= 0.95), and 8 streams of
   which 4 are steered ÷ 8 unsteered (>= 0.9);
7. the same costs inside the worker's loop alone (bench/activation_steps.py:
   CPU milliseconds per decode step, no HTTP, no other process), a figure a
   busy machine disturbs less than end-to-end tok/s.

    python bench/activations.py            # ~6-8 minutes on 2 cores
    python bench/activations.py --quick    # shorter streams, fewer repetitions

Figures, not assertions: the exit code is 0 unless the model cannot be made (3) or the stack cannot start.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import BIG, DEFAULT_CACHE, MESSAGES, log, machine_info, make_models, rnd, write_json  # noqa: E402
from bench.stack import Stack  # noqa: E402

THREE_LAYERS = [0, 6, -1]


# --- clients -----------------------------------------------------------------------------------

async def _stream(client: Any, body: dict[str, Any]) -> dict[str, Any]:
    """One SSE stream: arrival time of each content_block_delta, bytes received, the final event."""
    arrivals: list[float] = []
    size = 0
    final: dict[str, Any] = {}
    buf = b""
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"}
        async for chunk in r.aiter_raw():
            now = time.perf_counter()
            size += len(chunk)
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if event.startswith(b"event: content_block_delta"):
                    arrivals.append(now)
                elif event.startswith((b"event: message_delta", b"event: error")):
                    final = json.loads(event.split(b"data: ", 1)[1])
    tokens = (final.get("usage") or {}).get("completion_tokens", 0)
    decode = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 2 else None
    return {"arrivals": arrivals, "bytes": size, "tokens": tokens, "decode_tps": decode,
            "error": final.get("error") if final.get("type") == "error" else None}


def streams(url: str, bodies: list[dict[str, Any]]) -> tuple[float, list[dict[str, Any]]]:
    """Run the bodies as concurrent streams; (aggregate tok/s first send -> last token, each result)."""
    import httpx

    async def run() -> tuple[float, list[dict[str, Any]]]:
        limits = httpx.Limits(max_connections=len(bodies) + 4)
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600, connect=10), limits=limits) as c:
            t0 = time.perf_counter()
            results = await asyncio.gather(*(_stream(c, b) for b in bodies))
            last = max((r["arrivals"][-1] for r in results if r.get("arrivals")), default=t0)
            return sum(r.get("tokens", 0) for r in results) / max(last - t0, 1e-9), results

    return asyncio.run(run())


def body(model: str, tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "max_tokens": tokens, "temperature": 0, **extra}


def states(layers: list[int], fmt: str = "base64") -> dict[str, Any]:
    return {"return_hidden_states": True, "hidden_state_layers": layers, "hidden_state_positions": "generated",
            "hidden_state_format": fmt}


def steering(hidden: int, seed: int, scale: float = 0.5) -> dict[str, Any]:
    import random

    rng = random.Random(seed)
    import struct

    vector = struct.pack(f"<{hidden}f", *(rng.gauss(0, 1) for _ in range(hidden)))
    return {"steering": [{"layer": 6, "vector": base64.b64encode(vector).decode(), "dtype": "float32",
                          "scale": scale, "op": "add", "positions": "all"}]}


def median_ratio(pairs: list[tuple[float | None, float | None]]) -> float | None:
    ratios = [a / b for a, b in pairs if a and b]
    return rnd(statistics.median(ratios)) if ratios else None


# --- the figures -----------------------------------------------------------------------------

def bench_single(url: str, model: str, tokens: int, reps: int, variants: dict[str, dict]) -> dict[str, Any]:
    """Decode tok/s of one stream per variant (the first is the baseline), alternating, and each ÷ the first."""
    runs: dict[str, list[float | None]] = {k: [] for k in variants}
    streams(url, [body(model, 8)])  # warm-up
    for _ in range(reps):
        for name, extra in variants.items():  # alternating: each round sees the same load
            _, [res] = streams(url, [body(model, tokens, **extra)])
            runs[name].append(res.get("decode_tps"))
    base = list(variants)[0]
    return {"tok_s": {k: [rnd(v, 1) for v in vs] for k, vs in runs.items()},
            "ratios": {k: median_ratio(list(zip(runs[k], runs[base]))) for k in list(variants)[1:]}}


def bench_concurrent(url: str, model: str, tokens: int, reps: int, variants: dict[str, list[dict]]) -> dict[str, Any]:
    runs: dict[str, list[float]] = {k: [] for k in variants}
    counts: dict[str, list[int]] = {k: [] for k in variants}
    for _ in range(reps):
        for name, extras in variants.items():
            agg, results = streams(url, [body(model, tokens, **e) for e in extras])
            errors = [r["error"] for r in results if r.get("error")]
            if errors:
                log(f"  {name}: errors {errors[:2]}")
            runs[name].append(agg)
            counts[name].append(sum(r.get("tokens", 0) for r in results))
    names = list(variants)
    # Tokens per run: a row that ends its turn early leaves a smaller batch, which is not slower per token.
    return {"aggregate_tok_s": {k: [rnd(v, 1) for v in vs] for k, vs in runs.items()}, "tokens": counts,
            "ratio": median_ratio(list(zip(runs[names[1]], runs[names[0]])))}


def bench_rss(stack: Stack, model: str, tokens: int, info: dict[str, Any]) -> dict[str, Any]:
    hidden = info["hidden_size"]

    def peak_during(extra: dict[str, Any]) -> tuple[float, float, dict[str, Any]]:
        before = stack.workers_rss()
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], stack.workers_rss())
                except Exception:
                    pass
                done.wait(0.05)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            _, [res] = streams(stack.url, [body(model, tokens, **extra)])
        finally:
            done.set()
            th.join()
        return before / 2**20, peak[0] / 2**20, res

    before_plain, peak_plain, plain = peak_during({})
    time.sleep(0.5)
    before_states, peak_states, with_states = peak_during(states(THREE_LAYERS))
    time.sleep(0.5)
    after = stack.workers_rss() / 2**20
    kept = with_states["tokens"] * len(THREE_LAYERS) * hidden * 4 / 2**20
    kv = 2 * info["layers"] * info["kv_heads"] * info["head_dim"] * (tokens + 40) * 4 / 2**20
    return {"tokens": [plain["tokens"], with_states["tokens"]],
            "worker_rss_mb": {"before_plain": rnd(before_plain, 1), "peak_plain": rnd(peak_plain, 1),
                              "before_states": rnd(before_states, 1), "peak_states": rnd(peak_states, 1),
                              "after": rnd(after, 1)},
            "growth_plain_mb": rnd(peak_plain - before_plain, 1),
            "growth_states_mb": rnd(peak_states - before_states, 1),
            # What the states cost: the same stream's peak with them minus its peak without.
            "peak_states_minus_peak_plain_mb": rnd(peak_states - peak_plain, 1),
            "kv_cache_mb": rnd(kv, 1), "states_if_kept_mb": rnd(kept, 1)}


def bench_wire(url: str, model: str, tokens: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _, [plain] = streams(url, [body(model, tokens)])
    for fmt in ("base64", "list"):
        _, [res] = streams(url, [body(model, tokens, **states(THREE_LAYERS, fmt))])
        extra_bytes = res["bytes"] - plain["bytes"]
        out[f"sse_bytes_per_token_layer_{fmt}"] = rnd(extra_bytes / max(res["tokens"], 1) / len(THREE_LAYERS), 1)
    return out


def bench_embed(url: str, model: str, n: int, reps: int, long: bool) -> dict[str, Any]:
    """Batch vs sequential embeddings of short texts (a few tokens) or sentences (~20 tokens)."""
    import httpx

    if long:
        texts = [f"Sentence number {i}: the quick brown fox jumps over the lazy dog near the river bank."
                 for i in range(n)]
    else:
        texts = [f"word {i}" for i in range(n)]
    pairs = []
    with httpx.Client(base_url=url, timeout=600) as c:
        c.post("/embed/batch", json={"model": model, "texts": texts[:4]})  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            r = c.post("/embed/batch", json={"model": model, "texts": texts, "hidden_state_format": "base64"})
            batch = time.perf_counter() - t0
            assert r.status_code == 200, r.text[:300]
            t0 = time.perf_counter()
            for text in texts:
                c.post("/embed", json={"model": model, "text": text, "hidden_state_format": "base64"})
            single = time.perf_counter() - t0
            pairs.append((batch, single))
    return {"texts": n, "batch_s": [rnd(b) for b, _ in pairs], "sequential_s": [rnd(s) for _, s in pairs],
            "ratio": median_ratio(pairs)}


# --- main ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter runs (fewer repetitions, 400-token RSS stream)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "activations.json")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--only", nargs="*", default=None,
                   help="figures to run: single concurrent rss wire embed steering steps (default: all)")
    args = p.parse_args(argv)
    reps = 2 if args.quick else 5
    only = set(args.only or ["single", "concurrent", "rss", "wire", "embed", "steering", "steps"])
    made = make_models([BIG], args.cache_dir)  # in a subprocess: this process never imports torch
    if made is None:
        return 3
    info = made["models"][BIG]
    log(f"model {BIG}: hidden {info['hidden_size']}, {info['layers']} layers, {info['parameters_m']}M parameters")
    stack = Stack([info["path"]], args.cache_dir / "logs")
    results: dict[str, Any] = {"machine": machine_info(), "model": info}
    try:
        stack.wait_ready()
        model = Path(info["path"]).name
        hidden = info["hidden_size"]
        if "single" in only:
            log("1 stream x 128 tokens: none / 1 layer / 3 layers of per-token states (base64)")
            results["single"] = bench_single(stack.url, model, 128, reps, {
                "none": {}, "1 layer": states([-1]), "3 layers": states(THREE_LAYERS)})
            log(f"  {results['single']}")
        if "concurrent" in only:
            log("8 streams x 128 tokens: without / with per-token states of 3 layers")
            results["concurrent"] = bench_concurrent(stack.url, model, 128, max(2, reps // 2), {
                "without": [{}] * 8, "with states": [states(THREE_LAYERS)] * 8})
            log(f"  {results['concurrent']}")
        if "rss" in only:
            tokens = 400 if args.quick else 2000
            log(f"worker RSS over a {tokens}-token stream, without then with per-token states of 3 layers")
            results["rss"] = bench_rss(stack, model, tokens, info)
            log(f"  {results['rss']}")
        if "wire" in only:
            results["wire"] = bench_wire(stack.url, model, 64)
            log(f"  bytes on the wire: {results['wire']} (raw float32 row: {hidden * 4} bytes)")
        if "embed" in only:
            log("/embed/batch of 64 texts vs 64 sequential /embed")
            results["embed"] = {length: bench_embed(stack.url, model, 64, max(2, reps // 2 + 1), length == "sentences")
                                for length in ("short texts", "sentences")}
            log(f"  {results['embed']}")
        if "steering" in only:
            log("steering: 1 stream steered vs not; 8 streams, 4 steered, vs 8 unsteered")
            single = bench_single(stack.url, model, 128, reps, {"unsteered": {}, "steered": steering(hidden, 0)})
            mixed = [steering(hidden, i) if i % 2 else {} for i in range(8)]
            eight = bench_concurrent(stack.url, model, 128, max(2, reps // 2),
                                     {"unsteered": [{}] * 8, "half steered": mixed})
            results["steering"] = {"single": single, "eight": eight}
            log(f"  {results['steering']}")
    finally:
        stack.stop()
    if "steps" in only:
        log("inside the worker's loop: CPU ms per decode step, plain / states / steered")
        proc = subprocess.run([sys.executable, str(REPO / "bench" / "activation_steps.py"), "--model", info["path"],
                               "--rounds", "2" if args.quick else "5", "--rss-tokens", "400" if args.quick else "2000", "--embed"],
                              capture_output=True, text=True, timeout=3600)
        results["steps"] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
            "error": proc.stderr[-2000:]}
        log(f"  {results['steps']}")
    write_json(args.out, results)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
