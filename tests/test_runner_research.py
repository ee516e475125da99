"""The worker's batching engine in-process: per-position capture in padded prefill and decode
batches, pooling, and hooks only while someone asks, against transformers itself."""
from __future__ import annotations

import numpy as np
import pytest

from loom import protocol as P
from tests.reference import assert_close
from workers.model_store import load_model
from workers.runner import ModelRunner

PROMPTS = ["The capital of France is", "Once upon a time there", "Count from 1 to 10:", "Hello there, friend"]


@pytest.fixture(scope="module")
def lm(default_model):
    return load_model("m", default_model, "float32", "cpu")


def _drive(runner: ModelRunner) -> None:
    while runner.active:
        runner.step()


def _rows(frames: list, rid: str, layer: int) -> tuple[np.ndarray, list[int]]:
    rows, positions = [], []
    for msg, buffers in frames:
        if getattr(msg, "rid", None) != rid or not isinstance(msg, (P.Token, P.States)):
            continue
        for spec, buf in zip(msg.arrays, buffers):
            if layer in spec["keys"]:
                block = np.frombuffer(bytes(buf), dtype="<f4").reshape(spec["shape"])
                rows.extend(block)
                positions.extend(range(spec["position"], spec["position"] + spec["shape"][0]))
    return np.array(rows), positions


def test_padded_prefill_and_decode_rows_match_reference(lm, ref):
    frames: list = []
    runner = ModelRunner(lm, lambda msg, bufs: frames.append((msg, bufs)))
    layers = [0, 2, -1]
    positions = ["all", "generated", "prompt", "all"]
    for i, prompt in enumerate(PROMPTS):
        runner.admit(P.Generate(rid=str(i), model="m", prompt=prompt, max_tokens=5, temperature=0, layers=layers,
                                positions=positions[i]))
    runner.admit(P.Generate(rid="plain", model="m", prompt="Good morning", max_tokens=5, temperature=0))
    runner.step()  # one prefill group of five left-padded prompts
    assert len(runner.rows) >= 4
    _drive(runner)
    for i, prompt in enumerate(PROMPTS):
        run = ref.greedy(ref.prompt_ids(prompt), 5)
        first = len(run.prompt_ids) - 1
        for layer in layers:
            got, pos = _rows(frames, str(i), layer)
            states = ref.state(run, layer)
            want = {"all": states, "generated": states[first:], "prompt": states[:first + 1]}[positions[i]]
            assert_close(got, want, f"{prompt!r} layer {layer}")
            assert pos == sorted(pos) and len(set(pos)) == len(pos)
    assert not [m for m, b in frames if m.rid == "plain" and getattr(m, "arrays", None)]


def test_hooks_are_attached_only_while_someone_asks(lm):
    runner = ModelRunner(lm, lambda msg, bufs: None)
    runner.admit(P.Generate(rid="a", model="m", prompt="hi", max_tokens=3, temperature=0))
    runner.step()
    assert not runner.hooks._handles
    runner.admit(P.Generate(rid="b", model="m", prompt="hi", max_tokens=2, temperature=0, layers=[1],
                            positions="generated"))
    runner.step()
    assert runner.hooks._handles
    _drive(runner)
    runner.admit(P.Generate(rid="c", model="m", prompt="hi", max_tokens=2, temperature=0))
    _drive(runner)
    assert not runner.hooks._handles


@pytest.mark.parametrize("pooling", ["last_token", "mean", "first_token"])
def test_embeddings_in_a_padded_prefill_match_the_pooled_reference(lm, ref, pooling):
    frames: list = []
    runner = ModelRunner(lm, lambda msg, bufs: frames.append((msg, bufs)))
    for i, prompt in enumerate(PROMPTS):
        runner.admit(P.Generate(rid=str(i), model="m", prompt=prompt, layers=[2 if i % 2 else -1],
                                pooling=pooling, normalize=i >= 2))
    _drive(runner)
    finals = {m.rid: (m, b) for m, b in frames if isinstance(m, P.Final)}
    assert not [m for m, b in frames if isinstance(m, P.Token)]  # nothing generated
    for i, prompt in enumerate(PROMPTS):
        final, buffers = finals[str(i)]
        got = np.frombuffer(bytes(buffers[0]), dtype="<f4")
        states, _ = ref.forward(ref.prompt_ids(prompt))
        block = states[2 if i % 2 else -1]
        want = {"last_token": block[-1], "mean": block.mean(axis=0), "first_token": block[0]}[pooling]
        if i >= 2:
            want = want / np.linalg.norm(want)
        assert final.arrays[0]["shape"] == [1, block.shape[1]] and final.completion_tokens == 0
        assert_close(got, want.astype(np.float32), f"{pooling} {prompt!r}")


def test_a_model_whose_final_norm_cannot_be_found(lm, monkeypatch):
    """The lens then serves only layer -1, the final state only at the last position: clear errors otherwise."""
    import workers.hidden as hidden
    from workers.runner import RequestError

    monkeypatch.setattr(hidden, "_NORM_NAMES", ())
    frames: list = []
    runner = ModelRunner(lm, lambda msg, bufs: frames.append((msg, bufs)))
    assert runner.hooks.norm is None
    with pytest.raises(RequestError, match="logit_lens"):
        runner.admit(P.Generate(rid="x", model="m", prompt="hi", lens_layers=[1], lens_top_k=2))
    with pytest.raises(RequestError, match="hidden_state_positions"):
        runner.admit(P.Generate(rid="y", model="m", prompt="hi", layers=[-1], positions="all"))
    runner.admit(P.Generate(rid="z", model="m", prompt="hi", max_tokens=3, temperature=0, layers=[-1, 1],
                            positions="generated", lens_layers=[-1], lens_top_k=1, logprobs=True))
    _drive(runner)
    tokens = [m for m, b in frames if isinstance(m, P.Token) and m.rid == "z"]
    entries = [e for t in tokens for e in (t.logprobs or [])]
    lenses = [t.lens for t in tokens if t.lens]
    assert [lens["layers"]["-1"][0]["token_id"] for lens in lenses] == [e["token_id"] for e in entries]
    assert all(spec["shape"] == [1, lm.hidden_size] for t in tokens for spec in t.arrays)


def test_interventions_that_change_nothing_attach_no_hook(lm):
    """A zero vector, or scale 0, is skipped outright: the row computes exactly what it would unsteered."""
    zero = np.zeros(lm.hidden_size, dtype="<f4").tobytes()
    ones = np.ones(lm.hidden_size, dtype="<f4").tobytes()
    runner = ModelRunner(lm, lambda msg, bufs: None)
    for rid, item in [("a", {"vector": zero, "op": "add"}), ("b", {"vector": zero, "op": "ablate"}),
                      ("c", {"vector": ones, "scale": 0.0})]:
        runner.admit(P.Generate(rid=rid, model="m", prompt="hi", max_tokens=3, temperature=0,
                                steering=[{"layer": 1, **item}]))
    plan, _ = runner.outputs.plan(runner.pending, prefill=True)
    assert not plan.steer and not plan
    runner.step()
    assert not runner.hooks._handles
