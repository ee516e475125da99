"""X-Request-Id: taken from the client or made here, echoed on every response.

The id is set in a context variable (loom/logs.py) for the life of the
request, so every log line about it names it, error bodies carry it
(`error.request_id`), and the messages sent to the broker carry it on to the
broker's and the worker's log lines. One access line per request closes it.
"""
from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

import orjson

from api.asgi import HttpMiddleware
from api.events import error_body
from loom import protocol as P
from loom.logs import reset_request_id, set_request_id

log = logging.getLogger("loom.api")

HEADER = "X-Request-Id"
MAX_LENGTH = 128
QUIET_PATHS = ("/health", "/metrics")
_UNSAFE = re.compile(r"[^A-Za-z0-9._:/+=@-]")


def sanitize(value: str) -> str:
    """The client's id as it may appear in logs and headers: safe characters only, bounded length."""
    return _UNSAFE.sub("", value)[:MAX_LENGTH]


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestIdMiddleware(HttpMiddleware):
    """Takes or makes the id, echoes it, and writes the request's access line."""

    async def http(self, scope: dict, receive: Any, send: Any) -> None:
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        request_id = sanitize(given.decode("latin-1")) or new_request_id()
        token = set_request_id(request_id)
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if status == 0:  # nothing was sent yet: answer in the contract's shape, not a bare 500
                status = 500
                await _internal_error(send_with_id)
        finally:
            # Probes and scrapes come every few seconds: their lines only at DEBUG.
            level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
            log.log(level, "%s %s %d %.1f ms", scope["method"], scope["path"], status,
                    (time.perf_counter() - started) * 1000)
            reset_request_id(token)


async def _internal_error(send: Any) -> None:
    body = orjson.dumps(error_body(P.ErrorType.INTERNAL, "the server failed on this request"))
    await send({"type": "http.response.start", "status": 500,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
