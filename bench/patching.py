"""Benchmark: a /patch sweep through the real server vs the same patched forwards one by one in-process.

On the 90M bench model (hidden 768, 12 layers; bench/README.md), a sweep over
all 12 layers x 4 components (48 patched runs, every position) is sent to a
real `loom serve` (API, broker, worker processes) and timed from the client:
the whole request, the clean and corrupted runs included. The baseline, in
its own process with the same torch thread count, runs the same 48 patched
forwards one at a time (batch 1, forward hooks, `logits_to_keep=1`) and is
timed over those 48 forwards only. Runs alternate (baseline, server, ...) so
both see the same background load; the figure is the median of the per-pair
ratios server / baseline (target <= 0.6). The two sides' logit differences
are compared too (they must agree to 1e-3), for an answer pair the baseline
picks so that they are not 0 by construction (the clean run's top token, the
corrupted run's best other token).

Also measured: while a sweep runs, a streaming request's largest gap between
two tokens, next to its median gap alone: how long a sweep holds up a stream.

    .venv/bin/python bench/patching.py            # ~3-5 minutes on 2 cores
    .venv/bin/python bench/patching.py --reps 5 --out /tmp/patch.json

Figures, not assertions: the exit code is 0 unless the model or the stack
could not be made (3, 2).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402  (bench/throughput.py: the stack, the model maker, small helpers)

# Same length in tokens on the bench model's tokenizer (19 and 40), different digits.
PROMPTS = {
    "short": ("The capital of France is Paris. Count from 1 to 5, then tell me",
              "The capital of France is Paris. Count from 1 to 3, then tell me"),
    "long": ("Hello! How are you today? The capital of France is Paris. Count from 1 to 5, then tell me a long "
             "story about the sea",
             "Hello! How are you today? The capital of France is Paris. Count from 1 to 3, then tell me a long "
             "story about the sea"),
}
COMPONENTS = ["resid_pre", "resid_post", "attn_out", "mlp_out"]
TARGET = 0.6


# --- the baseline process ----------------------------------------------------------------

def baseline_main(path: str, threads: int) -> None:
    """Reads "run NAME" lines; runs that prompt pair's 48 patched forwards one by one; prints one JSON line."""
    import torch

    from workers.model_store import load_model
    from workers.patch_hooks import hooked, reader, writer
    from workers.patch_plan import decoder_blocks

    torch.set_num_threads(threads)
    lm = load_model("baseline", path, "float32", "cpu")
    model, blocks = lm.model, decoder_blocks(lm)
    runs = [(layer, c) for layer in range(lm.num_layers) for c in COMPONENTS]

    def one_token(ranked: torch.Tensor, unlike: str | None = None) -> str:
        """The best-ranked token whose text is that one token again (and not `unlike`)."""
        for token in ranked.tolist():
            text = lm.tokenizer.decode([token])
            if text != unlike and lm.tokenizer(text, add_special_tokens=False)["input_ids"] == [token]:
                return text
        raise RuntimeError("no token survives decode and encode")

    @torch.inference_mode()
    def answers(name: str) -> tuple[str, str]:
        """The clean run's top token, and the corrupted run's best other one: a logit difference that is
        not 0 by construction (the random model's two prompts may share their top token)."""
        clean, corrupted = (torch.tensor([lm.tokenizer(p)["input_ids"]]) for p in PROMPTS[name])
        answer = one_token(model(input_ids=clean).logits[0, -1].argsort(descending=True))
        return answer, one_token(model(input_ids=corrupted).logits[0, -1].argsort(descending=True), unlike=answer)

    chosen = {name: answers(name) for name in PROMPTS}

    @torch.inference_mode()
    def sweep(name: str) -> dict[str, Any]:
        clean, corrupted = (torch.tensor([lm.tokenizer(p)["input_ids"]]) for p in PROMPTS[name])
        positions = torch.arange(clean.shape[1])
        acts: dict = {}
        with hooked(blocks, [(run, reader(acts, run, 0, positions)) for run in runs]):
            model(input_ids=clean, logits_to_keep=1)
        a, w = (lm.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in chosen[name])
        diffs = []
        t0 = time.perf_counter()
        for run in runs:
            with hooked(blocks, [(run, writer(0, positions, acts[run]))]):
                logits = model(input_ids=corrupted, logits_to_keep=1).logits[0, -1]
            diffs.append(float(logits[a] - logits[w]))
        return {"seconds": time.perf_counter() - t0, "diffs": diffs, "prompt_tokens": int(clean.shape[1])}

    sweep("short")  # warm-up
    print(json.dumps({"ready": True, "threads": torch.get_num_threads(), "answers": chosen}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd and cmd[0] == "run":
            print(json.dumps(sweep(cmd[1])), flush=True)


class Baseline(tp.Baseline):
    def __init__(self, path: str, threads: int):  # noqa: super().__init__ would start throughput's baseline
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_baseline", path,
                                      "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=tp.REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self.info = self._read()

    def sweep(self, name: str) -> dict[str, Any]:
        self.proc.stdin.write(f"run {name}\n")
        self.proc.stdin.flush()
        return self._read()


# --- the server side -------------------------------------------------------------------------

def server_sweep(client, model: str, name: str, answers: tuple[str, str] | None = None) -> dict[str, Any]:
    clean, corrupted = PROMPTS[name]
    body = {"model": model, "clean": clean, "corrupted": corrupted, "components": COMPONENTS}
    if answers is not None:
        body["answer"], body["wrong_answer"] = answers
    t0 = time.perf_counter()
    r = client.post("/patch", json=body)
    seconds = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"/patch answered {r.status_code}: {r.text[:500]}")
    body = r.json()
    return {"seconds": seconds, "diffs": [row["logit_diff"] for row in body["results"]],
            "worker_ms": body["metadata"]["time_ms"], "batches": body["metadata"]["batches"]}


def compare(stack: tp.Stack, baseline: Baseline, model: str, name: str, reps: int) -> dict[str, Any]:
    import httpx

    with httpx.Client(base_url=stack.url, timeout=600) as client:
        answers = baseline.info["answers"][name]
        server_sweep(client, model, name, answers)  # warm-up
        pairs = []
        for _ in range(reps):
            b = baseline.sweep(name)
            s = server_sweep(client, model, name, answers)
            pairs.append({"baseline_s": b["seconds"], "server_s": s["seconds"], "ratio": s["seconds"] / b["seconds"],
                          "worker_ms": s["worker_ms"], "batches": s["batches"],
                          "max_abs_diff": max(abs(x - y) for x, y in zip(s["diffs"], b["diffs"]))})
            tp.log(f"  {name}: baseline {b['seconds']:.2f}s, server {s['seconds']:.2f}s "
                   f"(ratio {pairs[-1]['ratio']:.2f}, batches {s['batches']})")
    return {"prompt_tokens": b["prompt_tokens"], "pairs": pairs, "ratio": tp.med([p["ratio"] for p in pairs]),
            "baseline_s": tp.med([p["baseline_s"] for p in pairs]), "server_s": tp.med([p["server_s"] for p in pairs]),
            "max_abs_diff": max(p["max_abs_diff"] for p in pairs)}


def stream_gaps(stack: tp.Stack, model: str, during_sweep: bool) -> dict[str, Any]:
    """A 48-token greedy stream's inter-token gaps, alone or while a short-prompt sweep runs."""
    import httpx

    sweep: dict[str, Any] = {}

    def run_sweep() -> None:
        with httpx.Client(base_url=stack.url, timeout=600) as client:
            sweep.update(server_sweep(client, model, "short"))

    thread = threading.Thread(target=run_sweep) if during_sweep else None
    if thread is not None:
        thread.start()
        time.sleep(0.3)  # the sweep is under way when the stream starts
    _, _, results = tp.http_streams(stack.url, model, 1, 48)
    if thread is not None:
        thread.join()
    arrivals = results[0]["arrivals"]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"tokens": len(arrivals), "gap_ms_p50": tp.med(gaps) * 1e3, "gap_ms_max": max(gaps) * 1e3,
            "sweep_s": sweep.get("seconds")}


# --- main -------------------------------------------------------------------------------------

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="alternating baseline/server pairs per prompt (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the worker and the baseline (default: loom serve's rule, cpu_count - 1)")
    p.add_argument("--cache-dir", type=Path, default=tp.DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=tp.BENCH / "results" / "patching.json")
    p.add_argument("--_baseline", help=argparse.SUPPRESS)
    args = p.parse_args()
    threads = args.threads or max(1, (os.cpu_count() or 1) - 1)
    if args._baseline:
        baseline_main(args._baseline, threads)
        return 0
    results: dict[str, Any] = {"machine": tp.machine_info(), "threads": threads, "loadavg_start": tp.loadavg()}
    try:
        made = tp.run_json_subprocess(["--_make-models", tp.BIG, "--cache-dir", str(args.cache_dir)], timeout=900)
    except Exception as exc:
        tp.log(f"could not make the model: {exc}")
        return 3
    info = made["models"][tp.BIG]
    stack = tp.Stack([info["path"]], args.cache_dir / "logs", threads=threads)
    baseline = None
    try:
        tp.log(f"starting loom serve ({stack.url}) and the baseline, {threads} thread(s) each")
        try:
            stack.wait_ready()
        except Exception as exc:
            tp.log(f"the stack did not start: {exc}")
            return 2
        baseline = Baseline(info["path"], threads)
        for name in PROMPTS:
            tp.log(f"sweep of 12 layers x 4 components, {name} prompts, {args.reps} pairs")
            results[name] = compare(stack, baseline, tp.BIG, name, args.reps)
        baseline.close()
        baseline = None
        tp.log("a stream alone, then during a sweep")
        results["stream_alone"] = stream_gaps(stack, tp.BIG, during_sweep=False)
        results["stream_during_sweep"] = stream_gaps(stack, tp.BIG, during_sweep=True)
    finally:
        if baseline is not None:
            baseline.close()
        stack.stop()
    results["loadavg_end"] = tp.loadavg()
    report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nJSON: {args.out}")
    return 0


def report(r: dict[str, Any]) -> None:
    m = r["machine"]
    print(f"\n/patch sweep, llama-90m, 12 layers x 4 components = 48 patched runs, every position; "
          f"{m['cpu_count']} CPUs ({m['cpu_model']}), {r['threads']} thread(s); load {r['loadavg_start']} -> "
          f"{r['loadavg_end']}")
    print(f"{'prompts':<8} {'tokens':>6} {'baseline s':>10} {'server s':>9} {'ratio':>6} {'target':>7} {'met':>4} "
          f"{'max |diff|':>10}")
    for name in PROMPTS:
        x = r[name]
        print(f"{name:<8} {x['prompt_tokens']:>6} {x['baseline_s']:>10.2f} {x['server_s']:>9.2f} {x['ratio']:>6.2f} "
              f"{'<= ' + str(TARGET):>7} {'yes' if x['ratio'] <= TARGET else 'NO':>4} {x['max_abs_diff']:>10.1e}")
    alone, during = r["stream_alone"], r["stream_during_sweep"]
    print(f"stream inter-token gap: alone p50 {alone['gap_ms_p50']:.0f} ms, max {alone['gap_ms_max']:.0f} ms; "
          f"during a sweep p50 {during['gap_ms_p50']:.0f} ms, max {during['gap_ms_max']:.0f} ms "
          f"(the sweep took {during['sweep_s'] or 0:.2f} s)")


if __name__ == "__main__":
    sys.exit(main())
