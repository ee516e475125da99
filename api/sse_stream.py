"""A streaming answer written by the broker reader itself, as each frame arrives.

The relay's per-token cost used to be a chain: the reader put a frame in the
request's mailbox, woke the request's task, which resumed a stack of async
generators and Starlette's StreamingResponse, whose `send` went down through
every middleware's wrapper to uvicorn. Here the response registers a sink on
its mailbox: the reader (api/broker_client.py) calls it with each frame, it
turns the frame into SSE bytes and drives the ASGI `send` coroutine on the
spot, so a token costs no task switch and no generator. The request's own task
only sends the headers (through every middleware, like any answer), then
sleeps until the stream ends or the client hangs up.

The reader must never block: when a `send` would wait (uvicorn pauses writing
while the client's socket buffer is full), the sink keeps that suspended send
and queues what follows; the request's task finishes them in order and the
reader goes back to writing directly once the queue is empty. Nothing is
dropped and nothing overtakes.

Body chunks go to the innermost `send` (scope["loom.send"], api/asgi.py) when
every middleware passes body messages through unchanged; headers and status
always go through the middlewares (request ids, metrics). The frame is
formatted in the request's own context (contextvars), so error bodies and log
lines name its request id as before.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import types
from collections import deque
from typing import Any

from fastapi.responses import Response, StreamingResponse

from api.broker_client import TERMINAL, Exchange, Frame
from api.events import Want, delta_chunk, delta_event, error_event, message_delta
from api.research_events import has_extras, states_events, token_events
from api.responses import SSE_HEADERS
from loom import protocol as P

log = logging.getLogger("loom.api")

# The headers StreamingResponse(media_type="text/event-stream", headers=SSE_HEADERS) sends, made once.
_RAW_HEADERS = StreamingResponse(iter(()), media_type="text/event-stream", headers=SSE_HEADERS).raw_headers
_NO_ANSWER = P.Error(rid="", type=P.ErrorType.INTERNAL, message="the request ended without an answer")


def frame_events(reply: P.Message, buffers: list[Any], want: Want, started: float) -> bytes:
    """A frame's SSE events (b"" for none), as the contract writes them."""
    if type(reply) is P.Token:
        return token_events(reply, buffers, want) if has_extras(reply) else delta_event(reply.text)
    if isinstance(reply, P.States):
        return b"".join(states_events(reply.arrays, buffers, want))
    if isinstance(reply, P.Final):
        return message_delta(reply, buffers, want, time.perf_counter() - started)
    if isinstance(reply, P.Error):
        return error_event(reply)
    return error_event(_NO_ANSWER)  # another terminal frame: this request has no answer


class SseStream(Response):
    """The ASGI answer of a streaming generation whose first frames have already arrived.

    A Response (FastAPI passes those through as they are), with
    StreamingResponse's headers and none of its body machinery.
    """

    media_type = "text/event-stream"

    def __init__(self, exchange: Exchange, first: list[Frame], want: Want, started: float) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = list(_RAW_HEADERS)
        self.exchange = exchange
        self.first = first
        self.want = want
        self.started = started
        self._send: Any = None
        self._context: contextvars.Context | None = None
        self._backlog: deque[dict] = deque()  # body messages waiting behind a send that would block
        self._blocked: tuple[Any, Any] | None = None  # (suspended send coroutine, what it waits on)
        self._wake: asyncio.Future | None = None
        self._ended = False  # the last body message is written or queued
        self._failure: BaseException | None = None
        self._observer = exchange.observer
        self._cycle: Any = None  # uvicorn's connection state, when plain tokens may go straight to its transport

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        self._send = scope.get("loom.send") or send
        self._cycle = _chunked_cycle(self._send)
        self._context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        listening = loop.create_task(_disconnect(receive))
        exchange = self.exchange
        try:
            self._feed(self.first)
            if not self._ended:
                box = exchange.box
                waiting, box.frames = box.frames, []
                if waiting:
                    self._feed(exchange.arrived(waiting))
                if not self._ended:
                    box.sink, box.on_text = self._on_frame, self._on_text
            while True:
                if self._blocked is not None:
                    await self._finish_blocked(listening)
                    continue
                if self._ended or self._failure is not None or listening.done():
                    break
                self._wake = loop.create_future()
                await asyncio.wait((self._wake, listening), return_when=asyncio.FIRST_COMPLETED)
                self._wake = None
            if self._failure is not None:
                raise self._failure
            if self.background is not None:
                await self.background()
        finally:
            exchange.close()  # a client that went away: the request is cancelled, the worker stops
            listening.cancel()
            blocked, self._blocked = self._blocked, None
            if blocked is not None:
                blocked[0].close()

    # --- the reader's side: runs inside BrokerClient._read -------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        try:
            self._context.run(self._feed, self.exchange.arrived([frame]))  # type: ignore[union-attr]
        except BaseException as exc:  # never into the reader: the request's task raises it
            self._fail(exc)

    def _on_text(self, text: str, now: float) -> None:
        """A plain token (arrived at `now`): its delta event, without a Token message or a context switch."""
        try:
            if self._observer is not None:
                self._observer.token(self.exchange.rid, now)
            cycle = self._cycle
            if cycle is not None and self._blocked is None and not self._backlog \
                    and not cycle.flow.write_paused and not cycle.disconnected:
                cycle.transport.write(delta_chunk(text))
                return
            self._write({"type": "http.response.body", "body": delta_event(text), "more_body": True})
        except BaseException as exc:
            self._fail(exc)

    def _feed(self, frames: list[Frame]) -> None:
        want, started = self.want, self.started
        for reply, buffers in frames:
            events = frame_events(reply, buffers, want, started)
            if isinstance(reply, TERMINAL):
                self.exchange.box.sink = self.exchange.box.on_text = None
                self._ended = True
                self._write({"type": "http.response.body", "body": events, "more_body": False})
                self._wake_task()
                return
            if events:
                self._write({"type": "http.response.body", "body": events, "more_body": True})

    def _write(self, message: dict) -> None:
        if self._blocked is not None or self._backlog:
            self._backlog.append(message)
            return
        coro = self._send(message)
        try:
            waits_on = coro.send(None)
        except StopIteration:
            return
        # The send would wait (flow control): the request's task finishes it, and what follows queues behind it.
        self._blocked = (coro, waits_on)
        self._wake_task()

    def _wake_task(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self.exchange.box.sink = self.exchange.box.on_text = None
        self._failure = exc
        self._wake_task()

    # --- the request task's side --------------------------------------------------------------------

    async def _finish_blocked(self, listening: asyncio.Task) -> None:
        """Finish the suspended send, then write the queue out, sends that would block included."""
        coro, waits_on = self._blocked  # type: ignore[misc]
        await _resume(coro, waits_on)
        while self._backlog:
            if listening.done():  # the client is gone: nothing more can be written
                self._backlog.clear()
                break
            await self._send(self._backlog.popleft())
        self._blocked = None


def _chunked_cycle(send: Any) -> Any:
    """uvicorn's httptools request cycle behind `send`, if it writes this answer's body in chunks; else None.

    A plain token is then one transport write, as `send` would make it,
    without building a message and driving a coroutine (about a microsecond
    a token). Only while `send` would write at once: no pause, no backlog.
    """
    cycle = getattr(send, "__self__", None)
    if type(cycle).__module__ != "uvicorn.protocols.http.httptools_impl" or type(cycle).__name__ != "RequestResponseCycle":
        return None
    try:
        fits = cycle.chunked_encoding is True and cycle.response_started and cycle.scope["method"] != "HEAD" \
            and cycle.transport is not None and cycle.flow is not None and isinstance(cycle.disconnected, bool)
    except (AttributeError, KeyError):  # another uvicorn: the plain path
        return None
    return cycle if fits else None


@types.coroutine
def _resume(coro: Any, waits_on: Any) -> Any:
    """Await the rest of a coroutine that was driven by hand and yielded `waits_on`."""
    while True:
        try:
            value = yield waits_on
        except BaseException as exc:
            try:
                waits_on = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                waits_on = coro.send(value)
            except StopIteration as stop:
                return stop.value


async def _disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
