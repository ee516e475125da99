"""The two generation routes taken without FastAPI's per-request layers, when nothing about a request is unusual.

FastAPI spends ~0.15 ms of CPU on each request before the handler runs
(route matching, the exit stacks, dependency solving, body parsing with
stdlib json and validation), about a microsecond a token of a 170-token
stream. Here a well-formed POST to /v1/chat/completions or /generate is
read, checked by the same `require_api_key`, validated by the same pydantic
model and answered by the same handler (api/relay.py), inside the same
middlewares (request ids, metrics, drain), which see the same route.

Anything else goes to FastAPI with the body handed over as it came: a body
that is not plain JSON, one that does not validate, a wrong API key, an
unexpected content type. Their answers (422, 401, ...) are FastAPI's, word
for word.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable

import orjson
from fastapi import HTTPException, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from api.asgi import HttpMiddleware
from api.auth import require_api_key

Handler = Callable[[Any, Request], Awaitable[Any]]

_JSON_TYPES = (b"application/json", b"application/json; charset=utf-8", b"application/json;charset=utf-8")


class FastRoutes(HttpMiddleware):
    """Innermost of the app's own middlewares: serves `routes` ({path: (model, handler)}) itself when it can."""

    def __init__(self, app: Any, routes: dict[str, tuple[type[BaseModel], Handler]], api: Any) -> None:
        super().__init__(app)
        self.routes = routes
        self.api = api  # the FastAPI app, for its routes (the metrics label) once they are all added
        self._route_objects: dict[str, APIRoute] | None = None

    async def http(self, scope: dict, receive: Any, send: Any) -> None:
        entry = self.routes.get(scope["path"]) if scope["method"] == "POST" else None
        if entry is None:
            await self.app(scope, receive, send)
            return
        body, complete = await _read_body(receive)
        replay = _Replay(body, complete, receive)
        if not complete or not await self._serve(scope, replay, send, body, *entry):
            await self.app(scope, replay, send)

    async def _serve(self, scope: dict, receive: Any, send: Any, raw: bytes, model: type[BaseModel],
                     handler: Handler) -> bool:
        content_type = next((v for k, v in scope["headers"] if k == b"content-type"), None)
        if content_type is not None and content_type.lower() not in _JSON_TYPES:
            return False
        try:
            body = model.model_validate(orjson.loads(raw))
        except (orjson.JSONDecodeError, ValidationError):
            return False
        request = Request(scope, receive)
        try:
            await require_api_key(request)
        except HTTPException:
            return False
        scope["route"] = self._route(scope["path"])  # as FastAPI's routing sets it: the metrics' label
        response = await handler(body, request)
        await response(scope, receive, send)
        return True

    def _route(self, path: str) -> APIRoute | None:
        if self._route_objects is None:
            self._route_objects = {r.path: r for r in self.api.routes
                                   if isinstance(r, APIRoute) and r.path in self.routes and "POST" in r.methods}
        return self._route_objects.get(path)


async def _read_body(receive: Any) -> tuple[bytes, bool]:
    """The request's body, and whether it all came (False: the client left first)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), True


class _Replay:
    """`receive` that hands over the body once more, then what the server sends after it (a disconnect)."""

    def __init__(self, body: bytes, complete: bool, receive: Any) -> None:
        self._first: dict | None = {"type": "http.request", "body": body, "more_body": False} if complete \
            else {"type": "http.disconnect"}
        self._receive = receive

    async def __call__(self) -> dict:
        first, self._first = self._first, None
        return first if first is not None else await self._receive()
