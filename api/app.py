"""The HTTP front end: FastAPI routes over the broker connection.

Run it with `loom api`, or as a uvicorn factory:
`uvicorn api.app:create_app --factory` (settings from the environment).
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.auth import require_api_key
from api.broker_client import BrokerClient, BrokerError, new_rid
from api.events import (Completion, Want, delta_event, error_body, error_event, hidden_fields, message_delta,
                        metadata, usage)
from api.schemas import ChatRequest, GenerateRequest, GenerationFields, LoadRequest
from api.settings import Settings
from loom import protocol as P

log = logging.getLogger("loom.api")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(exc: BrokerError) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(exc.retry_after or 1)))} if exc.error_type == P.ErrorType.OVERLOADED else None
    status = P.HTTP_STATUS.get(exc.error_type, 500)
    return ORJSONResponse(error_body(exc.error_type, exc.message), status_code=status, headers=headers)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = BrokerClient(settings.broker, settings.curve)
        await client.start()
        app.state.broker = client
        log.info("API up: broker %s, default model %s, API key %s", settings.broker, settings.default_model or "(none)",
                 "required" if settings.api_key else "not required")
        yield
        await client.close()

    app = FastAPI(
        title="Loom",
        version="0.1.0",
        description="A model server for interpretability research: streams tokens as Server-Sent Events and "
                    "returns hidden states. See CONTRACT.md for the event shapes.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    auth = [Depends(require_api_key)]

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append(f"{loc}: {err.get('msg', 'invalid')}")
        body = error_body(P.ErrorType.INVALID_REQUEST, "; ".join(problems))
        body["detail"] = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return ORJSONResponse(body, status_code=422)

    def broker(request: Request) -> BrokerClient:
        return request.app.state.broker

    # --- health and models -----------------------------------------------------------

    @app.get("/health", summary="Whether the server can serve, and its workers")
    async def health(request: Request) -> JSONResponse:
        client = broker(request)
        try:
            status = await client.status(timeout=2.0)
        except BrokerError as exc:
            return ORJSONResponse({"status": "unhealthy", "reason": exc.message, "workers": []}, status_code=503)
        workers = status.workers
        body = {"status": "healthy" if workers else "unhealthy", "broker": status.broker_id,
                "workers": workers, "default_model": settings.default_model}
        if not workers:
            body["reason"] = "no worker is connected to the broker; start one with `loom worker --device cpu`"
            return ORJSONResponse(body, status_code=503)
        return ORJSONResponse(body)

    @app.get("/models", dependencies=auth, summary="Models loaded on the workers")
    async def models(request: Request) -> JSONResponse:
        try:
            status = await broker(request).status()
        except BrokerError as exc:
            return error_response(exc)
        loaded = []
        for w in status.workers:
            for m in w["models"]:
                loaded.append({**m, "worker_id": w["worker_id"]})
        return ORJSONResponse({"loaded_models": loaded, "default_model": settings.default_model,
                               "workers": len(status.workers)})

    @app.post("/models/load", dependencies=auth, summary="Load a model (returns at once if it is loaded)")
    async def load(body: LoadRequest, request: Request) -> JSONResponse:
        try:
            reply = await broker(request).request(P.Load(rid=new_rid(), model=body.model, dtype=body.dtype,
                                                         device=body.device))
        except BrokerError as exc:
            return error_response(exc)
        assert isinstance(reply, P.Loaded)
        return ORJSONResponse(reply.info)

    @app.delete("/models/{model_id:path}", dependencies=auth, summary="Unload a model ('/' may be written '--')")
    async def unload(model_id: str, request: Request) -> JSONResponse:
        model = model_id.replace("--", "/")
        try:
            await broker(request).request(P.Unload(rid=new_rid(), model=model), timeout=60)
        except BrokerError as exc:
            return error_response(exc)
        return ORJSONResponse({"model_id": model, "unloaded": True})

    # --- generation ------------------------------------------------------------------------

    async def resolve_model(client: BrokerClient, fields: GenerationFields) -> str:
        if fields.model.strip():
            return fields.model.strip()
        if settings.default_model:
            return settings.default_model
        status = await client.status()
        for w in status.workers:
            for m in w["models"]:
                return m["model_id"]
        raise BrokerError(P.ErrorType.INVALID_REQUEST,
                          'model is "" (the default) but the server has no default model and none is loaded; '
                          "name a model, or load one with POST /models/load")

    async def frames(client: BrokerClient, msg: P.Generate) -> AsyncIterator[tuple[P.Message, list[Any]]]:
        """The request's frames; a model that is not loaded yet is loaded first."""
        for attempt in range(2):
            stream = client.stream(msg)
            try:
                async for frame in stream:
                    reply = frame[0]
                    if attempt == 0 and isinstance(reply, P.Error) and reply.type == P.ErrorType.MODEL_NOT_LOADED:
                        break
                    yield frame
                else:
                    return
            finally:
                await stream.aclose()
            try:
                await client.request(P.Load(rid=new_rid(), model=msg.model, device=msg.device))
            except BrokerError as exc:
                yield exc.as_msg(msg.rid), []
                return
            msg.rid = new_rid()

    def generate_msg(fields: GenerationFields, model: str, want: Want, **extra: Any) -> P.Generate:
        return P.Generate(rid=new_rid(), model=model, max_tokens=fields.max_tokens, temperature=fields.temperature,
                          top_p=fields.top_p, seed=fields.seed, layers=want.layers(), all_layers=want.all_layers,
                          device=fields.device, **extra)

    async def run(request: Request, fields: GenerationFields, want: Want, **extra: Any) -> Response:
        client = broker(request)
        started = time.perf_counter()
        try:
            model = await resolve_model(client, fields)
        except BrokerError as exc:
            if fields.stream:
                return _sse_once(error_event(exc.as_msg("")))
            return error_response(exc)
        msg = generate_msg(fields, model, want, **extra)
        source = frames(client, msg)
        if fields.stream:
            # Admission is decided before the first token: an overloaded
            # server answers 429 with Retry-After even to a streaming request.
            first = await anext(source, None)
            if first is not None and isinstance(first[0], P.Error) and first[0].type == P.ErrorType.OVERLOADED:
                await source.aclose()  # type: ignore[attr-defined]
                return error_response(BrokerError.from_msg(first[0]))
            return StreamingResponse(_sse(_prepend(first, source), want, started), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        # A client that hangs up before the answer is complete cancels the
        # work too, as a streaming one does.
        answer = asyncio.ensure_future(_collect(source, Completion(model=model, started=started), want))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not answer.done():
                answer.cancel()
                await asyncio.gather(answer, return_exceptions=True)
        if answer.cancelled():
            return Response(status_code=499)  # nobody is listening; the request was cancelled
        return answer.result()

    @app.post("/v1/chat/completions", dependencies=auth, summary="Chat, streaming (SSE) or not")
    async def chat(body: ChatRequest, request: Request) -> Response:
        layers = body.hidden_state_layers
        want = Want(final=body.return_hidden_states, keys=_layer_keys(layers), all_layers=layers == "all")
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        return await run(request, body, want, messages=messages)

    @app.post("/generate", dependencies=auth, summary="Raw-prompt generation; hidden states keyed by layer")
    async def generate(body: GenerateRequest, request: Request) -> Response:
        layers = body.hidden_state_layers if body.return_hidden_states else None
        want = Want(final=False, keys=_layer_keys(layers), all_layers=layers == "all", style="generate",
                    encoding=body.hidden_state_format)
        return await run(request, body, want, prompt=body.prompt)

    return app


def _layer_keys(layers: Any) -> list[int] | None:
    if layers is None or layers == "all":
        return None
    return [layers] if isinstance(layers, int) else list(dict.fromkeys(layers))


def _answer(completion: Completion, final: P.Final, buffers: list[Any], want: Want, latency_s: float) -> dict[str, Any]:
    if want.style == "generate":
        body: dict[str, Any] = {"text": completion.text, "token_count": final.completion_tokens,
                                "stop_reason": final.stop_reason, "usage": usage(final)}
    else:
        body = {"text": completion.text, "usage": usage(final), "stop_reason": final.stop_reason}
    body.update(hidden_fields(final, buffers, want))
    body["metadata"] = metadata(final, latency_s)
    return body


async def _sse(source: AsyncIterator[tuple[P.Message, list[Any]]], want: Want, started: float) -> AsyncIterator[bytes]:
    # Each frame is written the moment it arrives; if the client goes away,
    # Starlette cancels this generator and `source` cancels the request.
    try:
        async for reply, buffers in source:
            if isinstance(reply, P.Token):
                yield delta_event(reply.text)
            elif isinstance(reply, P.Final):
                yield message_delta(reply, buffers, want, time.perf_counter() - started)
                return
            elif isinstance(reply, P.Error):
                yield error_event(reply)
                return
        yield error_event(P.Error(rid="", type=P.ErrorType.INTERNAL, message="the request ended without an answer"))
    finally:
        await source.aclose()  # type: ignore[attr-defined]


async def _collect(source: AsyncIterator[tuple[P.Message, list[Any]]], completion: Completion,
                   want: Want) -> Response:
    try:
        async for reply, buffers in source:
            if isinstance(reply, P.Token):
                completion.add(reply)
            elif isinstance(reply, P.Error):
                return error_response(BrokerError.from_msg(reply))
            elif isinstance(reply, P.Final):
                latency = time.perf_counter() - completion.started
                return ORJSONResponse(_answer(completion, reply, buffers, want, latency))
        return error_response(BrokerError(P.ErrorType.INTERNAL, "the request ended without an answer"))
    finally:
        await source.aclose()  # type: ignore[attr-defined]


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    try:
        if first is not None:
            yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


def _sse_once(event: bytes) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        yield event

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

