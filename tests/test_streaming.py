"""The seed's streaming tests, over real HTTP against a real stack."""
from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid

import httpx

from tests.conftest import TOY
from tests.helpers import sse_events, stream_chat, text_of, user, wait_until


class TestStreamingChatCompletionsIntegration:
    def test_streaming_produces_incremental_tokens(self, stack):
        body = {"model": TOY, "messages": user("Count from 1 to 5."), "max_tokens": 60, "temperature": 0}
        with stack.client() as client:
            stream_chat(client, body)  # warm the model up
            # A busy machine can stall a process for the few milliseconds this
            # stream lasts; a server that buffers fails every attempt.
            problems = []
            for _ in range(3):
                problem = self._spread_problem(client, body)
                if problem is None:
                    return
                problems.append(problem)
        raise AssertionError(f"tokens did not arrive incrementally: {problems}")

    @staticmethod
    def _spread_problem(client, body) -> str | None:
        started = time.perf_counter()
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["cache-control"] == "no-cache"
            assert r.headers["x-accel-buffering"] == "no"
            events = list(sse_events(r))
        deltas = [e for e in events if e.name == "content_block_delta"]
        final = events[-1]
        assert final.name == "message_delta"
        assert len(deltas) >= 10
        # One event per token: usage counts every streamed token.
        assert final.data["usage"]["completion_tokens"] >= len(deltas)
        # Arrival times on the client are spread over the generation, not one
        # burst at the end: from the first delta to the final event the client
        # waits about as long as the worker spent generating (its own clock).
        generate_s = final.data["usage"]["completion_tokens"] / final.data["metadata"]["tokens_per_second"]
        if final.at - deltas[0].at < 0.5 * generate_s:
            return f"events spanned {final.at - deltas[0].at:.4f}s of a {generate_s:.4f}s generation"
        if deltas[-1].at - deltas[0].at < 0.5 * (final.at - deltas[0].at):
            return "the deltas came in one burst before the final event"
        if len({round(e.at, 4) for e in deltas}) < len(deltas) // 4:
            return "tokens arrived in bursts"
        if deltas[0].at - started > 0.5 * (final.at - started):
            return "the first token came late"
        return None

    def test_streaming_with_hidden_states(self, stack):
        with stack.client() as client:
            loaded = client.post("/models/load", json={"model": TOY, "dtype": "float32"})
            assert loaded.status_code == 200, loaded.text
            info = loaded.json()
            events = stream_chat(client, {"model": TOY, "messages": user("Hello!"), "max_tokens": 8,
                                          "temperature": 0, "return_hidden_states": True})
        final = events[-1]
        assert final.name == "message_delta"
        hs = final.data["hidden_state"]
        assert hs["shape"][-1] == info["hidden_size"]
        assert len(hs["final"]) == info["hidden_size"]
        assert hs["layer"] == -1 and hs["dtype"] == "float32"
        assert all(isinstance(x, (int, float)) for x in hs["final"])
        assert "hidden_states" not in final.data  # no layers were asked for
        assert all("hidden_state" not in e.data for e in events[:-1])

    def test_streaming_vs_nonstreaming_equivalence(self, stack):
        body = {"model": stack.default_model, "messages": user("Count from 1 to 5."), "max_tokens": 40,
                "temperature": 0}
        with stack.client() as client:
            plain = client.post("/v1/chat/completions", json=body)
            assert plain.status_code == 200, plain.text
            events = stream_chat(client, body)
        assert text_of(events) == plain.json()["text"]
        assert events[-1].data["usage"] == plain.json()["usage"]
        assert plain.json()["text"]


def test_hidden_state_layers_map(stack):
    with stack.client() as client:
        info = client.post("/models/load", json={"model": TOY}).json()
        n = info["num_layers"]
        events = stream_chat(client, {"model": TOY, "messages": user("Hi"), "max_tokens": 3, "temperature": 0,
                                      "return_hidden_states": True, "hidden_state_layers": "all"})
        final = events[-1].data
        assert set(final["hidden_states"]) == {str(i) for i in range(n + 1)} | {"-1"}
        assert final["hidden_states"]["-1"]["vector"] == final["hidden_state"]["final"]
        # Layer 0 is the embedding output: not the final state.
        assert final["hidden_states"]["0"]["vector"] != final["hidden_states"]["-1"]["vector"]
        one = client.post("/v1/chat/completions", json={"model": TOY, "messages": user("Hi"), "max_tokens": 3,
                                                        "temperature": 0, "return_hidden_states": True,
                                                        "hidden_state_layers": [1, -2]}).json()
        assert set(one["hidden_states"]) == {"1", "-2"}
        assert one["hidden_states"]["-2"]["vector"] == final["hidden_states"][str(n)]["vector"]
        bad = client.post("/v1/chat/completions", json={"model": TOY, "messages": user("Hi"),
                                                        "hidden_state_layers": [n + 5]})
        assert bad.status_code == 422 and "out of range" in bad.json()["error"]["message"]


def test_generate_endpoint_hidden_state_formats(stack):
    import base64

    import numpy as np

    with stack.client() as client:
        body = {"model": TOY, "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0,
                "return_hidden_states": True}
        listed = client.post("/generate", json=body).json()
        raw = client.post("/generate", json={**body, "hidden_state_format": "base64"}).json()
    assert listed["token_count"] == 5 and isinstance(listed["text"], str)
    entry = listed["hidden_states"]["-1"]
    assert entry["shape"] == [1, len(entry["data"])]
    b64 = raw["hidden_states"]["-1"]
    assert b64["encoding"] == "base64"
    decoded = np.frombuffer(base64.b64decode(b64["data"]), dtype="<f4")
    assert decoded.tolist() == np.asarray(entry["data"], dtype=np.float32).tolist()


def test_default_model_when_model_is_empty(stack):
    with stack.client() as client:
        r = client.post("/v1/chat/completions", json={"model": "", "messages": user("Hello!"), "max_tokens": 5})
    assert r.status_code == 200, r.text
    assert r.json()["metadata"]["model"] == stack.default_model.split("/")[-1]


def test_concurrent_streams_all_complete(stack):
    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, int]:
        body = {"model": TOY, "messages": user(f"Tell me about {i}."), "max_tokens": 30 + i, "temperature": 0.7, "seed": i,
                "stream": True}
        names = []
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("event:"):
                    names.append(line.split(":", 1)[1].strip())
        return names[-1], names.count("content_block_delta")

    async def main():
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(8)))

    results = asyncio.run(main())
    assert [r[0] for r in results] == ["message_delta"] * 8
    assert all(r[1] > 0 for r in results)


def test_curl_streams_tokens_one_at_a_time(stack):
    body = json.dumps({"model": TOY, "messages": user("Count from 1 to 5."), "max_tokens": 40, "temperature": 0,
                       "stream": True})
    proc = subprocess.Popen(["curl", "-sN", "-X", "POST", f"{stack.url}/v1/chat/completions",
                             "-H", "Content-Type: application/json", "-H", "Accept: text/event-stream", "-d", body],
                            stdout=subprocess.PIPE)
    lines = []
    assert proc.stdout is not None
    for raw in proc.stdout:
        lines.append((time.perf_counter(), raw.decode().rstrip("\n")))
    assert proc.wait(timeout=30) == 0
    events = [line for _, line in lines if line.startswith("event:")]
    assert events[-1] == "event: message_delta"
    assert events.count("event: content_block_delta") >= 10
    data = [json.loads(line[5:]) for _, line in lines if line.startswith("data:")]
    assert all(d["type"] == "content_block_delta" and d["delta"]["type"] == "text_delta" for d in data[:-1])


def test_disconnect_stops_generation(stack):
    body = {"model": TOY, "messages": user("Go on forever."), "max_tokens": 6000, "temperature": 0, "stream": True}

    def generating() -> int:
        return sum(w["generating"] for w in stack.workers())

    request_id = f"hang-up-{uuid.uuid4().hex}"
    with stack.client(headers={"X-Request-Id": request_id}) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            events = sse_events(r)
            for _ in range(5):
                assert next(events).name == "content_block_delta"
            wait_until(lambda: generating() >= 1, 60, 0.05, "the worker to report the stream")
        # The client hung up after 5 tokens: the worker stops on a cancel, not after 6000 tokens.
        # (Judged by what ended the request, not by a clock: the machine may be busy.)
        wait_until(lambda: generating() == 0, 60, 0.05, "the worker to stop generating")
    assert_cancelled(stack, request_id)


def assert_cancelled(stack, request_id: str) -> None:
    """The worker's log says the request was cancelled, and never that it finished."""
    lines = wait_until(lambda: [x for x in stack.log().splitlines() if f"[{request_id}]" in x and "worker" in x
                                and "cancelled" in x], 30, 0.05, "the worker's cancel line")
    assert lines
    assert not [x for x in stack.log().splitlines() if f"[{request_id}]" in x and " finished: " in x]


def test_non_streaming_client_that_hangs_up_cancels_too(stack):
    def generating() -> int:
        return sum(w["generating"] for w in stack.workers())

    wait_until(lambda: generating() == 0, 10, 0.05, "an idle worker")
    body = {"model": TOY, "messages": user("Go on forever."), "max_tokens": 6000, "temperature": 0}
    request_id = f"hang-up-{uuid.uuid4().hex}"
    with httpx.Client(base_url=stack.url, timeout=httpx.Timeout(1.5, connect=5),
                      headers={"X-Request-Id": request_id}) as client:
        try:
            client.post("/v1/chat/completions", json=body)
            raise AssertionError("6000 tokens should take longer than the client waits")
        except httpx.ReadTimeout:
            pass  # the client gives up and closes its connection
    # Greedy on the toy model: 6000 tokens, never fewer. The request must end by a cancel.
    wait_until(lambda: generating() == 0, 60, 0.05, "the worker to stop generating")
    assert_cancelled(stack, request_id)
