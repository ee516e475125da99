"""Per-position hidden states, logprobs and the logit lens over real HTTP, against transformers itself.

The stack serves the bundled model; the reference loads the same directory
in this process (float32) and reads `output_hidden_states`. Every row the
server returns must match the reference's state at that position to 1e-4,
alone and inside a batch of 8 mixed requests.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from tests.helpers import sse_events, user
from tests.reference import Reference, Run, assert_close, decode_array, log_softmax

PROMPT = "The capital of France is"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def layers(ref) -> list[int]:
    return [0, ref.num_layers // 2, -1]


def expected_rows(ref: Reference, run: Run, layer: int, positions: str) -> np.ndarray:
    states = ref.state(run, layer)
    first = len(run.prompt_ids) - 1
    return {"generated": states[first:], "prompt": states[:first + 1], "all": states}[positions]


def row_count(run: Run, positions: str) -> int:
    p, g = len(run.prompt_ids), len(run.tokens)  # g counts the end-of-turn token when the model chose it
    return {"generated": g, "prompt": p, "all": p + g - 1}[positions]


def stream_events(client: httpx.Client, path: str, body: dict) -> list:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        return list(sse_events(r))


def streamed_rows(events: list, layer: int) -> tuple[np.ndarray, list[int], list]:
    """The `hidden_states` events' rows for `layer`, their positions and token indexes, checked for order."""
    rows, positions, token_indexes = [], [], []
    deltas = 0
    for e in events:
        if e.name == "content_block_delta":
            deltas += 1
        elif e.name == "hidden_states":
            positions.append(e.data["position"])
            index = e.data["token_index"]
            token_indexes.append(index)
            if index is not None:
                # Before the content_block_delta of the token it predicted.
                assert deltas <= index, (deltas, index)
            entry = e.data["hidden_states"][str(layer)]
            assert entry["shape"][0] == 1
            rows.append(decode_array(entry)[0])
    assert positions == list(range(positions[0], positions[0] + len(positions))) if positions else True
    assert events[-1].name == "message_delta"
    return np.array(rows), positions, token_indexes


@pytest.mark.parametrize("positions", ["generated", "prompt", "all"])
@pytest.mark.parametrize("fmt", ["base64", "list"])
def test_generate_positions_match_reference(stack, ref, layers, positions, fmt):
    run = ref.greedy(ref.prompt_ids(PROMPT), MAX_TOKENS)
    body = {"model": stack.default_model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_hidden_states": True, "hidden_state_layers": layers, "hidden_state_positions": positions,
            "hidden_state_format": fmt}
    with stack.client() as client:
        r = client.post("/generate", json=body)
        assert r.status_code == 200, r.text
        answer = r.json()
        events = stream_events(client, "/generate", body)
    assert answer["text"] == ref.text(run.completion)
    n = row_count(run, positions)
    for layer in layers:
        entry = answer["hidden_states"][str(layer)]
        assert entry["shape"] == [n, ref.model.config.hidden_size], (layer, entry["shape"])
        assert (entry.get("encoding") == "base64") == (fmt == "base64")
        assert_close(decode_array(entry), expected_rows(ref, run, layer, positions), f"layer {layer} {positions}")
        rows, pos, token_indexes = streamed_rows(events, layer)
        assert_close(rows, expected_rows(ref, run, layer, positions), f"stream layer {layer} {positions}")
        start = 0 if positions in ("prompt", "all") else len(run.prompt_ids) - 1
        assert pos == list(range(start, start + n))
        assert token_indexes == [p - (len(run.prompt_ids) - 1) if p >= len(run.prompt_ids) - 1 else None for p in pos]
    # The final event carries only what `last` would: [1, H] per layer.
    final = events[-1].data
    assert all(v["shape"][0] == 1 for v in final["hidden_states"].values())


def test_chat_positions_and_base64_match_reference(stack, ref, layers):
    messages = user("Count from 1 to 5.")
    run = ref.greedy(ref.chat_ids(messages), MAX_TOKENS)
    body = {"model": stack.default_model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_hidden_states": True, "hidden_state_layers": layers, "hidden_state_positions": "all",
            "hidden_state_format": "base64"}
    with stack.client() as client:
        answer = client.post("/v1/chat/completions", json=body).json()
        events = stream_events(client, "/v1/chat/completions", body)
    assert answer["text"] == ref.text(run.completion)
    # chat's hidden_state keeps [1, H]: the state behind the last token.
    assert answer["hidden_state"]["shape"] == [1, ref.model.config.hidden_size]
    assert_close(decode_array(answer["hidden_state"])[0], ref.state(run, -1)[-1], "chat hidden_state")
    for layer in layers:
        entry = answer["hidden_states"][str(layer)]
        assert entry["layer"] == layer
        assert_close(decode_array(entry), expected_rows(ref, run, layer, "all"), f"chat layer {layer}")
        rows, _, _ = streamed_rows(events, layer)
        assert_close(rows, expected_rows(ref, run, layer, "all"), f"chat stream layer {layer}")


def test_a_batch_of_8_mixed_requests_each_matches_its_reference(stack, ref, layers):
    """Four ask for states (different positions, stream or not), four do not (two sample)."""
    prompts = ["The capital of France is", "Hello", "Count from 1 to 10:", "Once upon a time",
               "What is 2 + 3?", "Good morning!", "The sky is", "Say something."]
    asks = [("all", False), ("generated", True), ("prompt", False), ("generated", False)]
    bodies = []
    for i, prompt in enumerate(prompts):
        body = {"model": stack.default_model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        if i < 4:
            positions, stream = asks[i]
            body.update(return_hidden_states=True, hidden_state_layers=layers, hidden_state_positions=positions,
                        hidden_state_format="base64", stream=stream, logprobs=i % 2 == 0)
        elif i >= 6:
            body.update(temperature=0.8, seed=i)
        bodies.append(body)

    async def one(client: httpx.AsyncClient, body: dict) -> dict | list:
        if body.get("stream"):
            async with client.stream("POST", "/generate", json=body) as r:
                assert r.status_code == 200
                text = (await r.aread()).decode()
            return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
        r = await client.post("/generate", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    async def together() -> list:
        async with httpx.AsyncClient(base_url=stack.url, timeout=120) as client:
            return await asyncio.gather(*(one(client, b) for b in bodies))

    results = asyncio.run(together())
    for i, (body, result) in enumerate(zip(bodies, results)):
        if i >= 4:
            assert "hidden_states" not in result and "logprobs" not in result
            if body["temperature"] == 0:
                assert result["text"] == ref.text(ref.greedy(ref.prompt_ids(body["prompt"]), MAX_TOKENS).completion)
            continue
        run = ref.greedy(ref.prompt_ids(body["prompt"]), MAX_TOKENS)
        positions = body["hidden_state_positions"]
        for layer in layers:
            want = expected_rows(ref, run, layer, positions)
            if body["stream"]:
                got = np.array([decode_array(e["hidden_states"][str(layer)])[0] for e in result
                                if e.get("type") == "hidden_states"])
            else:
                got = decode_array(result["hidden_states"][str(layer)])
            assert got.shape[0] == row_count(run, positions)
            assert_close(got, want, f"request {i} layer {layer} {positions}")


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_match_the_reference_log_softmax(stack, ref, stream):
    run = ref.greedy(ref.prompt_ids(PROMPT), MAX_TOKENS)
    body = {"model": stack.default_model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
            "logprobs": True, "top_logprobs": 5}
    with stack.client() as client:
        if stream:
            events = stream_events(client, "/generate", body)
            deltas = [e.data for e in events if e.name == "content_block_delta"]
            entries = [entry for d in deltas for entry in d["logprobs"]]
            # Each delta's entries are the tokens whose text it carries.
            for d in deltas:
                assert "".join(e["token"] for e in d["logprobs"]) == d["delta"]["text"]
        else:
            answer = client.post("/generate", json=body).json()
            entries = answer["logprobs"]
    completion = run.completion
    assert [e["token_id"] for e in entries] == completion
    first = len(run.prompt_ids) - 1
    for i, entry in enumerate(entries):
        want = log_softmax(run.logits[first + i])
        assert abs(entry["logprob"] - want[completion[i]]) <= 1e-4, (i, entry["logprob"], want[completion[i]])
        top = entry["top_logprobs"]
        assert len(top) == 5
        values = [t["logprob"] for t in top]
        assert values == sorted(values, reverse=True)
        assert top[0]["token_id"] == entry["token_id"] and top[0]["logprob"] == entry["logprob"]  # greedy
        for t in top:
            assert abs(t["logprob"] - want[t["token_id"]]) <= 1e-4
        assert set(t["token_id"] for t in top) == set(np.argsort(-want)[:5].tolist())


@pytest.mark.parametrize("stream", [False, True])
def test_logit_lens_matches_the_reference_and_ranks_the_greedy_token_first(stack, ref, stream):
    run = ref.greedy(ref.prompt_ids(PROMPT), MAX_TOKENS)
    lens_layers = [1, ref.num_layers // 2, -1]
    body = {"model": stack.default_model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
            "logit_lens": {"layers": lens_layers, "top_k": 3}}
    with stack.client() as client:
        if stream:
            events = stream_events(client, "/generate", body)
            lens = [e.data for e in events if e.name == "logit_lens"]
            assert [e["token_index"] for e in lens] == list(range(len(lens)))
            deltas_before = 0
            for e in events:  # each lens event comes before its token's delta
                if e.name == "content_block_delta":
                    deltas_before += 1
                elif e.name == "logit_lens":
                    assert deltas_before <= e.data["token_index"]
            lens = [e["layers"] for e in lens]
        else:
            lens = client.post("/generate", json=body).json()["logit_lens"]
    completion = run.completion
    assert len(lens) == len(completion)
    first = len(run.prompt_ids) - 1
    for i, layers_map in enumerate(lens):
        assert layers_map["-1"][0]["token_id"] == completion[i]  # temperature 0: the lens at -1 is the logits
        for layer in lens_layers:
            want = ref.lens(ref.state(run, layer)[first + i], layer)
            got = layers_map[str(layer)]
            assert [t["token_id"] for t in got] == np.argsort(-want)[:3].tolist()
            for t in got:
                assert abs(t["logprob"] - want[t["token_id"]]) <= 1e-4


def test_requests_that_ask_nothing_see_exactly_the_weaver_events(stack):
    """No research field: only content_block_delta and one message_delta, byte-compatible as before."""
    body = {"model": stack.default_model, "messages": user("Hello!"), "max_tokens": 5, "temperature": 0,
            "stream": True}
    with stack.client() as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            raw = r.read().decode()
    blocks = [b for b in raw.split("\n\n") if b]
    for block in blocks[:-1]:
        name, data = block.split("\n")
        assert name == "event: content_block_delta"
        assert data.startswith('data: {"type":"content_block_delta","delta":{"type":"text_delta","text":')
        assert data.endswith("}}")
    assert blocks[-1].startswith("event: message_delta\n")
    assert "logprobs" not in raw and "hidden_states" not in raw
