"""`/embed`, `/embed/batch` and `/generate/batch` (CONTRACT.md, "Embeddings and batches").

Each text or prompt is its own request in the worker's continuous batch, all
sent at once (a sliding window of WINDOW in flight), so they are prefilled
together with whatever else is running. An embedding is a prefill with no
generation: the worker pools the chosen layer's prompt states and answers.
"""
from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Awaitable, Callable, Literal

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from api import relay
from api.auth import require_api_key
from api.broker_client import BrokerError, new_rid
from api.events import Completion, error_body
from api.floats import base64_bytes, json_list
from api.research_schemas import MAX_LAYER_INDEX
from api.responses import ORJSONResponse, error_response
from api.schemas import GenerationFields, LayerSpec
from loom import protocol as P

router = APIRouter(dependencies=[Depends(require_api_key)])

MAX_TEXTS = 256
MAX_PROMPTS = 100
# Requests of one batch in flight at once: a worker's default capacity, so
# a batch reaches the worker in one burst and is prefilled in full groups;
# entries that find the server full wait (OVERLOAD_PATIENCE_S) and retry.
WINDOW = 64
# How long an entry of an accepted batch keeps retrying while every worker is at capacity.
OVERLOAD_PATIENCE_S = 60.0


class EmbedFields(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field("", description='hub id or model directory name; "" means the server\'s default model')
    pooling: Literal["last_token", "mean", "first_token"] = Field(
        "last_token", description="how the prompt's states become one vector: the last token's, their mean "
                                  "(real tokens only), or the first token's")
    normalize: bool = Field(False, description="scale the embedding to unit length (L2)")
    layer: int = Field(-1, ge=-MAX_LAYER_INDEX, le=MAX_LAYER_INDEX,
                       description="layer to pool, indexed as hidden_state_layers (0 embeddings, -1 final state)")
    hidden_state_format: Literal["list", "base64"] = Field(
        "list", description='"list": JSON floats; "base64": the raw little-endian float32 bytes')
    device: str | None = Field(None, max_length=64, description="run on a worker with this device, e.g. cuda:1")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        return (v.strip() or None) if isinstance(v, str) else v


class EmbedRequest(EmbedFields):
    text: str = Field(..., min_length=1, description="the text to embed (raw, no chat template)")


class EmbedBatchRequest(EmbedFields):
    texts: list[Annotated[str, Field(min_length=1)]] = Field(
        ..., min_length=1, max_length=MAX_TEXTS, description=f"the texts to embed (1..{MAX_TEXTS}), all at once")


class GenerateBatchRequest(GenerationFields):
    hidden_state_layers: LayerSpec | None = Field([-1], description="layers to return (default [-1])")
    prompts: list[str] = Field(..., min_length=1, max_length=MAX_PROMPTS,
                               description=f"raw prompts (1..{MAX_PROMPTS}); each answered like /generate, "
                                           "a bad one failing only its own entry")

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, v: bool) -> bool:
        if v:
            raise ValueError("/generate/batch answers with one JSON body; stream each prompt with /generate")
        return v


async def _patiently(attempt: Callable[[], Awaitable[Any]]) -> Any:
    """Run `attempt`, again while the server is at capacity: the batch was accepted as a whole."""
    deadline = time.monotonic() + OVERLOAD_PATIENCE_S
    delay = 0.02
    while True:
        try:
            return await attempt()
        except BrokerError as exc:
            if exc.error_type != P.ErrorType.OVERLOADED or time.monotonic() > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(0.5, delay * 2)


async def _windowed(jobs: list[Callable[[], Awaitable[Any]]], fail_fast: bool) -> list[Any]:
    """Run the jobs WINDOW at a time; results (or exceptions) in order.

    With `fail_fast`, the first BrokerError cancels the rest and is raised.
    """
    gate = asyncio.Semaphore(WINDOW)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await _patiently(job)

    tasks = [asyncio.ensure_future(one(job)) for job in jobs]
    try:
        if fail_fast:
            return await asyncio.gather(*tasks)
        return await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# Worker messages about a field of the whole request, not about one text.
_REQUEST_FIELDS = ("layer:", "pooling:", "model ")


def _embed_msg(body: EmbedFields, model: str, text: str) -> P.Generate:
    return P.Generate(rid=new_rid(), model=model, prompt=text, max_tokens=1, temperature=0.0, layers=[body.layer],
                      pooling=body.pooling, normalize=body.normalize, device=body.device)


async def _embed_texts(request: Request, body: EmbedFields, texts: dict[str, str]) -> tuple[str, list[Any]]:
    """Each text's Final, in order; `texts` maps the field that holds it (for errors) to the text."""
    client = request.app.state.broker
    model = await relay.resolve_model(request, body.model)

    def job(field: str, text: str) -> Callable[[], Awaitable[Any]]:
        async def attempt() -> Any:
            try:
                return await relay.final_of(relay.frames(client, _embed_msg(body, model, text)))
            except BrokerError as exc:
                if exc.error_type == P.ErrorType.OVERLOADED or exc.message.startswith(_REQUEST_FIELDS):
                    raise  # about the whole request (or to retry), not about this text
                raise BrokerError(exc.error_type, f"{field}: {exc.message}", exc.retry_after) from None
        return attempt

    return model, await _windowed([job(f, t) for f, t in texts.items()], fail_fast=True)


def _vector(final: P.Final, buffers: list[Any], encoding: str) -> tuple[Any, list[int], str]:
    spec, buf = final.arrays[0], buffers[0]
    raw = buf.buffer if hasattr(buf, "buffer") else buf
    data = base64_bytes(raw) if encoding == "base64" else orjson.Fragment(json_list(raw, spec["dtype"]))
    return data, spec["shape"], spec["dtype"]


@router.post("/embed", summary="One text's embedding: a layer's prompt states, pooled")
async def embed(body: EmbedRequest, request: Request) -> Response:
    started = time.perf_counter()
    try:
        result = await relay.until_disconnected(request, _embed_texts(request, body, {"text": body.text}))
    except BrokerError as exc:
        return error_response(exc)
    if result is None:
        return Response(status_code=499)
    model, [(final, buffers)] = result
    data, shape, dtype = _vector(final, buffers, body.hidden_state_format)
    answer: dict[str, Any] = {"embedding": data, "shape": shape, "dtype": dtype}
    if body.hidden_state_format == "base64":
        answer["encoding"] = "base64"
    answer["metadata"] = {"model": final.model, "prompt_tokens": final.prompt_tokens, "pooling": body.pooling,
                          "layer": body.layer, "normalize": body.normalize,
                          "latency_ms": round((time.perf_counter() - started) * 1000, 2)}
    return ORJSONResponse(answer)


@router.post("/embed/batch", summary="Many texts' embeddings, prefilled together")
async def embed_batch(body: EmbedBatchRequest, request: Request) -> Response:
    started = time.perf_counter()
    try:
        texts = {f"texts.{i}": text for i, text in enumerate(body.texts)}
        result = await relay.until_disconnected(request, _embed_texts(request, body, texts))
    except BrokerError as exc:
        return error_response(exc)
    if result is None:
        return Response(status_code=499)
    model, finals = result
    vectors = [_vector(final, buffers, body.hidden_state_format) for final, buffers in finals]
    answer: dict[str, Any] = {"embeddings": [v[0] for v in vectors], "shapes": [v[1] for v in vectors],
                              "dtype": vectors[0][2] if vectors else "float32"}
    if body.hidden_state_format == "base64":
        answer["encoding"] = "base64"
    answer.update({"total_time_ms": round((time.perf_counter() - started) * 1000, 2),
                   "texts_processed": len(vectors),
                   "metadata": {"model": model, "pooling": body.pooling, "layer": body.layer,
                                "normalize": body.normalize,
                                "prompt_tokens": [final.prompt_tokens for final, _ in finals]}})
    return ORJSONResponse(answer)


@router.post("/generate/batch", summary="Many prompts through the batch at once; one /generate answer each")
async def generate_batch(body: GenerateBatchRequest, request: Request) -> Response:
    started = time.perf_counter()
    client = request.app.state.broker
    want = relay.generate_want(body)
    try:
        model = await relay.resolve_model(request, body.model)
    except BrokerError as exc:
        return error_response(exc)

    def job(prompt: str) -> Callable[[], Awaitable[Any]]:
        def attempt() -> Awaitable[Any]:
            msg = relay.generate_msg(body, model, want, prompt=prompt)
            return relay.collect(relay.frames(client, msg), Completion(model=model, started=time.perf_counter()), want)
        return attempt

    results = await relay.until_disconnected(request, _windowed([job(p) for p in body.prompts], fail_fast=False))
    if results is None:
        return Response(status_code=499)
    entries = []
    for i, result in enumerate(results):
        if isinstance(result, BrokerError):
            entries.append({"error": error_body(result.error_type, f"prompts.{i}: {result.message}")["error"]})
        elif isinstance(result, BaseException):
            entries.append({"error": error_body(P.ErrorType.INTERNAL, f"prompts.{i}: {result}")["error"]})
        else:
            entries.append(result)
    done = [e for e in entries if "error" not in e]
    return ORJSONResponse({"results": entries, "total_tokens": sum(e["token_count"] for e in done),
                           "total_time_ms": round((time.perf_counter() - started) * 1000, 2),
                           "prompts_processed": len(done)})
