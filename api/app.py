"""The HTTP front end: FastAPI routes over the broker connection.

Run it with `loom api`, or as a uvicorn factory:
`uvicorn api.app:create_app --factory` (settings from the environment).
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from api.asgi import LoomApp
from api.auth import require_api_key
from api.broker_client import BrokerClient, BrokerError, new_rid
from api.drain import Drain, DrainMiddleware
from api.fast_routes import FastRoutes
from api import relay
from api.events import error_body
from api.metrics import GenerationMetrics, MetricsMiddleware, WorkerFigures, mark_process_dead
from api.metrics import router as metrics_router
from api.readiness import Readiness
from api.request_ids import RequestIdMiddleware
from api.routes_analysis import router as analysis_router
from api.routes_patch import router as patch_router
from api.routes_research import router as research_router
from api.responses import ORJSONResponse, error_response
from api.schemas import ChatRequest, GenerateRequest, LoadRequest
from api.settings import Settings
from loom import protocol as P
from loom.heap import freeze_startup_heap

log = logging.getLogger("loom.api")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = BrokerClient(settings.broker, settings.curve, settings.direct_replies)
        client.observer = GenerationMetrics()
        await client.start()
        await client.wait_connected(settings.broker_wait_s)
        app.state.broker = client
        log.info("API up: broker %s, default model %s, API key %s, replies %s", settings.broker,
                 settings.default_model or "(none)", "required" if settings.api_key else "not required",
                 f"straight from this host's workers at {client.replies.endpoint}" if client.replies
                 else "all through the broker")
        freeze_startup_heap()
        yield
        await client.close()
        mark_process_dead()

    app = LoomApp(
        title="Loom",
        version="0.1.0",
        description="A model server for interpretability research: streams tokens as Server-Sent Events and "
                    "returns hidden states. See CONTRACT.md for the event shapes.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    auth = [Depends(require_api_key)]
    # Operations (README "Operating Loom"): readiness, drain, metrics, request ids.
    app.state.readiness = Readiness(settings.required_models)
    app.state.drain = Drain(settings.drain_timeout)
    app.state.worker_figures = WorkerFigures()
    app.add_middleware(FastRoutes, api=app, routes={"/v1/chat/completions": (ChatRequest, relay.chat),
                                                    "/generate": (GenerateRequest, relay.generate)})
    app.add_middleware(DrainMiddleware, drain=app.state.drain)
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)  # added last: outermost, so every answer carries the id
    app.include_router(metrics_router, dependencies=auth)
    app.include_router(patch_router)  # POST /patch (its own auth dependency)
    app.include_router(research_router)  # POST /embed, /embed/batch, /generate/batch (its own auth dependency)
    app.include_router(analysis_router)  # POST /analyze/geometry, /analyze/bilateral (its own auth dependency)

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
        loading = request.app.state.readiness.loading(workers)
        body = {"status": "starting" if loading else "healthy" if workers else "unhealthy",
                "broker": status.broker_id, "workers": workers, "default_model": settings.default_model}
        if loading:
            body["loading"] = loading
        if not workers:
            body["reason"] = "no worker is connected to the broker; start one with `loom worker --device cpu`"
        if loading or not workers:
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
        request.app.state.readiness.unloaded(model)
        return ORJSONResponse({"model_id": model, "unloaded": True})

    # --- generation ------------------------------------------------------------------------

    # Well-formed requests to these two skip FastAPI's per-request layers (api/fast_routes.py).
    @app.post("/v1/chat/completions", dependencies=auth, summary="Chat, streaming (SSE) or not")
    async def chat(body: ChatRequest, request: Request) -> Response:
        return await relay.chat(body, request)

    @app.post("/generate", dependencies=auth, summary="Raw-prompt generation; hidden states keyed by layer")
    async def generate(body: GenerateRequest, request: Request) -> Response:
        return await relay.generate(body, request)

    return app
