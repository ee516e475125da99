"""An incremental Server-Sent Events parser.

Follows the WHATWG "event stream interpretation" rules
(https://html.spec.whatwg.org/multipage/server-sent-events.html#parsing-an-event-stream):
UTF-8 with one leading BOM stripped, lines ended by CRLF, LF or CR, comment
lines starting with ":", the fields event, data, id and retry, and events
dispatched on a blank line.

The decoder is fed raw bytes in whatever chunks the network delivers. Chunk
boundaries may fall anywhere: inside a line, between the CR and LF of a CRLF,
or inside a multibyte UTF-8 character. Lines have no length limit (a hidden
state can make one `data:` line hundreds of kilobytes long).
"""
from __future__ import annotations

import codecs
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

__all__ = ["ServerSentEvent", "SSEDecoder", "iter_sse", "aiter_sse"]

_LINE_END = re.compile(r"\r\n|\r|\n")
_BOM = "\ufeff"


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched event.

    `id` is the stream's last event id at dispatch time (it persists across
    events, as the spec says); `retry` is set only on the event whose block
    carried a valid `retry:` field.
    """

    event: str = "message"
    data: str = ""
    id: str = ""
    retry: int | None = None


class SSEDecoder:
    """Turns byte chunks into events. Keep one decoder per stream."""

    def __init__(self) -> None:
        # errors="replace": a stray invalid byte must not kill a whole stream.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False  # whether the BOM check has been done
        self._after_cr = False  # last chunk ended in CR: a leading LF is its pair
        self._partial: list[str] = []  # pieces of the unfinished line

        self._event_type = ""
        self._data: list[str] = []
        self._last_event_id = ""
        self._retry: int | None = None
        self.reconnection_time: int | None = None  # ms, from the last valid retry

    @property
    def last_event_id(self) -> str:
        return self._last_event_id

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Consume a chunk and return the events it completed (often none)."""
        return self._feed_text(self._utf8.decode(chunk))

    def flush(self) -> list[ServerSentEvent]:
        """Signal end of stream.

        An event not yet ended by a blank line is discarded, as the spec
        requires; this returns whatever a final complete line still dispatches
        (in practice nothing).
        """
        events = self._feed_text(self._utf8.decode(b"", final=True))
        # A final line without a terminator is discarded with its event.
        self._partial.clear()
        self._reset_event()
        return events

    def _feed_text(self, text: str) -> list[ServerSentEvent]:
        if not text:
            # A chunk that ended mid-character decodes to nothing; keep all
            # state (notably _after_cr) for the bytes that complete it.
            return []
        if not self._started:
            self._started = True
            if text.startswith(_BOM):
                text = text[1:]
        start = 0
        if self._after_cr:
            self._after_cr = False
            if text.startswith("\n"):
                start = 1

        events: list[ServerSentEvent] = []
        for match in _LINE_END.finditer(text, start):
            self._partial.append(text[start : match.start()])
            line = "".join(self._partial)
            self._partial.clear()
            event = self._process_line(line)
            if event is not None:
                events.append(event)
            start = match.end()
            if match.group() == "\r" and start == len(text):
                self._after_cr = True
        if start < len(text):
            self._partial.append(text[start:])
        return events

    def _process_line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event_type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self._last_event_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self._retry = int(value)
                self.reconnection_time = self._retry
        # Any other field name is ignored.
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        if not self._data:
            self._reset_event()
            return None
        event = ServerSentEvent(
            event=self._event_type or "message",
            data="\n".join(self._data),
            id=self._last_event_id,
            retry=self._retry,
        )
        self._reset_event()
        return event

    def _reset_event(self) -> None:
        self._event_type = ""
        self._data = []
        self._retry = None


def iter_sse(chunks: Iterable[bytes]) -> Iterator[ServerSentEvent]:
    """Events from a byte iterator such as `httpx.Response.iter_bytes()`."""
    decoder = SSEDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)
    yield from decoder.flush()


async def aiter_sse(chunks: AsyncIterable[bytes]) -> AsyncIterator[ServerSentEvent]:
    """Events from an async byte iterator such as `httpx.Response.aiter_bytes()`."""
    decoder = SSEDecoder()
    async for chunk in chunks:
        for event in decoder.feed(chunk):
            yield event
    for event in decoder.flush():
        yield event
