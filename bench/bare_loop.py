#!/usr/bin/env python
"""The bare batched decode loop: the ceiling a server on the same model can approach.

A persistent process (`python bench/bare_loop.py MODEL_PATH THREADS`) that
loads the model once and answers JSON lines on stdin, e.g.
{"batch": 64, "tokens": 200, "temperature": 0.8, "top_p": 1.0, "seed": 0},
with one JSON line: wall time, tok/s, and its CPU time split into the model's
forward passes and the sampling. Every row has the bench prompt (so no
padding, no attention mask), and sampling is what a plain transformers loop
does: temperature, a sorted top-p cut when top_p < 1, and one
torch.multinomial for the batch. With "stop_at_eos" a row that samples an
end-of-sequence token leaves the batch, as in the server (which does not
count that token either); otherwise every row runs every step.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.baseline import JsonLineProcess  # noqa: E402
from bench.common import MESSAGES  # noqa: E402
from workers.model_store import _eos_ids  # noqa: E402


def bare_main(path: str, threads: int) -> None:
    import inspect

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    prompt = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    # The worker's choice (workers/model_store.py): transformers 5 renamed past_key_values to cache.
    ckw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    eos = torch.tensor(sorted(_eos_ids(model, tok)), dtype=torch.long)

    def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(dim=-1)
        scores = logits.float() / temperature
        if top_p < 1.0:  # transformers' TopPLogitsWarper
            sorted_scores, order = scores.sort(dim=-1)
            remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
            remove[:, -1] = False
            scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
        return torch.multinomial(scores.softmax(dim=-1), 1, generator=gen)[:, 0]

    @torch.inference_mode()
    def run(batch: int, tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
            stop_at_eos: bool = False) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(seed)
        cache = DynamicCache(config=model.config)
        forward_cpu = sample_cpu = 0.0
        t0, c0 = time.perf_counter(), time.process_time()
        out = model(input_ids=prompt.expand(batch, -1), use_cache=True, logits_to_keep=1, **{ckw: cache})
        c1 = time.process_time()
        prefill_cpu = c1 - c0
        nxt = sample(out.logits[:, -1], temperature, top_p, gen)
        sample_cpu += time.process_time() - c1
        t_first = time.perf_counter()
        n = decoded = 0
        for step in range(tokens):
            if stop_at_eos:
                ended = torch.isin(nxt, eos)
                if bool(ended.any()):
                    keep = (~ended).nonzero()[:, 0]
                    for layer in cache.layers:  # as the worker does when rows leave
                        layer.keys, layer.values = layer.keys.index_select(0, keep), layer.values.index_select(0, keep)
                    nxt = nxt.index_select(0, keep)
            if nxt.numel() == 0:
                break
            nxt.tolist()  # a real loop looks at its tokens (stop checks, output)
            n += nxt.numel()
            if step == tokens - 1:
                break
            decoded += nxt.numel()
            c = time.process_time()
            out = model(input_ids=nxt[:, None], use_cache=True, logits_to_keep=1, **{ckw: cache})
            c1 = time.process_time()
            forward_cpu += c1 - c
            nxt = sample(out.logits[:, -1], temperature, top_p, gen)
            sample_cpu += time.process_time() - c1
        t_end, total_cpu = time.perf_counter(), time.process_time() - c0
        return {"batch": batch, "tokens": tokens, "generated": n, "wall_s": t_end - t0, "ttft_s": t_first - t0,
                "tps": n / (t_end - t0), "decode_tps": decoded / (t_end - t_first) if tokens > 1 else None,
                "prefill_cpu_s": prefill_cpu, "cpu_us_per_token": total_cpu / n * 1e6,
                "forward_cpu_us_per_token": (prefill_cpu + forward_cpu) / n * 1e6,
                "decode_forward_cpu_us_per_token": forward_cpu / decoded * 1e6 if decoded else None,
                "sample_cpu_us_per_token": sample_cpu / n * 1e6}

    run(2, 4, 0.8)  # warm-up
    print(json.dumps({"ready": True, "threads": torch.get_num_threads(), "prompt_tokens": int(prompt.shape[1])}),
          flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(run(**json.loads(line))), flush=True)


class BareLoop(JsonLineProcess):
    """Handle on a persistent bare-loop process."""

    def __init__(self, path: str, threads: int):
        super().__init__([str(Path(__file__).resolve()), path, str(threads)])

    def run(self, **kw: Any) -> dict[str, Any]:
        return self.ask(json.dumps(kw))


if __name__ == "__main__":
    bare_main(sys.argv[1], int(sys.argv[2]))
