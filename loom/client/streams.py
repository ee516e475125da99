"""Typed event streams over one streaming HTTP response.

A stream owns its response. Leaving a `with` block, calling `close()`, or an
exception (Ctrl-C included) while iterating closes the response, which drops
the connection: that is how the server learns to stop generating.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import TracebackType

import httpx

from loom.client.errors import LoomStreamError
from loom.client.models import ErrorEvent, MessageDelta, StreamEvent, TextDelta, parse_stream_event
from loom.client.sse import aiter_sse, iter_sse

__all__ = ["EventStream", "AsyncEventStream"]


class _StreamState:
    """What both stream flavours track while events go by."""

    def __init__(self, raise_on_error: bool) -> None:
        self.raise_on_error = raise_on_error
        self.pieces: list[str] = []
        self.final: MessageDelta | None = None
        self.error: ErrorEvent | None = None

    @property
    def finished(self) -> bool:
        return self.final is not None or self.error is not None

    def record(self, event: StreamEvent) -> None:
        if isinstance(event, TextDelta):
            self.pieces.append(event.text)
        elif isinstance(event, MessageDelta):
            self.final = event
        elif isinstance(event, ErrorEvent):
            self.error = event
            if self.raise_on_error:
                raise LoomStreamError(event.message, error_type=event.error_type, event=event)


def _lost(exc: httpx.TransportError) -> LoomStreamError:
    reason = str(exc) or type(exc).__name__
    return LoomStreamError(f"the connection to the server broke mid-stream ({reason})", error_type="connection_lost")


def _cut_off() -> LoomStreamError:
    return LoomStreamError(
        "the server closed the stream before its final event (no message_delta or error)",
        error_type="incomplete_stream",
    )


class EventStream:
    """Iterate for `TextDelta`, then one `MessageDelta` (or `ErrorEvent` when
    `raise_on_error` is false; otherwise an `error` event raises
    `LoomStreamError`). The request is sent on `with` or the first iteration.
    """

    def __init__(self, open_response: Callable[[], httpx.Response], *, raise_on_error: bool = True) -> None:
        self._open_response = open_response
        self._state = _StreamState(raise_on_error)
        self._response: httpx.Response | None = None
        self._started = False

    @property
    def text(self) -> str:
        """All text received so far."""
        return "".join(self._state.pieces)

    @property
    def final(self) -> MessageDelta | None:
        """The closing `message_delta`, once it arrived."""
        return self._state.final

    @property
    def error(self) -> ErrorEvent | None:
        return self._state.error

    def open(self) -> EventStream:
        if self._response is None:
            self._response = self._open_response()
        return self

    def close(self) -> None:
        if self._response is not None:
            self._response.close()

    def __enter__(self) -> EventStream:
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __iter__(self) -> Iterator[StreamEvent]:
        if self._started:
            raise RuntimeError("an event stream can be iterated only once")
        self._started = True
        response = self.open()._response
        assert response is not None
        try:
            for sse in iter_sse(response.iter_bytes()):
                event = parse_stream_event(sse)
                if event is None:
                    continue
                self._state.record(event)
                yield event
                if self._state.finished:
                    return
        except httpx.TransportError as exc:
            raise _lost(exc) from exc
        finally:
            # Runs on normal end, on error, and when the consumer stops early
            # and the generator is closed.
            self.close()
        raise _cut_off()


class AsyncEventStream:
    """The async twin of `EventStream`. Prefer `async with`: an abandoned
    async iterator is only closed whenever the event loop gets to it."""

    def __init__(self, open_response: Callable[[], Awaitable[httpx.Response]], *, raise_on_error: bool = True) -> None:
        self._open_response = open_response
        self._state = _StreamState(raise_on_error)
        self._response: httpx.Response | None = None
        self._started = False

    @property
    def text(self) -> str:
        return "".join(self._state.pieces)

    @property
    def final(self) -> MessageDelta | None:
        return self._state.final

    @property
    def error(self) -> ErrorEvent | None:
        return self._state.error

    async def open(self) -> AsyncEventStream:
        if self._response is None:
            self._response = await self._open_response()
        return self

    async def aclose(self) -> None:
        if self._response is not None:
            await self._response.aclose()

    async def __aenter__(self) -> AsyncEventStream:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        if self._started:
            raise RuntimeError("an event stream can be iterated only once")
        self._started = True
        response = (await self.open())._response
        assert response is not None
        try:
            async for sse in aiter_sse(response.aiter_bytes()):
                event = parse_stream_event(sse)
                if event is None:
                    continue
                self._state.record(event)
                yield event
                if self._state.finished:
                    return
        except httpx.TransportError as exc:
            raise _lost(exc) from exc
        finally:
            await self.aclose()
        raise _cut_off()
