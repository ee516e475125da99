"""A generation request's trip: to the broker, and its frames back as SSE or one JSON answer.

Used by chat and /generate (api/app.py) and by the batch and embedding
routes (api/routes_research.py). Each frame is written the moment it
arrives; a client that hangs up cancels the work.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from api.broker_client import BrokerClient, BrokerError, new_rid
from api.events import Completion, Want, error_event, hidden_fields, metadata, usage
from api.research_events import Collected, has_extras
from api.research_schemas import steering_wire
from api.responses import ORJSONResponse, error_response, sse_once
from api.schemas import ChatRequest, GenerateRequest, GenerationFields
from api.sse_stream import SseStream
from loom import protocol as P

Frames = AsyncIterator[tuple[P.Message, list[Any]]]
Batches = AsyncIterator[list[tuple[P.Message, list[Any]]]]  # frames that arrived together

# Errors that, as a streaming request's first frame, are answered with their
# HTTP status instead of a 200 stream: nothing has been generated yet.
_BEFORE_STREAM = (P.ErrorType.OVERLOADED, P.ErrorType.INVALID_REQUEST)


async def resolve_model(request: Request, model: str) -> str:
    if model.strip():
        return model.strip()
    settings = request.app.state.settings
    if settings.default_model:
        return settings.default_model
    status = await request.app.state.broker.status()
    for w in status.workers:
        for m in w["models"]:
            return m["model_id"]
    raise BrokerError(P.ErrorType.INVALID_REQUEST,
                      'model is "" (the default) but the server has no default model and none is loaded; '
                      "name a model, or load one with POST /models/load")


async def batches(client: BrokerClient, msg: P.Generate) -> Batches:
    """The request's frames, those that arrived together in one list; a model that is not loaded yet is loaded first."""
    for attempt in range(2):
        stream = client.batches(msg)
        try:
            async for batch in stream:
                reply = batch[0][0]
                if attempt == 0 and isinstance(reply, P.Error) and reply.type == P.ErrorType.MODEL_NOT_LOADED:
                    break
                yield batch
            else:
                return
        finally:
            await stream.aclose()
        try:
            await client.request(P.Load(rid=new_rid(), model=msg.model, device=msg.device))
        except BrokerError as exc:
            yield [(exc.as_msg(msg.rid), [])]
            return
        msg.rid = new_rid()


async def frames(client: BrokerClient, msg: P.Generate) -> Frames:
    """As `batches`, one frame at a time."""
    source = batches(client, msg)
    try:
        async for batch in source:
            for frame in batch:
                yield frame
    finally:
        await source.aclose()


def generate_msg(fields: GenerationFields, model: str, want: Want, **extra: Any) -> P.Generate:
    lens = fields.logit_lens
    return P.Generate(rid=new_rid(), model=model, max_tokens=fields.max_tokens, temperature=fields.temperature,
                      top_p=fields.top_p, seed=fields.seed, layers=want.layers(), all_layers=want.all_layers,
                      device=fields.device, positions=want.positions, logprobs=fields.logprobs,
                      top_logprobs=fields.top_logprobs, lens_layers=list(lens.layers) if lens else [],
                      lens_top_k=lens.top_k if lens else 0, steering=steering_wire(fields.steering), **extra)


async def chat(body: ChatRequest, request: Request) -> Response:
    """POST /v1/chat/completions."""
    messages = [{"role": m.role, "content": m.content} for m in body.messages]
    return await run(request, body, chat_want(body), messages=messages)


async def generate(body: GenerateRequest, request: Request) -> Response:
    """POST /generate."""
    return await run(request, body, generate_want(body), prompt=body.prompt)


async def run(request: Request, fields: GenerationFields, want: Want, **extra: Any) -> Response:
    client: BrokerClient = request.app.state.broker
    started = time.perf_counter()
    try:
        model = await resolve_model(request, fields.model)
    except BrokerError as exc:
        if fields.stream:
            return sse_once(error_event(exc.as_msg("")))
        return error_response(exc)
    msg = generate_msg(fields, model, want, **extra)
    if fields.stream:
        return await streaming(client, msg, want, started)
    source = frames(client, msg)
    # A client that hangs up before the answer is complete cancels the work
    # too, as a streaming one does.
    try:
        body = await until_disconnected(request, collect(source, Completion(model=model, started=started), want))
    except BrokerError as exc:
        return error_response(exc)
    if body is None:
        return Response(status_code=499)  # nobody is listening; the request was cancelled
    return ORJSONResponse(body)


async def streaming(client: BrokerClient, msg: P.Generate, want: Want, started: float) -> Any:
    """A streaming request's answer once its first frames are in: an SSE stream, or its HTTP error.

    Admission is decided before the first token: an overloaded server
    answers 429 with Retry-After, and a request the worker refused (a layer
    out of range, say) 422, even to a streaming request. A model that is not
    loaded yet is loaded first, as `batches` does.
    """
    for attempt in range(2):
        try:
            exchange = client.exchange(msg)
            try:
                first = await exchange.take()
            except BaseException:
                exchange.close()
                raise
        except BrokerError as exc:
            return _stream_error(exc.as_msg(msg.rid))
        reply = first[0][0]
        if not isinstance(reply, P.Error) or reply.type not in (*_BEFORE_STREAM, P.ErrorType.MODEL_NOT_LOADED) \
                or attempt == 1 and reply.type == P.ErrorType.MODEL_NOT_LOADED:
            return SseStream(exchange, first, want, started)
        exchange.close()
        if reply.type != P.ErrorType.MODEL_NOT_LOADED:
            return _stream_error(reply)
        try:
            await client.request(P.Load(rid=new_rid(), model=msg.model, device=msg.device))
        except BrokerError as exc:
            return _stream_error(exc.as_msg(msg.rid))
        msg.rid = new_rid()
    raise AssertionError("unreachable: the second attempt always answers")


def _stream_error(error: P.Error) -> Response:
    """A streaming request that ends before its stream: its HTTP status, or a stream of just its error event."""
    if error.type in _BEFORE_STREAM:
        return error_response(BrokerError.from_msg(error))
    return sse_once(error_event(error))


def answer_body(completion: Completion, final: P.Final, buffers: list[Any], want: Want, latency_s: float,
                collected: Collected | None = None) -> dict[str, Any]:
    if want.style == "generate":
        body: dict[str, Any] = {"text": completion.text, "token_count": final.completion_tokens,
                                "stop_reason": final.stop_reason, "usage": usage(final)}
    else:
        body = {"text": completion.text, "usage": usage(final), "stop_reason": final.stop_reason}
    body.update(hidden_fields(final, buffers, want))
    if collected is not None:
        # Per-position arrays replace `last`'s in hidden_states; chat's hidden_state stays [1, H].
        body.update(collected.fields(want))
    body["metadata"] = metadata(final, latency_s)
    return body


async def collect(source: Frames, completion: Completion, want: Want) -> dict[str, Any]:
    """The non-streaming answer; raises BrokerError for an error frame."""
    collected = Collected() if want.positions != "last" or want.logprobs or want.lens else None
    try:
        async for reply, buffers in source:
            if isinstance(reply, P.Token):
                completion.add(reply)
                if collected is not None and has_extras(reply):
                    collected.add(reply, buffers)
            elif isinstance(reply, P.States):
                if collected is not None:
                    collected.add(reply, buffers)
            elif isinstance(reply, P.Error):
                raise BrokerError.from_msg(reply)
            elif isinstance(reply, P.Final):
                latency = time.perf_counter() - completion.started
                return answer_body(completion, reply, buffers, want, latency, collected)
        raise BrokerError(P.ErrorType.INTERNAL, "the request ended without an answer")
    finally:
        await source.aclose()  # type: ignore[attr-defined]


async def final_of(source: Frames) -> tuple[P.Final, list[Any]]:
    """The Final of a request that streams nothing before it (an embedding); raises BrokerError."""
    try:
        async for reply, buffers in source:
            if isinstance(reply, P.Error):
                raise BrokerError.from_msg(reply)
            if isinstance(reply, P.Final):
                return reply, buffers
        raise BrokerError(P.ErrorType.INTERNAL, "the request ended without an answer")
    finally:
        await source.aclose()  # type: ignore[attr-defined]


async def until_disconnected(request: Request, work: Any) -> Any:
    """Await `work` (a coroutine), cancelling it if the client hangs up first; None then."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return None if task.cancelled() else task.result()


async def disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _layer_keys(layers: Any) -> list[int] | None:
    if layers is None or layers == "all":
        return None
    return [layers] if isinstance(layers, int) else list(dict.fromkeys(layers))


def _research(fields: GenerationFields) -> dict[str, Any]:
    return {"encoding": fields.hidden_state_format, "positions": fields.hidden_state_positions,
            "logprobs": fields.logprobs or fields.top_logprobs > 0, "lens": fields.logit_lens is not None}


def chat_want(body: GenerationFields) -> Want:
    layers = body.hidden_state_layers
    return Want(final=body.return_hidden_states, keys=_layer_keys(layers), all_layers=layers == "all",
                **_research(body))


def generate_want(body: GenerationFields) -> Want:
    layers = body.hidden_state_layers if body.return_hidden_states else None
    return Want(final=False, keys=_layer_keys(layers), all_layers=layers == "all", style="generate",
                **_research(body))
