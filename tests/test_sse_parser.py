"""The SSE parser against the WHATWG event-stream rules, one test per rule,
and against the event shapes of the contract."""
from __future__ import annotations

import asyncio
import json

import pytest

from loom.client import ErrorEvent, LoomStreamError, MessageDelta, TextDelta, parse_stream_event
from loom.client.sse import ServerSentEvent, SSEDecoder, aiter_sse, iter_sse


def parse(*chunks: bytes) -> list[ServerSentEvent]:
    return list(iter_sse(chunks))


def parse_bytewise(data: bytes) -> list[ServerSentEvent]:
    return parse(*(data[i : i + 1] for i in range(len(data))))


# --- fields ------------------------------------------------------------------


def test_event_field_sets_the_type() -> None:
    assert parse(b"event: ping\ndata: x\n\n") == [ServerSentEvent(event="ping", data="x")]


def test_event_type_defaults_to_message_and_resets_after_dispatch() -> None:
    events = parse(b"event: a\ndata: 1\n\ndata: 2\n\n")
    assert [e.event for e in events] == ["a", "message"]


def test_data_field_is_the_payload() -> None:
    assert parse(b"data: hello\n\n")[0].data == "hello"


def test_multiline_data_is_joined_with_newlines() -> None:
    assert parse(b"data: one\ndata: two\ndata:\ndata: four\n\n")[0].data == "one\ntwo\n\nfour"


def test_id_field_sets_last_event_id_which_persists() -> None:
    events = parse(b"id: 7\ndata: a\n\ndata: b\n\nid\ndata: c\n\n")
    assert [e.id for e in events] == ["7", "7", ""]


def test_id_containing_nul_is_ignored() -> None:
    assert parse(b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n")[1].id == "1"


def test_retry_field_with_digits_sets_reconnection_time() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b"retry: 1500\ndata: x\n\n")
    assert events[0].retry == 1500
    assert decoder.reconnection_time == 1500


def test_retry_field_that_is_not_all_digits_is_ignored() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b"retry: 15s\ndata: x\n\nretry: -1\ndata: y\n\n")
    assert [e.retry for e in events] == [None, None]
    assert decoder.reconnection_time is None


def test_unknown_fields_are_ignored() -> None:
    assert parse(b"foo: bar\ndata: x\n\n") == [ServerSentEvent(data="x")]


def test_field_without_colon_has_empty_value() -> None:
    # "data" alone appends an empty line, so the event is dispatched with "".
    assert parse(b"data\n\n") == [ServerSentEvent(data="")]
    assert parse(b"event\ndata: x\n\n")[0].event == "message"


def test_single_leading_space_after_colon_is_removed() -> None:
    assert parse(b"data:x\n\n")[0].data == "x"
    assert parse(b"data: x\n\n")[0].data == "x"
    assert parse(b"data:  x \n\n")[0].data == " x "


def test_colon_in_value_is_kept() -> None:
    assert parse(b'data: {"a": "b:c"}\n\n')[0].data == '{"a": "b:c"}'


def test_comment_lines_are_ignored() -> None:
    assert parse(b": keep-alive\n:\ndata: x\n: between\n\n") == [ServerSentEvent(data="x")]


def test_comment_alone_dispatches_nothing() -> None:
    assert parse(b": ping\n\n") == []


# --- line endings --------------------------------------------------------------


def test_lf_line_endings() -> None:
    assert parse(b"event: e\ndata: x\n\n") == [ServerSentEvent(event="e", data="x")]


def test_crlf_line_endings() -> None:
    assert parse(b"event: e\r\ndata: x\r\n\r\n") == [ServerSentEvent(event="e", data="x")]


def test_cr_line_endings() -> None:
    assert parse(b"event: e\rdata: x\r\r") == [ServerSentEvent(event="e", data="x")]


def test_mixed_line_endings() -> None:
    assert parse(b"data: a\rdata: b\r\ndata: c\n\r\n") == [ServerSentEvent(data="a\nb\nc")]


def test_crlf_split_across_chunks_is_one_line_break() -> None:
    # If the CR and LF were taken as two line ends, the LF would be a blank
    # line and dispatch the event early, splitting "a" from "b".
    assert parse(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [ServerSentEvent(data="a\nb")]


def test_cr_at_chunk_end_then_other_text_is_a_line_break() -> None:
    assert parse(b"data: a\r", b"data: b\r", b"\r") == [ServerSentEvent(data="a\nb")]


def test_cr_then_chunk_that_decodes_to_nothing_then_lf() -> None:
    # The middle chunk is half of "é": the pending CR must survive it.
    assert parse(b"data: a\r", b"\n\r", b"\ndata: \xc3", b"\xa9\n\n") == [
        ServerSentEvent(data="a"),
        ServerSentEvent(data="é"),
    ]


# --- BOM ---------------------------------------------------------------------


def test_leading_bom_is_stripped() -> None:
    assert parse(b"\xef\xbb\xbfdata: x\n\n") == [ServerSentEvent(data="x")]


def test_leading_bom_split_across_chunks_is_stripped() -> None:
    assert parse(b"\xef", b"\xbb", b"\xbfdata: x\n\n") == [ServerSentEvent(data="x")]


def test_bom_is_stripped_only_once() -> None:
    # A second BOM is part of the next line, making "\ufeffdata" an unknown field.
    assert parse(b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n") == []
    assert parse(b"\xef\xbb\xbfdata: x\n\n\xef\xbb\xbfdata: y\n\n") == [ServerSentEvent(data="x")]


def test_bom_inside_data_is_kept() -> None:
    assert parse(b"data: \xef\xbb\xbfx\n\n")[0].data == "\ufeffx"


# --- dispatch ----------------------------------------------------------------


def test_events_dispatch_only_on_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"event: e\ndata: x\n") == []
    assert decoder.feed(b"\n") == [ServerSentEvent(event="e", data="x")]


def test_unterminated_event_at_end_of_stream_is_discarded() -> None:
    assert parse(b"data: a\n\ndata: b\n") == [ServerSentEvent(data="a")]
    assert parse(b"data: a\n\ndata: b") == [ServerSentEvent(data="a")]


def test_blank_line_without_data_dispatches_nothing() -> None:
    assert parse(b"\n\nevent: e\n\n\n") == []


def test_event_without_data_does_not_leak_its_type_into_the_next() -> None:
    assert parse(b"event: lost\n\ndata: x\n\n") == [ServerSentEvent(data="x")]


# --- size and chunking -------------------------------------------------------


def test_no_line_length_limit_200kb_data_line() -> None:
    payload = json.dumps({"type": "message_delta", "hidden_state": {"final": [0.123456] * 25_000}})
    assert len(payload) > 200_000
    data = f"event: message_delta\ndata: {payload}\n\n".encode()
    chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    assert parse(*chunks) == [ServerSentEvent(event="message_delta", data=payload)]


def test_200kb_line_fed_byte_by_byte() -> None:
    payload = "x" * 200_000
    assert parse_bytewise(f"data: {payload}\n\n".encode()) == [ServerSentEvent(data=payload)]


def test_feeding_byte_by_byte_gives_the_same_events() -> None:
    data = b"\xef\xbb\xbfevent: a\r\ndata: 1\r\n\r\n: c\rid: 9\rdata: \xe2\x82\xac\xf0\x9f\x98\x80\r\rdata: z\n\n"
    assert parse_bytewise(data) == parse(data)
    assert parse(data) == [
        ServerSentEvent(event="a", data="1"),
        ServerSentEvent(data="€😀", id="9"),
        ServerSentEvent(data="z", id="9"),
    ]


def test_every_split_point_gives_the_same_events() -> None:
    data = "event: x\r\ndata: héllo 😀\r\n\r\ndata: b\r\r".encode()
    whole = parse(data)
    for i in range(len(data) + 1):
        assert parse(data[:i], data[i:]) == whole, f"split at {i}"


def test_split_inside_multibyte_character() -> None:
    emoji = "😀".encode()
    assert parse(b"data: " + emoji[:1], emoji[1:3], emoji[3:] + b"\n\n") == [ServerSentEvent(data="😀")]


def test_invalid_utf8_becomes_replacement_character() -> None:
    assert parse(b"data: a\xffb\n\n")[0].data == "a\ufffdb"


def test_async_helper_yields_events_incrementally() -> None:
    seen: list[tuple[int, str]] = []
    fed = 0

    async def chunks():  # type: ignore[no-untyped-def]
        nonlocal fed
        for chunk in (b"data: 1\n\n", b"data: 2\n", b"\n"):
            fed += 1
            yield chunk

    async def main() -> None:
        async for event in aiter_sse(chunks()):
            seen.append((fed, event.data))

    asyncio.run(main())
    # The first event arrived before the second chunk was even asked for.
    assert seen == [(1, "1"), (3, "2")]


def test_sync_helper_yields_events_incrementally() -> None:
    fed = 0

    def chunks():  # type: ignore[no-untyped-def]
        nonlocal fed
        for chunk in (b"data: 1\n\n", b"data: 2\n\n"):
            fed += 1
            yield chunk

    events = iter_sse(chunks())
    assert next(events).data == "1" and fed == 1
    assert next(events).data == "2" and fed == 2


# --- contract event shapes ---------------------------------------------------


def contract_events(raw: bytes) -> list:  # type: ignore[type-arg]
    return [parse_stream_event(e) for e in parse_bytewise(raw)]


def test_content_block_delta_becomes_text_delta() -> None:
    raw = b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"type":"text_delta","text":" 1"}}\n\n'
    [event] = contract_events(raw)
    assert isinstance(event, TextDelta)
    assert event.text == " 1"


def test_message_delta_with_hidden_state() -> None:
    body = {
        "type": "message_delta",
        "delta": {"stop_reason": "max_tokens"},
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
        "metadata": {"model": "loom-tiny", "latency_ms": 12.5, "tokens_per_second": 80.1},
        "hidden_state": {"final": [3.0, -4.0], "shape": [1, 2], "layer": -1, "dtype": "float16"},
        "hidden_states": {"-1": {"vector": [3.0, -4.0], "shape": [1, 2], "layer": -1, "dtype": "float16"}},
    }
    raw = f"event: message_delta\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode()
    [event] = contract_events(raw)
    assert isinstance(event, MessageDelta)
    assert event.stop_reason == "max_tokens"
    assert event.usage.total_tokens == 17
    assert event.metadata["tokens_per_second"] == 80.1
    assert event.hidden_state is not None
    assert event.hidden_state.shape == [1, 2]
    assert event.hidden_state.values() == [3.0, -4.0]
    assert event.hidden_state.l2_norm() == 5.0
    assert event.hidden_states is not None and event.hidden_states["-1"].values() == [3.0, -4.0]


def test_error_event_becomes_error_event() -> None:
    raw = b'event: error\ndata: {"type":"error","error":{"type":"worker_died","message":"worker on cuda:0 exited"}}\n\n'
    [event] = contract_events(raw)
    assert isinstance(event, ErrorEvent)
    assert event.error_type == "worker_died"
    assert event.message == "worker on cuda:0 exited"


def test_unknown_fields_in_events_are_kept() -> None:
    raw = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a"}}\n\n'
    [event] = contract_events(raw)
    assert event.model_extra == {"index": 0}


def test_unnamed_event_is_typed_by_its_json() -> None:
    [event] = contract_events(b'data: {"type":"content_block_delta","delta":{"type":"text_delta","text":"a"}}\n\n')
    assert isinstance(event, TextDelta)


def test_unknown_event_is_skipped() -> None:
    assert contract_events(b'event: ping\ndata: {}\n\ndata: {"type":"later"}\n\ndata: not json\n\n') == [None, None, None]


def test_malformed_contract_event_raises_stream_error() -> None:
    with pytest.raises(LoomStreamError, match="malformed"):
        contract_events(b"event: content_block_delta\ndata: {not json\n\n")
