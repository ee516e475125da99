"""The API process's one connection to the broker.

One DEALER socket and one reader: a callback the event loop runs when the
socket's file descriptor signals (no zmq.asyncio futures: they cost each send
~0.1 ms, an extra loop pass included). The reader routes every incoming
frame to the mailbox of the request it belongs to (a step's tokens arrive as
one Tokens message for this process and are split here), so each HTTP handler
just awaits its own mailbox and writes out what it holds the moment it
arrives: everything that arrived together, together. A ping task notices a
broker that died or restarted and fails the requests that were in flight with
it, so no stream waits forever.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from argparse import Namespace
from typing import Any, AsyncIterator

import zmq

from api.reply_socket import open_reply_socket
from loom import protocol as P
from loom.curve import apply_curve_client
from loom.logs import current_request_id

log = logging.getLogger("loom.api")

# Plain ints: pyzmq's enum flags cost a few µs of Python per use, on the per-message path.
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)

Frame = tuple[P.Message, list[Any]]

# The last frame of a request: nothing follows it.
TERMINAL = (P.Final, P.Error, P.Loaded, P.Unloaded, P.Status, P.PatchResult)


class Mailbox:
    """One request's frames as they arrive; its handler takes all that are waiting at once.

    Lighter than an asyncio.Queue (a list and at most one future), and a
    handler that fell behind by several tokens writes them in one go.
    """

    __slots__ = ("frames", "_waiter", "sink", "on_text")

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self._waiter: asyncio.Future | None = None
        # When set, frames go straight to it as they arrive (api/sse_stream.py), not to `frames`.
        self.sink: Any = None
        # Set with `sink` by one that also takes a plain token (no extras) as just its text.
        self.on_text: Any = None

    def put(self, frame: Frame) -> None:
        sink = self.sink
        if sink is not None:
            sink(frame)
            return
        self.frames.append(frame)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[Frame]:
        while not self.frames:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        frames, self.frames = self.frames, []
        return frames


class BrokerError(Exception):
    """A request the broker or a worker answered with an error."""

    def __init__(self, error_type: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.retry_after = retry_after

    @classmethod
    def from_msg(cls, msg: P.Error) -> "BrokerError":
        return cls(msg.type, msg.message, msg.retry_after)

    def as_msg(self, rid: str) -> P.Error:
        return P.Error(rid=rid, type=self.error_type, message=self.message, retry_after=self.retry_after)


class BrokerClient:
    def __init__(self, address: str, curve: Namespace | None = None, direct_replies: bool = True):
        self.address = address
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, f"api-{uuid.uuid4().hex[:12]}".encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        # Queue messages only on a live connection, so a missing broker fails
        # a request at once instead of holding it until the broker appears.
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if curve is not None:
            apply_curve_client(self.sock, curve)
        self.sock.connect(address)
        # Where workers on this host send a generation's frames, skipping the broker (api/reply_socket.py).
        self.replies = open_reply_socket() if direct_replies else None
        self.queues: dict[str, Mailbox] = {}
        self.broker_id: str | None = None
        self.last_pong = 0.0
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        # Sees each request sent and each frame handed out (api/metrics.py GenerationMetrics).
        self.observer: Any = None

    @property
    def connected(self) -> bool:
        return time.monotonic() - self.last_pong < P.HEARTBEAT_TIMEOUT_S

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.getsockopt(zmq.FD), self._read)
        self._loop.call_soon(self._read)  # anything that came before the reader was added
        if self.replies is not None:
            await self.replies.start(self._route_safely)
        self._tasks = [asyncio.create_task(self._ping(), name="broker-ping")]

    async def wait_connected(self, timeout: float) -> bool:
        """Whether the broker answered a ping within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.connected

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._loop is not None:
            self._loop.remove_reader(self.sock.getsockopt(zmq.FD))
        if self.replies is not None:
            self.replies.close()
        self.sock.close(0)
        self.ctx.term()

    # --- the reader ---------------------------------------------------------------

    def _read(self) -> None:
        """Everything waiting on the socket, routed; runs when its descriptor signals.

        ZeroMQ's descriptor is edge-like: it signals when the socket's state
        may have changed, and reading until EAGAIN re-arms it. So this reads
        to the end, and a send (which can take that signal) checks for input
        after itself (`_send_frames`).
        """
        sock = self.sock
        while True:
            try:
                frames = sock.recv_multipart(_NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._route_safely(frames)

    def _route_safely(self, frames: list[Any]) -> None:
        """Route one message, from the broker or straight from a worker (api/reply_socket.py)."""
        try:
            self._route(frames)
        except Exception:  # one bad message must not stop the reader
            log.exception("error routing a message; dropped")

    def _route(self, frames: list[Any]) -> None:
        try:
            msg, buffers = P.decode(frames)
        except P.ProtocolError as exc:
            log.warning("dropped a malformed message from the broker: %s", exc)
            return
        if type(msg) is P.Tokens:
            self._route_tokens(msg, buffers)
            return
        if isinstance(msg, P.Pong):
            self._on_pong(msg)
            return
        box = self.queues.get(getattr(msg, "rid", ""))
        if box is not None:
            box.put((msg, buffers))

    def _route_tokens(self, msg: P.Tokens, buffers: list[Any]) -> None:
        queues = self.queues
        if msg.extras:
            for frame in msg.tokens(buffers):
                box = queues.get(frame[0].rid)
                if box is not None:
                    box.put(frame)
            return
        # Plain tokens (the common case): a sink that takes bare text gets just that, no Token message made.
        t_emit = msg.t_emit
        now = time.perf_counter()  # the step's tokens arrived together
        for rid, text, index in zip(msg.rids, msg.texts, msg.indexes):
            box = queues.get(rid)
            if box is not None:
                on_text = box.on_text
                if on_text is not None:
                    on_text(text, now)
                else:
                    box.put((P.Token(rid, text, index, t_emit), []))

    def _on_pong(self, msg: P.Pong) -> None:
        if self.broker_id is not None and msg.broker_id != self.broker_id:
            log.warning("broker restarted (%s -> %s)", self.broker_id, msg.broker_id)
            self._fail_all(P.ErrorType.BROKER_LOST, "the broker restarted while this request was running; retry")
        if self.broker_id is None or msg.broker_id != self.broker_id:
            log.info("connected to broker %s at %s", msg.broker_id, self.address)
        self.broker_id = msg.broker_id
        self.last_pong = time.monotonic()

    async def _ping(self) -> None:
        lost = False
        while True:
            try:
                self._send_frames(P.encode(P.Ping(sender="api")))
            except zmq.Again:
                pass
            await asyncio.sleep(P.HEARTBEAT_INTERVAL_S)
            if self.broker_id is not None and not self.connected:
                if not lost:
                    log.warning("broker at %s stopped answering", self.address)
                    self._fail_all(P.ErrorType.BROKER_LOST, "lost the connection to the broker; retry")
                lost = True
            else:
                lost = False

    def _fail_all(self, error_type: str, message: str) -> None:
        for rid, box in self.queues.items():
            box.put((P.Error(rid=rid, type=error_type, message=message), []))

    def abort_all(self, error_type: str, message: str) -> None:
        """End every request in flight with an error, and tell the workers to stop on them."""
        for rid in list(self.queues):
            self.cancel(rid)
        self._fail_all(error_type, message)

    # --- requests -------------------------------------------------------------------

    def _send(self, msg: P.Message) -> None:
        if getattr(msg, "request_id", None) == "":
            msg.request_id = current_request_id()  # type: ignore[attr-defined]
        if type(msg) is P.Generate and self.replies is not None:
            msg.reply_to = self.replies.endpoint
        try:
            self._send_frames(P.encode(msg))
        except zmq.Again:
            raise BrokerError(P.ErrorType.BROKER_LOST,
                              f"the broker at {self.address} is not reachable; is `loom broker` running?") from None

    def _send_frames(self, frames: list[Any]) -> None:
        """Send without waiting (zmq.Again when the broker is not connected or not reading)."""
        self.sock.send_multipart(frames, _NOBLOCK)
        # A send processes the socket's pending commands and can consume the
        # descriptor's signal for input that is already waiting: read it soon.
        if self.sock.getsockopt(_EVENTS) & _POLLIN and self._loop is not None:
            self._loop.call_soon(self._read)

    def cancel(self, rid: str) -> None:
        try:
            self._send(P.Cancel(rid=rid))
        except BrokerError:
            pass

    def exchange(self, msg: P.Message) -> "Exchange":
        """Send `msg`; its frames arrive in the returned Exchange's mailbox. Raises BrokerError."""
        return Exchange(self, msg)

    async def batches(self, msg: P.Message) -> AsyncIterator[list[Frame]]:
        """Send `msg` and yield its frames until the terminal one, in lists of those that arrived together.

        If the consumer stops early (the HTTP client went away), the request
        is cancelled, so the worker stops at its next step.
        """
        try:
            exchange = self.exchange(msg)
        except BrokerError as exc:
            yield [(exc.as_msg(msg.rid), [])]  # type: ignore[attr-defined]
            return
        try:
            while not exchange.finished:
                yield await exchange.take()
        finally:
            exchange.close()

    async def stream(self, msg: P.Message) -> AsyncIterator[Frame]:
        """As `batches`, one frame at a time."""
        batches = self.batches(msg)
        try:
            async for frames in batches:
                for frame in frames:
                    yield frame
        finally:
            await batches.aclose()

    async def request(self, msg: P.Message, timeout: float | None = None) -> P.Message:
        """Send `msg` and return its one answer; raise BrokerError for errors."""
        async def first() -> P.Message:
            async for reply, _ in self.stream(msg):
                return reply
            raise AssertionError("stream ended without a reply")

        try:
            reply = await asyncio.wait_for(first(), timeout)
        except asyncio.TimeoutError:
            raise BrokerError(P.ErrorType.BROKER_LOST,
                              f"no answer from the broker at {self.address} within {timeout:g}s") from None
        if isinstance(reply, P.Error):
            raise BrokerError.from_msg(reply)
        return reply

    async def status(self, timeout: float = 2.0) -> P.Status:
        reply = await self.request(P.StatusRequest(rid=new_rid()), timeout)
        assert isinstance(reply, P.Status)
        return reply


class Exchange:
    """One request to the broker and the frames it gets back, up to the terminal one.

    Its frames are taken in batches (`take`) or handed as they arrive to a
    sink set on `box` (api/sse_stream.py); either way `arrived` sees them
    first, so the metrics observer sees each frame once. `close` ends it:
    the request is cancelled unless its terminal frame came.
    """

    __slots__ = ("client", "rid", "box", "finished", "observer", "closed")

    def __init__(self, client: BrokerClient, msg: P.Message) -> None:
        self.client = client
        self.rid: str = msg.rid  # type: ignore[attr-defined]
        self.box = client.queues[self.rid] = Mailbox()
        self.finished = False
        self.closed = False
        self.observer = client.observer
        try:
            client._send(msg)
        except BaseException:
            self.finished = True  # nothing was sent: nothing to cancel
            self.close()
            raise
        if self.observer is not None:
            self.observer.sent(msg)

    def arrived(self, frames: list[Frame]) -> list[Frame]:
        """`frames` up to and including the terminal one (which finishes the exchange)."""
        for i, frame in enumerate(frames):
            if isinstance(frame[0], TERMINAL):
                self.finished = True
                del frames[i + 1:]
                break
        if self.observer is not None:
            self.observer.received(self.rid, frames)
        return frames

    async def take(self) -> list[Frame]:
        """The frames waiting (at least one), as `arrived` leaves them."""
        return self.arrived(await self.box.take())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.client.queues.get(self.rid) is self.box:
            del self.client.queues[self.rid]
        self.box.sink = self.box.on_text = None
        if self.observer is not None:
            self.observer.closed(self.rid)
        if not self.finished:
            self.client.cancel(self.rid)


def new_rid() -> str:
    return uuid.uuid4().hex
