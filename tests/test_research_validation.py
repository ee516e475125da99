"""Bad research input: 422 naming the field, before any work starts, and nothing else disturbed."""
from __future__ import annotations

import base64
import json
import threading

import numpy as np
import pytest

from tests.conftest import TOY
from tests.helpers import stream_chat, text_of, user

CHAT = "/v1/chat/completions"


def _b64(values) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


def _steer(**item) -> dict:
    return {"steering": [{"layer": 1, "vector": [0.5] * 192, **item}]}


# (path, extra body fields, the field the message must name)
BAD = [
    ("/generate", {"hidden_state_positions": "middle"}, "hidden_state_positions"),
    (CHAT, {"hidden_state_positions": "every"}, "hidden_state_positions"),
    (CHAT, {"hidden_state_format": "hex"}, "hidden_state_format"),
    ("/generate", {"top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"top_logprobs": -1, "logprobs": True}, "top_logprobs"),
    ("/generate", {"logit_lens": {"layers": [99], "top_k": 3}}, "logit_lens.layers"),
    (CHAT, {"logit_lens": {"layers": [0, -7], "top_k": 3}}, "logit_lens.layers"),
    ("/generate", {"logit_lens": {"layers": [1], "top_k": 0}}, "logit_lens.top_k"),
    ("/generate", {"logit_lens": {"layers": [1], "top_k": 21}}, "logit_lens.top_k"),
    ("/generate", {"logit_lens": {"layers": []}}, "logit_lens.layers"),
    ("/embed", {"text": ""}, "text"),
    ("/embed", {"text": "hi", "layer": 12}, "layer"),
    ("/embed", {"text": "hi", "pooling": "max"}, "pooling"),
    ("/embed/batch", {"texts": ["fine", ""]}, "texts.1"),
    ("/embed/batch", {"texts": ["a"] * 257}, "texts"),
    ("/embed/batch", {"texts": []}, "texts"),
    ("/generate/batch", {"prompts": ["a"] * 101}, "prompts"),
    ("/generate/batch", {"prompts": ["a"], "stream": True}, "stream"),
    ("/generate", _steer(vector=[0.5] * 5), "steering.0.vector"),  # not the hidden size: the worker says so
    (CHAT, _steer(vector=_b64([0.5] * 96), dtype="float32"), "steering.0.vector"),
    ("/generate", _steer(vector=_b64([0.5] * 191 + [np.nan])), "steering.0.vector"),
    (CHAT, _steer(vector=_b64([np.inf] * 192), dtype="float32"), "steering.0.vector"),
    ("/generate", _steer(vector=[0.5] * 191 + [float("nan")]), "steering.0.vector"),
    (CHAT, _steer(scale=float("inf")), "steering.0.scale"),
    ("/generate", _steer(vector="not base64!"), "steering.0.vector"),
    ("/generate", _steer(vector=_b64([0.5] * 192), dtype="int8"), "steering.0.dtype"),
    ("/generate", _steer(op="multiply"), "steering.0.op"),
    (CHAT, _steer(positions="first"), "steering.0.positions"),
    ("/generate", _steer(layer=9), "steering.0.layer"),
    ("/generate", {"steering": [{"layer": 1, "vector": [0.5] * 192}] * 17}, "steering"),
]


def _body(path: str, extra: dict, model: str) -> dict:
    body = {"model": model, "max_tokens": 2, "temperature": 0, **extra}
    if path == CHAT:
        body["messages"] = user("hi")
    elif path == "/generate":
        body["prompt"] = "hi"
    return body


@pytest.mark.parametrize("path, extra, field", BAD, ids=[f"{p} {f}" for p, _, f in BAD])
def test_bad_research_input_is_422_naming_the_field(stack, path, extra, field):
    with stack.client() as client:
        streams = (False, True) if path in (CHAT, "/generate") else (False,)
        for stream in streams:
            body = _body(path, extra, stack.default_model)
            if stream:
                body["stream"] = True
            # json.dumps writes NaN and Infinity as Python's parser (and so the server's) reads them.
            r = client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
            assert r.status_code == 422, (stream, r.status_code, r.text[:300])
            message = r.json()["error"]["message"]
            assert message.startswith(f"{field}:") or f"; {field}:" in message or f"{field}: " in message, message
            assert "Traceback" not in r.text


def test_bad_requests_do_not_disturb_a_running_stream(stack):
    body = {"model": TOY, "messages": user("Count from 1 to 5."), "max_tokens": 120, "temperature": 0,
            "return_hidden_states": True, "hidden_state_positions": "generated"}
    with stack.client() as client:
        alone = text_of(stream_chat(client, body))
    got: dict = {}

    def run() -> None:
        with stack.client() as client:
            got["events"] = stream_chat(client, body)

    thread = threading.Thread(target=run)
    thread.start()
    with stack.client() as client:
        for path, extra, _ in BAD:
            r = client.post(path, content=json.dumps(_body(path, extra, TOY)),
                            headers={"Content-Type": "application/json"})
            assert r.status_code == 422, r.text[:300]
    thread.join(120)
    events = got["events"]
    assert events[-1].name == "message_delta"
    assert text_of(events) == alone
    final = events[-1].data
    # One state per generated token, and one more for the end of turn if the model chose it.
    expected = final["usage"]["completion_tokens"] + (final["delta"]["stop_reason"] == "end_turn")
    assert sum(e.name == "hidden_states" for e in events) == expected
