"""api/sse_stream.py in process: the broker reader writes a stream's events itself, never blocking.

The ASGI `send` here behaves as uvicorn's does under flow control: while
"paused" it waits until the client reads. Frames keep arriving meanwhile;
every event must still reach the client once, in order, and a client that
hangs up must cancel the request.
"""
from __future__ import annotations

import asyncio
import time

from api.broker_client import Exchange
from api.events import Want, delta_event, error_event, message_delta
from api.sse_stream import SseStream, frame_events
from loom import protocol as P


class FakeBroker:
    """The part of BrokerClient an Exchange uses."""

    def __init__(self) -> None:
        self.queues: dict = {}
        self.observer = None
        self.sent: list = []
        self.cancelled: list[str] = []

    def _send(self, msg: P.Message) -> None:
        self.sent.append(msg)

    def cancel(self, rid: str) -> None:
        self.cancelled.append(rid)


class PausingSend:
    """An ASGI send that, while paused, waits (as uvicorn's does when the socket buffer is full)."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.paused: asyncio.Future | None = None

    async def __call__(self, message: dict) -> None:
        while self.paused is not None:
            await self.paused
        self.messages.append(message)

    def pause(self) -> None:
        self.paused = asyncio.get_running_loop().create_future()

    def resume(self) -> None:
        paused, self.paused = self.paused, None
        paused.set_result(None)

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")


def final(rid: str, n: int) -> P.Final:
    return P.Final(rid=rid, stop_reason="max_tokens", prompt_tokens=3, completion_tokens=n, generate_s=1.0,
                   model="m", dtype="float32")


async def open_stream(broker: FakeBroker, send: PausingSend, gone: asyncio.Future):
    exchange = Exchange(broker, P.Generate(rid="r1", model="m"))
    first = [(P.Token("r1", "t0", 0), [])]
    stream = SseStream(exchange, first, Want(final=False, keys=None), time.perf_counter())

    async def receive() -> dict:
        await gone
        return {"type": "http.disconnect"}

    task = asyncio.create_task(stream({"type": "http", "loom.send": send}, receive, send))
    for _ in range(5):
        await asyncio.sleep(0)
    return exchange, task


def test_a_paused_client_gets_every_event_in_order() -> None:
    async def go() -> None:
        broker, send = FakeBroker(), PausingSend()
        exchange, task = await open_stream(broker, send, asyncio.get_running_loop().create_future())
        box = exchange.box
        assert box.sink is not None and box.on_text is not None  # the reader writes from now on
        texts = ["t0"]
        for i in range(1, 40):
            if i == 10:
                send.pause()  # the client stops reading: sends would now wait
            if i == 25:
                send.resume()
                await asyncio.sleep(0)  # the request's task drains part of the queue...
            if i == 30:
                send.pause()  # ...and the client stalls again
            # The reader's calls return at once whatever the client does.
            if i % 3:
                box.on_text(f"t{i}", 0.0)
            else:
                box.put((P.Token("r1", f"t{i}", i), []))
            texts.append(f"t{i}")
        box.put((final("r1", 40), []))
        assert not task.done()
        send.resume()
        await asyncio.wait_for(task, 10)
        end = send.messages[-1]
        assert end["more_body"] is False and end["body"].startswith(b"event: message_delta")
        expected = b"".join(delta_event(t) for t in texts)
        assert send.body()[:len(expected)] == expected
        assert send.messages[0]["type"] == "http.response.start"
        assert broker.cancelled == [] and "r1" not in broker.queues

    asyncio.run(go())


def test_a_client_that_hangs_up_cancels_the_request() -> None:
    async def go() -> None:
        broker, send = FakeBroker(), PausingSend()
        gone = asyncio.get_running_loop().create_future()
        exchange, task = await open_stream(broker, send, gone)
        exchange.box.on_text("t1", 0.0)
        send.pause()  # blocked mid-stream when the client goes
        exchange.box.on_text("t2", 0.0)
        gone.set_result(None)
        send.resume()
        await asyncio.wait_for(task, 10)
        assert broker.cancelled == ["r1"]
        assert "r1" not in broker.queues and exchange.box.sink is None
        exchange.box.put((P.Token("r1", "late", 3), []))  # a frame after the end goes nowhere harmful

    asyncio.run(go())


def test_an_error_frame_ends_the_stream_with_its_event() -> None:
    async def go() -> None:
        broker, send = FakeBroker(), PausingSend()
        exchange, task = await open_stream(broker, send, asyncio.get_running_loop().create_future())
        error = P.Error(rid="r1", type=P.ErrorType.BROKER_LOST, message="gone")
        exchange.box.put((error, []))
        await asyncio.wait_for(task, 10)
        assert send.body() == delta_event("t0") + error_event(error)
        assert broker.cancelled == []

    asyncio.run(go())


def test_frame_events_match_the_contract_writers() -> None:
    want = Want(final=False, keys=None)
    assert frame_events(P.Token("r", "x", 0), [], want, 0.0) == delta_event("x")
    done = final("r", 1)
    assert frame_events(done, [], want, time.perf_counter()).split(b'"latency_ms"')[0] == \
        message_delta(done, [], want, 0.0).split(b'"latency_ms"')[0]
