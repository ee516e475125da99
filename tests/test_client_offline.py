"""The client library (sync and async) against a fake server that speaks the
HTTP contract over real HTTP (tests/fake_loom.py); `loom chat` against the
same server is in test_chat_offline.py.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from loom.client import (
    AsyncLoomClient,
    ErrorEvent,
    LoomClient,
    LoomConnectionError,
    LoomHTTPError,
    LoomProtocolError,
    LoomStreamError,
    MessageDelta,
    TextDelta,
)
from tests.fake_loom import HIDDEN, SLOW, FakeLoom, drain, serving
from tests.helpers import free_port


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLoom]:
    with serving() as fake:
        yield fake


@pytest.fixture()
def client(server: FakeLoom) -> Iterator[LoomClient]:
    with LoomClient(server.url) as c:
        yield c


USER = [{"role": "user", "content": "Count from 1 to 3."}]


# --- plain endpoints -----------------------------------------------------------


def test_health_models_load_unload(client: LoomClient, server: FakeLoom) -> None:
    assert client.health().status == "healthy"
    [model] = client.models().loaded_models
    assert (model.model_id, model.hidden_size, model.num_layers) == ("fake/tiny", 4, 2)
    loaded = client.load_model("fake/other", dtype="float16", device="cuda:1")
    assert loaded.model_id == "fake/other" and loaded.loader_type == "fake"
    assert server.last("/models/load")["body"] == {"model": "fake/other", "dtype": "float16", "device": "cuda:1"}
    assert client.unload_model("fake/tiny")["status"] == "unloaded"
    assert server.requests[-1]["path"] == "/models/fake--tiny"


def test_unload_unknown_model_raises_with_fastapi_detail(client: LoomClient) -> None:
    with pytest.raises(LoomHTTPError) as info:
        client.unload_model("nope")
    assert info.value.status_code == 404
    assert info.value.message == "model nope is not loaded"


def test_health_503_is_returned_not_raised(server: FakeLoom) -> None:
    with LoomClient(server.url + "/down") as c:
        health = c.health()
    assert health.status == "unhealthy"
    assert health.model_extra == {"detail": "no worker is alive", "workers": []}


def test_a_server_that_is_not_loom_gives_protocol_errors(server: FakeLoom) -> None:
    with LoomClient(server.url + "/html") as c:
        with pytest.raises(LoomProtocolError, match="is this a Loom server"):
            c.models()
        with pytest.raises(LoomProtocolError):
            c.chat(USER)
        with pytest.raises(LoomStreamError, match="expected an event stream, got text/html"):
            list(c.stream_chat(USER))


def test_api_key_is_sent_as_bearer_token(server: FakeLoom) -> None:
    with LoomClient(server.url, api_key="s3cret") as c:
        c.health()
    assert server.last("/health")["headers"]["Authorization"] == "Bearer s3cret"


def test_chat_returns_typed_result(client: LoomClient, server: FakeLoom) -> None:
    result = client.chat(USER, "fake/tiny", max_tokens=20, return_hidden_states=True, hidden_state_layers=[-1])
    assert result.text == "1, 2, 3"
    assert result.usage.total_tokens == 12
    assert result.hidden_state is not None and result.hidden_state.shape == [1, 4]
    assert result.hidden_states is not None and result.hidden_states["-1"].values() == HIDDEN
    assert result.metadata["tokens_per_second"] == 50.0
    sent = server.last("/v1/chat/completions")["body"]
    assert sent == {"model": "fake/tiny", "max_tokens": 20, "hidden_state_layers": [-1],
                    "return_hidden_states": True, "messages": USER}


def test_unset_fields_are_left_out_for_server_defaults(client: LoomClient, server: FakeLoom) -> None:
    client.chat(USER)
    assert server.last("/v1/chat/completions")["body"] == {"model": "", "messages": USER}


def test_generate_decodes_base64_hidden_states(client: LoomClient, server: FakeLoom) -> None:
    result = client.generate("Hello", return_hidden_states=True, hidden_state_format="base64")
    assert result.text == "Hello world"
    assert result.hidden_states is not None and result.hidden_states["-1"].values() == HIDDEN
    assert server.last("/generate")["body"]["hidden_state_format"] == "base64"


# --- streaming -----------------------------------------------------------------


def test_stream_events_arrive_incrementally(client: LoomClient) -> None:
    arrivals: list[float] = []
    with client.stream_chat(USER, "slow") as stream:
        events = []
        for event in stream:
            arrivals.append(time.monotonic())
            events.append(event)
    assert [type(e) for e in events] == [TextDelta] * 5 + [MessageDelta]
    assert stream.text == "1, 2, 3"
    # Tokens are SLOW apart on the server; buffering would bunch them up.
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:5])]
    assert all(gap > SLOW / 2 for gap in gaps), gaps


def test_stream_final_event_is_typed(client: LoomClient, server: FakeLoom) -> None:
    stream = client.stream_chat(USER, "fake/tiny", return_hidden_states=True)
    events = list(stream)
    final = events[-1]
    assert isinstance(final, MessageDelta) and final is stream.final
    assert final.stop_reason == "end_turn"
    assert final.usage.completion_tokens == 5
    assert final.hidden_state is not None and final.hidden_state.values() == HIDDEN
    sent = server.last("/v1/chat/completions")
    assert sent["body"]["stream"] is True
    assert sent["headers"]["Accept"] == "text/event-stream"


def test_comments_and_unknown_events_are_skipped(client: LoomClient) -> None:
    events = list(client.stream_chat(USER, "chatty"))
    assert [type(e) for e in events] == [TextDelta] * 5 + [MessageDelta]


def test_chunk_boundaries_inside_utf8_over_http(client: LoomClient) -> None:
    stream = client.stream_chat(USER, "unicode")
    assert [e.text for e in stream if isinstance(e, TextDelta)] == ["é", "😀", " ok"]


def test_error_event_raises_stream_error(client: LoomClient) -> None:
    stream = client.stream_chat(USER, "boom")
    seen = []
    with pytest.raises(LoomStreamError) as info:
        for event in stream:
            seen.append(event)
    assert len(seen) == 2 and stream.text == "1,"
    assert info.value.error_type == "worker_died"
    assert info.value.message == "worker w0 exited"
    assert isinstance(info.value.event, ErrorEvent)


def test_error_event_can_arrive_as_a_typed_event(client: LoomClient) -> None:
    events = list(client.stream_chat(USER, "boom", raise_on_error=False))
    assert isinstance(events[-1], ErrorEvent)
    assert events[-1].error_type == "worker_died"


def test_stream_cut_off_without_final_event_raises(client: LoomClient) -> None:
    with pytest.raises(LoomStreamError, match="before its final event"):
        list(client.stream_chat(USER, "cutoff"))


def test_stream_http_errors_carry_the_servers_message(client: LoomClient) -> None:
    with pytest.raises(LoomHTTPError) as info:
        with client.stream_chat(USER, "missing"):
            pass
    assert (info.value.status_code, info.value.error_type) == (404, "model_not_loaded")
    assert info.value.message == "model 'missing' is not loaded"
    with pytest.raises(LoomHTTPError, match=r"max_tokens: Input should be less than or equal to 8192 \(HTTP 422\)"):
        list(client.stream_chat(USER, "invalid"))


def test_stream_generate(client: LoomClient, server: FakeLoom) -> None:
    events = list(client.stream_generate("Once upon", "fake/tiny", max_tokens=5))
    assert isinstance(events[-1], MessageDelta)
    assert server.last("/generate")["body"] == {"model": "fake/tiny", "max_tokens": 5, "stream": True, "prompt": "Once upon"}


def test_closing_the_stream_early_disconnects(client: LoomClient, server: FakeLoom) -> None:
    drain(server.disconnects)
    with client.stream_chat(USER, "endless") as stream:
        for n, _ in enumerate(stream):
            if n == 2:
                break
    assert server.disconnects.get(timeout=5) == "endless"


def test_abandoning_the_iterator_disconnects(client: LoomClient, server: FakeLoom) -> None:
    drain(server.disconnects)
    for n, _ in enumerate(client.stream_chat(USER, "endless")):
        if n == 2:
            break
    assert server.disconnects.get(timeout=5) == "endless"
    # The client is still usable afterwards.
    assert client.health().status == "healthy"


def test_connection_error_when_nothing_listens() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with LoomClient(url) as c:
        with pytest.raises(LoomConnectionError) as info:
            c.health()
        assert url in str(info.value) and "loom serve" in str(info.value)
        with pytest.raises(LoomConnectionError):
            list(c.stream_chat(USER))


# --- the async client ------------------------------------------------------------


def test_async_client(server: FakeLoom) -> None:
    async def main() -> None:
        async with AsyncLoomClient(server.url) as c:
            assert (await c.health()).status == "healthy"
            assert (await c.chat(USER)).text == "1, 2, 3"
            arrivals = []
            async with c.stream_chat(USER, "slow", return_hidden_states=True) as stream:
                async for event in stream:
                    arrivals.append(time.monotonic())
            assert stream.text == "1, 2, 3"
            assert stream.final is not None and stream.final.hidden_state is not None
            assert arrivals[4] - arrivals[0] > 2 * SLOW
            with pytest.raises(LoomStreamError, match="worker w0 exited"):
                async with c.stream_chat(USER, "boom") as stream:
                    async for _ in stream:
                        pass
            with pytest.raises(LoomHTTPError, match="not loaded"):
                await c.chat(USER, "missing")

            drain(server.disconnects)
            async with c.stream_chat(USER, "endless") as stream:
                async for _ in stream:
                    break
            assert await asyncio.to_thread(server.disconnects.get, timeout=5) == "endless"

        async with AsyncLoomClient(f"http://127.0.0.1:{free_port()}") as down:
            with pytest.raises(LoomConnectionError, match="loom serve"):
                await down.models()

    asyncio.run(main())
