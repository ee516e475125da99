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


def variants(hidden: int) -> dict[str, list[dict[str, Any]]]:
    import numpy as np

    def steer(seed: int) -> dict[str, Any]:
        vector = np.random.default_rng(seed).standard_normal(hidden).astype("<f4")
        return {"steering": [{"layer": 6, "vector": vector.tobytes(), "scale": 0.5, "op": "add", "positions": "all"}]}

    states = {"layers": [0, 6, -1], "positions": "generated"}
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a model directory (the 90M bench model)")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    from workers.model_store import load_model

    torch.set_num_threads(args.threads)
    lm = load_model("m", args.model, "float32", "cpu")
    cases = variants(lm.hidden_size)
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, extras in cases.items():
            runs[name].append(step_ms(lm, extras, args.steps))
    ms = {name: round(statistics.median(v), 2) for name, v in runs.items()}
    ratios = {name: round(ms[name.split(",")[0]] / ms[name], 3) for name in ms if "," in name}
    print(json.dumps({"ms_per_step": ms, "runs": {k: [round(x, 2) for x in v] for k, v in runs.items()},
                      "tok_s_ratio_to_plain": ratios, "threads": args.threads}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
