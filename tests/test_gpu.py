"""The worker on a CUDA device (skipped where torch sees none; see the `gpu` marker in conftest).

The batch on the GPU gives transformers' own greedy tokens; a steady decode
step makes one host sync outside the model's forward (the sampled tokens),
whatever the batch size; streamed hidden states (copied through pinned
memory, one copy per step) match the CPU worker's.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from loom import protocol as P
from tests.conftest import TOY
from tests.test_runner import _run
from workers.model_store import load_model
from workers.runner import ModelRunner

pytestmark = pytest.mark.gpu


def test_batched_greedy_tokens_on_the_gpu_match_transformers_generate(model_dir):
    lm = load_model(TOY, str(model_dir / TOY), "float32", "cuda:0")
    frames: list = []
    runner = ModelRunner(lm, lambda msg, bufs: frames.append(msg))
    prompts = ["hello there", "a much longer prompt with many more words in it", "x"]
    lengths = [40, 25, 60]  # rows leave at different steps
    for i, (prompt, n) in enumerate(zip(prompts, lengths)):
        runner.admit(P.Generate(rid=str(i), model=TOY, prompt=prompt, max_tokens=n, temperature=0))
    _run(runner, frames)
    for i, (prompt, n) in enumerate(zip(prompts, lengths)):
        ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"].to("cuda:0")
        with torch.inference_mode():
            expected = lm.model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)[0, ids.shape[1]:]
        text = "".join(f.text for f in frames if isinstance(f, P.Token) and f.rid == str(i))
        assert text == lm.tokenizer.decode(expected, skip_special_tokens=True), i


def test_a_decode_step_syncs_the_host_once_outside_the_forward(model_dir):
    lm = load_model(TOY, str(model_dir / TOY), "float32", "cuda:0")
    runner = ModelRunner(lm, lambda msg, bufs: None)
    forward = runner._forward

    def forward_unwatched(*args, **kwargs):
        # The model's own forward is transformers' business: only Loom's code is counted.
        torch.cuda.set_sync_debug_mode(0)
        try:
            return forward(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("warn")

    runner._forward = forward_unwatched
    for batch in (1, 16):
        for i in range(batch):
            runner.admit(P.Generate(rid=f"{batch}-{i}", model=TOY, prompt="hello there", max_tokens=30,
                                    temperature=0.8, top_p=1.0, seed=i))
        runner.step()  # prefill: the rows join
        runner.step()
        try:
            for _ in range(5):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    runner.step()
                    torch.cuda.set_sync_debug_mode(0)
                syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
                assert len(syncs) <= 1, (batch, [str(w.message) for w in syncs])
        finally:
            torch.cuda.set_sync_debug_mode(0)
        _run(runner, [])


def _streamed(device: str, model_dir) -> tuple[str, dict[int, list[np.ndarray]]]:
    lm = load_model(TOY, str(model_dir / TOY), "float32", device)
    frames: list = []
    runner = ModelRunner(lm, lambda msg, bufs: frames.append((msg, bufs)))
    for i in range(4):
        runner.admit(P.Generate(rid=str(i), model=TOY, prompt=f"prompt number {i}", max_tokens=12, temperature=0,
                                layers=[1, -1], positions="generated"))
    _run(runner, frames)
    text, states = "", {}
    for msg, bufs in frames:
        if isinstance(msg, P.Token) and msg.rid == "2":
            text += msg.text
            for spec, buf in zip(msg.arrays, bufs):
                states.setdefault(spec["layer"], []).append(np.frombuffer(buf, dtype=np.float32).copy())
    return text, states


def test_streamed_states_through_pinned_memory_match_the_cpu_worker(model_dir):
    cpu_text, cpu_states = _streamed("cpu", model_dir)
    gpu_text, gpu_states = _streamed("cuda:0", model_dir)
    assert gpu_text == cpu_text and cpu_states.keys() == gpu_states.keys()
    for layer in cpu_states:
        assert len(gpu_states[layer]) == len(cpu_states[layer])
        for a, b in zip(cpu_states[layer], gpu_states[layer]):
            np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4)
