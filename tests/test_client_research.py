"""The Python client on the research surface, against a real stack: numpy arrays and typed events."""
from __future__ import annotations

import asyncio

import numpy as np

from loom.client import (AsyncLoomClient, BatchError, GenerateResult, HiddenStates, LogitLens, LoomClient,
                         MessageDelta, TextDelta)
from tests.reference import assert_close

PROMPT = "Hello"


def test_generate_arrays_logprobs_and_lens(stack, ref):
    run = ref.greedy(ref.prompt_ids(PROMPT), 4)
    with LoomClient(stack.url) as loom:
        for fmt in ("base64", "list"):
            result = loom.generate(PROMPT, stack.default_model, max_tokens=4, temperature=0, return_hidden_states=True,
                                   hidden_state_layers=[0, -1], hidden_state_positions="all", hidden_state_format=fmt,
                                   logprobs=True, top_logprobs=2, logit_lens={"layers": [-1], "top_k": 1})
            arrays = result.arrays()
            assert set(arrays) == {0, -1}
            assert isinstance(arrays[-1], np.ndarray) and arrays[-1].dtype == np.float32
            assert_close(arrays[-1], ref.state(run, -1), f"client {fmt}")
            assert [t.token_id for t in result.logprobs] == run.completion
            assert [lens["-1"][0].token_id for lens in result.logit_lens] == run.completion


def test_stream_yields_typed_state_and_lens_events(stack, ref):
    run = ref.greedy(ref.prompt_ids(PROMPT), 4)
    with LoomClient(stack.url) as loom:
        with loom.stream_generate(PROMPT, stack.default_model, max_tokens=4, temperature=0, return_hidden_states=True,
                                  hidden_state_layers=[-1], hidden_state_positions="generated",
                                  hidden_state_format="base64", logprobs=True,
                                  logit_lens={"layers": [-1], "top_k": 2}) as stream:
            events = list(stream)
    states = [e for e in events if isinstance(e, HiddenStates)]
    assert [e.token_index for e in states] == list(range(len(run.tokens)))
    assert_close(np.stack([e.arrays()[-1] for e in states]), ref.state(run, -1)[len(run.prompt_ids) - 1:], "stream")
    assert [e.token_index for e in events if isinstance(e, LogitLens)] == list(range(len(run.completion)))
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert [lp.token_id for d in deltas for lp in d.logprobs] == run.completion
    assert isinstance(events[-1], MessageDelta)


def test_embed_embed_batch_and_generate_batch(stack, ref):
    texts = ["first text", "a second, longer text", "third"]
    with LoomClient(stack.url) as loom:
        one = loom.embed(texts[0], stack.default_model, pooling="mean", layer=2)
        many = loom.embed_batch(texts, stack.default_model, pooling="mean", layer=2)
        batch = loom.generate_batch(["Hello", ""], stack.default_model, max_tokens=3, temperature=0)
    assert one.shape == (ref.model.config.hidden_size,) and many.shape == (3, ref.model.config.hidden_size)
    states, _ = ref.forward(ref.prompt_ids(texts[0]))
    assert_close(one, states[2].mean(axis=0), "embed")
    assert_close(many[0], one, "embed_batch row 0")
    assert isinstance(batch.results[0], GenerateResult) and batch.results[0].token_count == 3
    assert isinstance(batch.results[1], BatchError) and batch.results[1].message.startswith("prompts.1: ")

    async def async_calls():
        async with AsyncLoomClient(stack.url) as loom:
            return await loom.embed_batch(texts, stack.default_model, pooling="mean", layer=2)

    assert_close(asyncio.run(async_calls()), many, "async embed_batch")  # grouped differently: float noise only


def test_steering_with_numpy_vectors(stack, ref):
    vector = np.random.default_rng(0).standard_normal(ref.model.config.hidden_size).astype(np.float32) * 20
    with LoomClient(stack.url) as loom:
        steered = loom.generate(PROMPT, stack.default_model, max_tokens=4, temperature=0,
                                steering=[{"layer": 0, "vector": vector, "scale": 1.0}])
        as_list = loom.generate(PROMPT, stack.default_model, max_tokens=4, temperature=0,
                                steering=[{"layer": 0, "vector": vector.tolist(), "scale": 1.0}])
        plain = loom.generate(PROMPT, stack.default_model, max_tokens=4, temperature=0)
    assert steered.text == as_list.text != plain.text
