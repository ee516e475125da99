#!/usr/bin/env python
"""What per-token states and steering cost per decode step, inside the worker's own loop.

No HTTP, no sockets, no other process: a ModelRunner steps a batch on one
torch thread (a CPU worker's share on 2 cores) and every message it emits is
encoded as it would be for the wire. Variants alternate round by round, so
they see the same background load; the figure is each variant's median CPU
milliseconds per decode step (this thread's CPU time) and its ratio to the
plain batch of the same size. bench/activations.py runs it in a subprocess (`--only steps`), or:

    python bench/activation_steps.py --model bench/.cache/models/llama-90m
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def variants(hidden: int, layers: int) -> dict[str, list[dict[str, Any]]]:
    middle = layers // 2
    import numpy as np

    def steer(seed: int) -> dict[str, Any]:
        vector = np.random.default_rng(seed).standard_normal(hidden).astype("<f4")
        return {"steering": [{"layer": middle, "vector": vector.tobytes(), "scale": 0.5, "op": "add",
                              "positions": "all"}]}

    states = {"layers": [0, middle, -1], "positions": "generated"}
    return {
        "1 row": [{}], "1 row, states of 3 layers": [states], "1 row, steered": [steer(0)],
        "8 rows": [{}] * 8, "8 rows, states of 3 layers": [states] * 8,
        "8 rows, 4 steered": [steer(i) if i % 2 else {} for i in range(8)],
    }


def step_ms(lm: Any, extras: list[dict[str, Any]], steps: int) -> float:
    """Median CPU milliseconds of this thread per decode step (torch runs on it with one thread):
    what the step computes, less sensitive than wall time to a machine others keep busy."""
    from loom import protocol as P
    from workers.runner import ModelRunner

    runner = ModelRunner(lm, lambda msg, buffers: P.encode(msg, buffers))  # the wire encoding, as the worker does
    for i, extra in enumerate(extras):
        runner.admit(P.Generate(rid=str(i), model="m", prompt=f"Hello number {i}, tell me a long story.",
                                max_tokens=steps + 8, temperature=0, **extra))
    runner.step()  # the prefill
    times = []
    for _ in range(steps):
        t0 = time.thread_time()
        runner.step()
        times.append(time.thread_time() - t0)
        if len(runner.rows) != len(extras):  # a row ended its turn: the batch is no longer comparable
            break
    return statistics.median(times) * 1e3


def peak_rss_mb(lm: Any, extra: dict[str, Any], tokens: int) -> float:
    """This process's peak RSS while one request streams `tokens` tokens (sampled every 50 ms)."""
    import threading

    import psutil

    from loom import protocol as P
    from workers.runner import ModelRunner

    proc = psutil.Process()
    peak = [proc.memory_info().rss]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.05)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    runner = ModelRunner(lm, lambda msg, buffers: P.encode(msg, buffers))
    runner.admit(P.Generate(rid="r", model="m", prompt="Hello, tell me a long story.", max_tokens=tokens,
                            temperature=0, **extra))
    while runner.active:
        runner.step()
    done.set()
    watcher.join()
    return peak[0] / 2**20


def embed_seconds(lm: Any, texts: list[str], together: bool) -> float:
    """Wall seconds for the worker alone to embed `texts`: all admitted at once (prefilled in groups), or one by one."""
    from loom import protocol as P
    from workers.runner import ModelRunner

    runner = ModelRunner(lm, lambda msg, buffers: P.encode(msg, buffers))
    t0 = time.perf_counter()
    for i, text in enumerate(texts):
        runner.admit(P.Generate(rid=str(i), model="m", prompt=text, layers=[-1], pooling="last_token"))
        if not together:
            while runner.active:
                runner.step()
    while runner.active:
        runner.step()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a model directory (the 90M bench model)")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--embed", action="store_true",
                   help="also: 64 texts embedded together ÷ one by one, in the worker alone (short texts, sentences)")
    p.add_argument("--rss-tokens", type=int, default=0,
                   help="also: peak RSS over streams of this many tokens, without / with states of 3 layers, twice")
    args = p.parse_args(argv)
    import torch

    from workers.model_store import load_model

    torch.set_num_threads(args.threads)
    lm = load_model("m", args.model, "float32", "cpu")
    cases = variants(lm.hidden_size, lm.num_layers)
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, extras in cases.items():
            runs[name].append(step_ms(lm, extras, args.steps))
    ms = {name: round(statistics.median(v), 2) for name, v in runs.items()}
    ratios = {name: round(ms[name.split(",")[0]] / ms[name], 3) for name in ms if "," in name}
    out: dict[str, Any] = {"ms_per_step": ms, "runs": {k: [round(x, 2) for x in v] for k, v in runs.items()},
                           "tok_s_ratio_to_plain": ratios, "threads": args.threads}
    if args.embed:
        sets = {"short texts": [f"word {i}" for i in range(64)],
                "sentences": [f"Sentence number {i}: the quick brown fox jumps over the lazy dog near the river bank."
                              for i in range(64)]}
        out["embed_together_over_one_by_one"] = {}
        for name, texts in sets.items():
            pairs = [(embed_seconds(lm, texts, True), embed_seconds(lm, texts, False)) for _ in range(2)]
            tokens = len(lm.tokenizer(texts[0])["input_ids"])
            out["embed_together_over_one_by_one"][name] = {
                "tokens_per_text": tokens, "seconds": [[round(a, 2), round(b, 2)] for a, b in pairs],
                "ratio": round(statistics.median(a / b for a, b in pairs), 3)}
    if args.rss_tokens:
        states = {"layers": [0, lm.num_layers // 2, -1], "positions": "generated"}
        peaks = {"without": [], "with states": []}
        for _ in range(2):  # the first stream also sizes the allocator: compare the later ones
            peaks["without"].append(round(peak_rss_mb(lm, {}, args.rss_tokens), 1))
            peaks["with states"].append(round(peak_rss_mb(lm, states, args.rss_tokens), 1))
        out["peak_rss_mb"] = peaks
        out["peak_with_minus_without_mb"] = round(peaks["with states"][-1] - max(peaks["without"]), 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
