"""The worker's batching engine in-process, against transformers' own generate()."""
from __future__ import annotations

import torch

from loom import protocol as P
from tests.conftest import TOY
from workers.kv_cache import GROW_COLUMNS
from workers.model_store import load_model
from workers.runner import ModelRunner


def _run(runner: ModelRunner, frames: list) -> None:
    while runner.active:
        runner.step()


def test_batched_greedy_tokens_match_transformers_generate(model_dir):
    lm = load_model(TOY, str(model_dir / TOY), "float32", "cpu")
    frames: list = []
    runner = ModelRunner(lm, lambda msg, bufs: frames.append(msg))
    prompts = ["hello there", "a much longer prompt with many more words in it", "x"]
    # More tokens than the cache's spare columns, so its buffers must grow.
    n = GROW_COLUMNS + 20
    for i, prompt in enumerate(prompts):
        runner.admit(P.Generate(rid=str(i), model=TOY, prompt=prompt, max_tokens=n, temperature=0))
    _run(runner, frames)
    for i, prompt in enumerate(prompts):
        ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            expected = lm.model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)[0, ids.shape[1]:]
        text = "".join(f.text for f in frames if isinstance(f, P.Token) and f.rid == str(i))
        expected_text = lm.tokenizer.decode(expected, skip_special_tokens=True)
        assert text == expected_text, i
    finals = [f for f in frames if isinstance(f, P.Final)]
    assert sorted(f.rid for f in finals) == ["0", "1", "2"]
    assert all(f.completion_tokens == n and f.stop_reason == "max_tokens" for f in finals)
    assert runner.kv.cache is None  # every row left; nothing is held


def test_cancelled_row_leaves_at_the_next_step(model_dir):
    lm = load_model(TOY, str(model_dir / TOY), "float32", "cpu")
    frames: list = []
    runner = ModelRunner(lm, lambda msg, bufs: frames.append(msg))
    for rid in ("a", "b"):
        runner.admit(P.Generate(rid=rid, model=TOY, prompt="hi", max_tokens=1000, temperature=0))
    runner.step()
    runner.step()
    assert runner.cancel("a")
    before = sum(1 for f in frames if isinstance(f, P.Token) and f.rid == "a")
    runner.step()
    after = sum(1 for f in frames if isinstance(f, P.Token) and f.rid == "a")
    assert after == before and [s.rid for s in runner.rows] == ["b"]
