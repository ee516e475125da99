"""The bundled loom-tiny model, served by default: meaningful answers offline."""
from __future__ import annotations

from tests.helpers import stream_chat, text_of, user


def test_loom_serve_preloads_loom_tiny_by_default(stack):
    assert stack.default_model == "loom-tiny"
    models = [m["model_id"] for w in stack.workers() for m in w["models"]]
    assert "loom-tiny" in models
    assert stack.health()["default_model"] == "loom-tiny"


def test_count_from_1_to_5_streams_and_ends_its_turn(stack):
    with stack.client() as client:
        events = stream_chat(client, {"model": "loom-tiny", "messages": user("Count from 1 to 5."),
                                      "max_tokens": 50, "temperature": 0})
    assert text_of(events) == "1, 2, 3, 4, 5"
    final = events[-1]
    assert final.name == "message_delta"
    assert final.data["delta"]["stop_reason"] == "end_turn"
    deltas = [e for e in events if e.name == "content_block_delta"]
    assert len(deltas) == final.data["usage"]["completion_tokens"]
    assert final.data["usage"]["total_tokens"] == final.data["usage"]["prompt_tokens"] + len(deltas)


def test_hello_gets_a_greeting_from_the_default_model(stack):
    with stack.client() as client:
        r = client.post("/v1/chat/completions", json={"model": "", "messages": user("Hello!"), "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"].startswith(("Hello", "Hi")), body["text"]
    assert body["stop_reason"] == "end_turn"
    assert body["metadata"]["model"] == "loom-tiny"


def test_max_tokens_cuts_with_max_tokens_reason(stack):
    with stack.client() as client:
        events = stream_chat(client, {"model": "loom-tiny", "messages": user("Count from 1 to 10."),
                                      "max_tokens": 3, "temperature": 0})
    assert events[-1].data["delta"]["stop_reason"] == "max_tokens"
    assert events[-1].data["usage"]["completion_tokens"] == 3


def test_hidden_state_shape_matches_loaded_model(stack):
    with stack.client() as client:
        info = client.post("/models/load", json={"model": "loom-tiny"}).json()
        events = stream_chat(client, {"model": "loom-tiny", "messages": user("Hello!"), "temperature": 0,
                                      "return_hidden_states": True})
    hidden = events[-1].data["hidden_state"]
    assert hidden["shape"] == [1, info["hidden_size"]] and len(hidden["final"]) == info["hidden_size"]
