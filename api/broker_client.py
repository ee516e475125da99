"""The API process's one connection to the broker.

One DEALER socket and one reader task. The reader routes every incoming
frame to the queue of the request it belongs to, so each HTTP handler just
awaits its own queue and writes each frame out the moment it arrives. A ping
task notices a broker that died or restarted and fails the requests that were
in flight with it, so no stream waits forever.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from argparse import Namespace
from typing import Any, AsyncIterator

import zmq
import zmq.asyncio

from loom import protocol as P
from loom.curve import apply_curve_client
from loom.logs import current_request_id

log = logging.getLogger("loom.api")

Frame = tuple[P.Message, list[Any]]


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
    def __init__(self, address: str, curve: Namespace | None = None):
        self.address = address
        self.ctx = zmq.asyncio.Context()
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
        self.queues: dict[str, asyncio.Queue[Frame]] = {}
        self.broker_id: str | None = None
        self.last_pong = 0.0
        self._tasks: list[asyncio.Task] = []
        # Sees each request sent and each frame handed out (api/metrics.py GenerationMetrics).
        self.observer: Any = None

    @property
    def connected(self) -> bool:
        return time.monotonic() - self.last_pong < P.HEARTBEAT_TIMEOUT_S

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._read(), name="broker-reader"),
                       asyncio.create_task(self._ping(), name="broker-ping")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sock.close(0)
        self.ctx.term()

    # --- the reader ---------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            try:
                msg, buffers = P.decode(frames)
            except P.ProtocolError as exc:
                log.warning("dropped a malformed message from the broker: %s", exc)
                continue
            if isinstance(msg, P.Pong):
                self._on_pong(msg)
                continue
            queue = self.queues.get(getattr(msg, "rid", ""))
            if queue is not None:
                queue.put_nowait((msg, buffers))

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
                await self.sock.send_multipart(P.encode(P.Ping(sender="api")), zmq.NOBLOCK)
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
        for rid, queue in self.queues.items():
            queue.put_nowait((P.Error(rid=rid, type=error_type, message=message), []))

    def abort_all(self, error_type: str, message: str) -> None:
        """End every request in flight with an error, and tell the workers to stop on them."""
        for rid in list(self.queues):
            self.cancel(rid)
        self._fail_all(error_type, message)

    # --- requests -------------------------------------------------------------------

    def _send(self, msg: P.Message) -> None:
        if getattr(msg, "request_id", None) == "":
            msg.request_id = current_request_id()  # type: ignore[attr-defined]
        # A zmq.asyncio socket does not raise EAGAIN here: it returns a future
        # that holds it, and a request nobody could send would wait forever.
        sent = self.sock.send_multipart(P.encode(msg), zmq.NOBLOCK)
        error = sent.exception() if sent.done() else None
        if isinstance(error, zmq.Again):
            raise BrokerError(P.ErrorType.BROKER_LOST,
                              f"the broker at {self.address} is not reachable; is `loom broker` running?")
        if error is not None:
            raise error

    def cancel(self, rid: str) -> None:
        try:
            self._send(P.Cancel(rid=rid))
        except BrokerError:
            pass

    async def stream(self, msg: P.Message) -> AsyncIterator[Frame]:
        """Send `msg` and yield its frames until the terminal one.

        If the consumer stops early (the HTTP client went away), the request
        is cancelled, so the worker stops at its next step.
        """
        rid = msg.rid  # type: ignore[attr-defined]
        queue: asyncio.Queue[Frame] = asyncio.Queue()
        self.queues[rid] = queue
        finished = False
        observer = self.observer
        try:
            self._send(msg)
            if observer is not None:
                observer.sent(msg)
            while True:
                frame = await queue.get()
                if observer is not None:
                    observer.received(frame[0])
                if isinstance(frame[0], (P.Final, P.Error, P.Loaded, P.Unloaded, P.Status, P.PatchResult)):
                    finished = True
                yield frame
                if finished:
                    return
        except BrokerError as exc:
            finished = True
            yield exc.as_msg(rid), []
        finally:
            self.queues.pop(rid, None)
            if observer is not None:
                observer.closed(rid)
            if not finished:
                self.cancel(rid)

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


def new_rid() -> str:
    return uuid.uuid4().hex
