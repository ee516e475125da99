"""Graceful drain: on SIGTERM, refuse new requests, let running ones finish, then exit 0.

uvicorn's own SIGTERM handling closes the listening socket at once and waits
for open connections, so a new request would find nothing listening. Here the
first SIGTERM (or Ctrl-C) is taken before uvicorn sees it: the listener stays
open and answers new requests 503 with Retry-After (/health says
"draining"), requests already running go on for up to `drain_timeout`
seconds, those still running then end with an `error` event (or a 503), and
only then does uvicorn shut down. A second Ctrl-C stops at once.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType
from typing import Any

import orjson
import uvicorn

from api.asgi import HttpMiddleware
from api.events import error_body
from loom import protocol as P

log = logging.getLogger("loom.api")

RETRY_AFTER_S = 2
# Paths that are not requests to drain: probes and scrapes still get an answer.
NOT_COUNTED = ("/health", "/metrics")
# After the drain timeout, how long the ended requests get to write their error out.
ABORT_GRACE_S = 5.0


class Drain:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.draining = False
        self.in_flight = 0

    async def wait_idle(self, timeout: float) -> bool:
        """Whether every counted request finished within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.in_flight


class DrainMiddleware(HttpMiddleware):
    """Counts requests in flight; while draining, answers new ones 503 (pure ASGI)."""

    def __init__(self, app: Any, drain: Drain) -> None:
        super().__init__(app)
        self.drain = drain

    async def http(self, scope: dict, receive: Any, send: Any) -> None:
        if self.drain.draining and scope["path"] != "/metrics":  # a scrape may still watch the drain
            await _refuse(scope["path"], send)
            return
        if scope["path"] in NOT_COUNTED:
            await self.app(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


async def _refuse(path: str, send: Any) -> None:
    message = "the server is shutting down; retry (another server, or this one once it is back)"
    if path == "/health":
        body: dict[str, Any] = {"status": "draining", "reason": message}
    else:
        body = error_body(P.ErrorType.SHUTTING_DOWN, message)
    raw = orjson.dumps(body)
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                            (b"retry-after", str(RETRY_AFTER_S).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": raw})


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains before the usual shutdown."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self.app = app
        self.drain: Drain = app.state.drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._tick: asyncio.Future | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def main_loop(self) -> None:
        """uvicorn's, waking once a second (the Date header's resolution) instead of ten times, and at once to exit.

        Its ten wake-ups a second to look for an exit were about a third of an
        idle API process's CPU. Every exit here goes through `_exit`, which
        wakes this loop.
        """
        loop = asyncio.get_running_loop()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000  # on_tick refreshes the Date header when counter % 10 == 0
            self._tick = loop.create_future()
            timer = loop.call_later(1.0, _settle, self._tick)
            await self._tick
            timer.cancel()

    def _exit(self, force: bool = False) -> None:
        self.should_exit = True
        self.force_exit = self.force_exit or force
        if self._loop is not None and self._tick is not None:
            self._loop.call_soon_threadsafe(_settle, self._tick)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in uvicorn's captured signals: it would re-raise the
        # signal after shutdown and the process would not exit 0.
        if self._loop is None:  # not serving yet: nothing to drain
            self._exit()
            return
        if self.drain.draining or self.should_exit:
            # As uvicorn does: a second Ctrl-C stops at once; a second SIGTERM
            # (`loom serve` passes one on to a group that already had one) changes nothing.
            if sig == signal.SIGINT:
                self._exit(force=True)
            return
        self.drain.draining = True
        self._loop.call_soon_threadsafe(self._start, signal.Signals(sig).name)

    def _start(self, name: str) -> None:
        log.info("%s: draining: new requests get 503; %d running get up to %gs to finish", name,
                 self.drain.in_flight, self.drain.timeout)
        self._task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        if not await self.drain.wait_idle(self.drain.timeout):
            log.warning("drain timeout: ending %d request(s) still running", self.drain.in_flight)
            self.app.state.broker.abort_all(P.ErrorType.SHUTTING_DOWN,
                                            "the server shut down before this request finished; retry")
            await self.drain.wait_idle(ABORT_GRACE_S)
        log.info("drained; shutting down")
        self._exit()


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
