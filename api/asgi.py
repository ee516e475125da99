"""Base for Loom's pure ASGI middleware: only HTTP requests are looked at, and
responses pass through untouched (Starlette's BaseHTTPMiddleware would
buffer a streaming response and hide a client's disconnect); and the app
class that lets a stream write its body past them."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI


class HttpMiddleware:
    # Body messages reach the next `send` unchanged (a subclass that alters them says False),
    # so a stream may write its body on the server's own send (see LoomApp).
    passes_body = True

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)

    async def http(self, scope: dict, receive: Any, send: Any) -> None:
        raise NotImplementedError


class _KeepSend:
    """Outermost layer: records the server's own `send` as scope["loom.send"]."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope["loom.send"] = send
        await self.app(scope, receive, send)


class LoomApp(FastAPI):
    """FastAPI whose streams (api/sse_stream.py) write body chunks on the server's own `send`.

    Only when every added middleware passes body messages through unchanged:
    each wrapper it skips would cost every token a coroutine call. FastAPI's
    and Starlette's own layers (ServerErrorMiddleware, ExceptionMiddleware,
    the body limit, telemetry and exit-stack layers of fastapi 0.165) look
    only at `http.response.start` or at exceptions; headers and status still
    go through every layer.
    """

    def build_middleware_stack(self) -> Any:
        stack = super().build_middleware_stack()
        if all(getattr(m.cls, "passes_body", False) for m in self.user_middleware):
            return _KeepSend(stack)
        return stack
