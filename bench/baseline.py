"""The in-process baseline: a manual KV-cache decode loop in its own process, driven over stdin."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from bench.common import ENTRY, MESSAGES, REPO, pct

def baseline_main(path: str, threads: int) -> None:
    """A persistent baseline process: loads the model once, then runs on request.

    Reads lines from stdin: "run N" generates N tokens greedily and prints one
    JSON line; "probe" prints the contention probe; EOF exits. Kept alive so
    the bench can alternate baseline and server runs under the same load.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    config = model.config
    import inspect

    # The worker's choice (workers/model_store.py): transformers 5 renamed past_key_values to cache.
    ckw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def one(n: int) -> dict[str, Any]:
        cache = DynamicCache(config=config)
        t0, cpu0 = time.perf_counter(), time.process_time()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{ckw: cache})
        nxt = int(out.logits[0, -1].argmax())
        times = [time.perf_counter()]
        ttft_cpu = time.process_time() - cpu0
        for _ in range(n - 1):
            out = model(input_ids=torch.tensor([[nxt]]), use_cache=True, logits_to_keep=1, **{ckw: cache})
            nxt = int(out.logits[0, -1].argmax())
            times.append(time.perf_counter())
        steps = [b - a for a, b in zip(times, times[1:])]
        return {"ttft_s": times[0] - t0, "ttft_cpu_s": ttft_cpu, "decode_tps": (n - 1) / (times[-1] - times[0]) if n > 1 else None,
                "step_ms_p50": pct(steps, 50) * 1e3 if steps else None,
                "step_ms_p99": pct(steps, 99) * 1e3 if steps else None}

    one(16)  # warm-up
    print(json.dumps({"ready": True, "threads": torch.get_num_threads(), "prompt_tokens": int(ids.shape[1])}),
          flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "run":
            print(json.dumps(one(int(cmd[1]))), flush=True)
        elif cmd[0] == "probe":
            print(json.dumps(contention_probe(torch, threads)), flush=True)
            torch.set_num_threads(threads)


class JsonLineProcess:
    """A persistent helper process that answers each line on its stdin with one JSON line.

    Its first line (read here, kept as .info) says it is ready.
    """

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{type(self).__name__}: the process exited ({self.proc.poll()})")
        return json.loads(line)

    def ask(self, line: str) -> dict[str, Any]:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()


class Baseline(JsonLineProcess):
    """Handle on a persistent baseline subprocess (see baseline_main)."""

    def __init__(self, path: str, threads: int):
        super().__init__([str(ENTRY), "--_baseline", path, "--threads", str(threads)])

    def run(self, tokens: int) -> dict[str, Any]:
        return self.ask(f"run {tokens}")

    def probe(self) -> dict[str, Any]:
        return self.ask("probe")


def contention_probe(torch, threads: int) -> dict[str, float]:
    """A 768x2048 matrix-vector product with 1 and with `threads` threads, in microseconds.

    On an idle machine more threads are no slower; when other processes hold
    the cores, OpenMP threads wait on each other and the multi-thread figure
    balloons. Read every other figure in the light of this one.
    """
    a, w = torch.randn(1, 768), torch.randn(768, 2048)
    out = {}
    for n in (1, threads):
        torch.set_num_threads(n)
        for _ in range(20):
            a @ w
        t0 = time.perf_counter()
        for _ in range(300):
            a @ w
        out[f"gemv_us_{n}_threads"] = round((time.perf_counter() - t0) / 300 * 1e6, 1)
    return out
