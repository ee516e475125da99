"""The generation routes' fast path (api/fast_routes.py): it serves only what FastAPI would serve the same way.

Unit tests drive the middleware with a stand-in for FastAPI that records
what reaches it; the end-to-end ones compare a request taken by the fast
path with the same request taken through FastAPI (a JSON content type the
fast path leaves alone) on the session's real stack.
"""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from api.fast_routes import FastRoutes
from tests.helpers import user


class Body(BaseModel):
    n: int = Field(ge=0)


def _call(raw_chunks: list[bytes], headers: dict[bytes, bytes] | None = None, api_key: str | None = None,
          disconnect: bool = False, path: str = "/x", method: str = "POST") -> dict:
    """Run the middleware once; what the handler and the stand-in for FastAPI saw, and what was sent."""
    seen: dict = {"handler": None, "fastapi": None, "sent": []}

    async def handler(body: Body, request) -> JSONResponse:
        seen["handler"] = body.n
        return JSONResponse({"n": body.n})

    async def fastapi(scope, receive, send) -> None:
        message = await receive()
        seen["fastapi"] = message
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    messages = [{"type": "http.request", "body": c, "more_body": i < len(raw_chunks) - 1}
                for i, c in enumerate(raw_chunks)]
    if disconnect:
        messages[-1]["more_body"] = True
        messages.append({"type": "http.disconnect"})

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        seen["sent"].append(message)

    route = SimpleNamespace(path="/x", methods={"POST"})
    api = SimpleNamespace(routes=[], state=SimpleNamespace(settings=SimpleNamespace(api_key=api_key)))
    mw = FastRoutes(fastapi, routes={"/x": (Body, handler)}, api=api)
    mw._route_objects = {"/x": route}  # the APIRoute a FastAPI app would have
    scope = {"type": "http", "method": method, "path": path, "app": api, "query_string": b"",
             "headers": list((headers or {}).items())}
    asyncio.run(mw(scope, receive, send))
    seen["route"] = scope.get("route")
    return seen


def test_a_well_formed_request_is_served_by_the_handler_in_one_or_several_chunks():
    for chunks in ([b'{"n": 3}'], [b'{"n"', b": 3", b"}"]):
        seen = _call(chunks, {b"content-type": b"application/json"})
        assert seen["handler"] == 3 and seen["fastapi"] is None
        assert seen["sent"][0]["status"] == 200 and seen["route"].path == "/x"  # the metrics' label


def test_anything_unusual_reaches_fastapi_with_the_body_as_it_came():
    cases = [
        ([b'{"n": -1}'], {}),  # does not validate: FastAPI's 422
        ([b"{not json"], {}),
        ([b'{"n": NaN}'], {}),  # stdlib json reads NaN, orjson does not: FastAPI decides
        ([b'{"n": 3}'], {b"content-type": b"application/vnd.loom+json"}),
        ([b'{"n": 3}'], {b"content-type": b"text/plain"}),
    ]
    for chunks, headers in cases:
        seen = _call(chunks, headers)
        assert seen["handler"] is None, chunks
        assert seen["fastapi"] == {"type": "http.request", "body": b"".join(chunks), "more_body": False}
    # A wrong or missing key: FastAPI's own 401.
    for headers in ({}, {b"authorization": b"Bearer wrong"}):
        seen = _call([b'{"n": 3}'], headers, api_key="sesame")
        assert seen["handler"] is None and seen["fastapi"]["body"] == b'{"n": 3}'
    seen = _call([b'{"n": 3}'], {b"authorization": b"Bearer sesame"}, api_key="sesame")
    assert seen["handler"] == 3
    # A client gone before its body was in; other paths and methods are not looked at.
    assert _call([b'{"n"'], disconnect=True)["fastapi"] == {"type": "http.disconnect"}
    assert _call([b'{"n": 3}'], path="/y")["fastapi"]["body"] == b'{"n": 3}'
    assert _call([b'{"n": 3}'], method="PUT")["handler"] is None


def test_both_paths_answer_alike_on_the_real_stack(stack):
    body = {"messages": user("Say something"), "max_tokens": 12, "temperature": 0}
    through_fastapi = {"content-type": "application/vnd.loom+json"}  # JSON to FastAPI, not to the fast path
    with stack.client() as client:
        for path, payload in (("/v1/chat/completions", body), ("/generate", {"prompt": "Once", "max_tokens": 12,
                                                                             "temperature": 0})):
            fast = client.post(path, json=payload)
            slow = client.post(path, content=httpx.Request("POST", "/", json=payload).content,
                               headers=through_fastapi)
            assert fast.status_code == slow.status_code == 200, (fast.text, slow.text)
            assert fast.json()["text"] == slow.json()["text"]
            bad = {**payload, "max_tokens": 0}
            fast_bad = client.post(path, json=bad)
            slow_bad = client.post(path, content=httpx.Request("POST", "/", json=bad).content,
                                   headers=through_fastapi)
            assert fast_bad.status_code == slow_bad.status_code == 422
            errors = [{k: v for k, v in r.json()["error"].items() if k != "request_id"} for r in (fast_bad, slow_bad)]
            assert errors[0] == errors[1] and "max_tokens" in errors[0]["message"]
        metrics = client.get("/metrics").text
    assert 'endpoint="/v1/chat/completions"' in metrics and 'endpoint="/generate"' in metrics
