"""Base for Loom's pure ASGI middleware: only HTTP requests are looked at, and
responses pass through untouched (Starlette's BaseHTTPMiddleware would
buffer a streaming response and hide a client's disconnect)."""
from __future__ import annotations

from typing import Any


class HttpMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)

    async def http(self, scope: dict, receive: Any, send: Any) -> None:
        raise NotImplementedError
