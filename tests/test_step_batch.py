"""A step's tokens grouped into one Tokens message per API process (workers/step_batch.py, loom/token_batch.py)."""
from __future__ import annotations

from loom import protocol as P
from loom.token_batch import TokenBatch
from workers.step_batch import StepBatch


def _final(rid: str, reason: str) -> P.Final:
    return P.Final(rid=rid, stop_reason=reason, prompt_tokens=3, completion_tokens=5, generate_s=0.1, model="m",
                   dtype="float32")


def _batch():
    sent: list[tuple[P.Message, list]] = []
    batch = StepBatch(lambda msg, buffers: sent.append((msg, buffers)))
    return batch, sent


def test_a_steps_plain_tokens_leave_as_one_message_per_api_process():
    batch, sent = _batch()
    for rid, api in (("a", b"api-0"), ("b", b"api-1"), ("c", b"api-0")):
        batch.route(rid, api)
    batch.put_texts(["a", "b", "c"], ["x", "y", "z"], [0, 0, 1])
    assert sent == []  # held until the step ends
    batch.flush()
    by_api = {msg.api: msg for msg, _ in sent}
    assert set(by_api) == {b"api-0", b"api-1"}
    assert (by_api[b"api-0"].rids, by_api[b"api-0"].texts, by_api[b"api-0"].indexes) == (["a", "c"], ["x", "z"], [0, 1])
    assert (by_api[b"api-1"].rids, by_api[b"api-1"].texts) == (["b"], ["y"])
    assert by_api[b"api-0"].extras == [] and by_api[b"api-1"].extras == []
    batch.flush()
    assert len(sent) == 2  # nothing is sent twice


def test_a_final_put_after_its_token_leaves_after_the_step():
    batch, sent = _batch()
    batch.route("a", b"api-0")
    batch.route("b", b"api-0")
    batch.put_texts(["a"], ["last"], [4])
    batch.put(_final("a", "max_tokens"), [])
    batch.put(_final("b", "end_turn"), [])  # no token waiting: goes at once
    assert [type(m).__name__ for m, _ in sent] == ["Final"] and sent[0][0].rid == "b"
    batch.flush()
    assert [type(m).__name__ for m, _ in sent] == ["Final", "Tokens", "Final"]
    assert sent[1][0].texts == ["last"] and sent[2][0].rid == "a"


def test_token_with_extras_after_plain_ones_gives_every_entry_a_map():
    group = TokenBatch()
    group.add_texts(["a", "b"], ["x", "y"], [0, 0])
    group.add(P.Token(rid="c", text="z", index=3, logprobs=[{"token": "z", "logprob": -0.5}]), [])
    group.add_texts(["d"], ["w"], [1])
    msg, buffers = group.message(b"api-0", 1.0)
    assert msg.rids == ["a", "b", "c", "d"]
    assert msg.extras == [{}, {}, {"logprobs": [{"token": "z", "logprob": -0.5}]}, {}]
    # The API splits it back into the same Token messages.
    tokens = [t for t, _ in msg.tokens(buffers)]
    assert [(t.rid, t.text, t.index, t.logprobs) for t in tokens] == [
        ("a", "x", 0, None), ("b", "y", 0, None), ("c", "z", 3, [{"token": "z", "logprob": -0.5}]), ("d", "w", 1, None)]
