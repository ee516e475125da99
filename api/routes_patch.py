"""POST /patch: activation patching (CONTRACT.md, "Research surface", "Interventions").

The worker does the work (workers/patching.py) and checks what only it can
(token lengths, layer range, one-token answers); its invalid_request_error
becomes a 422 here like any other.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.auth import require_api_key
from api.broker_client import BrokerClient, BrokerError, new_rid
from api.relay import resolve_model, until_disconnected
from api.responses import ORJSONResponse, error_response
from api.schemas import _empty_device_is_none
from loom import protocol as P

router = APIRouter(dependencies=[Depends(require_api_key)])

Component = Literal["resid_pre", "resid_post", "attn_out", "mlp_out"]
_BIG = 100_000  # any index past this is out of range for every model; bounded so it fits the wire


class PatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field("", max_length=512, description='hub id or model directory name; "" means the server\'s '
                                                        "default model")
    clean: str = Field(..., min_length=1, description="the clean prompt, raw text as in /generate")
    corrupted: str = Field(..., min_length=1, description="the corrupted prompt; must tokenize to as many tokens "
                                                          "as `clean`")
    layers: list[int] | None = Field(None, min_length=1, max_length=1024,
                                     description="decoder layers to patch, 1..N (negative counts from the end: "
                                                 "-1 is layer N); default: all of them")
    components: list[Component] = Field(["resid_post"], min_length=1, max_length=16,
                                        description="what to patch in each layer: resid_pre (the layer's input), "
                                                    "resid_post (its output), attn_out / mlp_out (what its "
                                                    "attention / MLP block adds to the residual stream)")
    positions: Union[Literal["all", "last"], list[int]] = Field(
        "all", description='token positions to patch: "all", "last", or a list (0-based, negative from the end)')
    answer: str | None = Field(None, min_length=1, max_length=256,
                               description="the token whose logit counts for; exactly one token. Default: the "
                                           "clean run's top next token")
    wrong_answer: str | None = Field(None, min_length=1, max_length=256,
                                     description="the token whose logit counts against; exactly one token. "
                                                 "Default: the corrupted run's top next token")
    max_tokens: int = Field(0, ge=0, le=256, description="greedy tokens of text to generate from each patched run "
                                                         "(and the clean and corrupted runs); 0 for none")
    device: str | None = Field(None, max_length=64, description="run on a worker with this device, e.g. cuda:1")

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(abs(i) > _BIG for i in v):
            raise ValueError("layer index out of range")
        return v

    @field_validator("positions")
    @classmethod
    def _positions(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError('give at least one position, or "all" or "last"')
            if len(v) > _BIG or any(abs(i) > _BIG for i in v):
                raise ValueError("position out of range")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        return _empty_device_is_none(v)

    @model_validator(mode="after")
    def _runs(self) -> "PatchRequest":
        # As given (the worker checks again once it knows how many layers "all" is).
        runs = len(self.layers or []) * len(self.components)
        if runs > P.MAX_PATCH_RUNS:
            raise ValueError(f"layers × components: {len(self.layers or [])} layers × {len(self.components)} "
                             f"components is {runs} patched runs; at most {P.MAX_PATCH_RUNS} per request")
        return self


class RunSummary(BaseModel):
    logit_diff: float = Field(..., description="logit(answer) - logit(wrong_answer) at the last position")
    top_token: str = Field(..., description="the run's most likely next token")
    top_token_id: int = Field(..., description="its id")
    text: str | None = Field(None, description="greedy continuation (only when max_tokens > 0)")


class PatchedRun(RunSummary):
    layer: int = Field(..., description="decoder layer patched, 1..N")
    component: Component = Field(..., description="what was patched")
    recovered: float | None = Field(..., description="(patched - corrupted) / (clean - corrupted) logit "
                                                     "difference; null when clean and corrupted are equal")


class TokenInfo(BaseModel):
    token: str = Field(..., description="the token's text")
    token_id: int = Field(..., description="its id")


class PatchResponse(BaseModel):
    clean: RunSummary = Field(..., description="the clean run")
    corrupted: RunSummary = Field(..., description="the corrupted run")
    results: list[PatchedRun] = Field(..., description="one per (layer, component), layers outer")
    answer: TokenInfo = Field(..., description="the token counted for (given or defaulted)")
    wrong_answer: TokenInfo = Field(..., description="the token counted against (given or defaulted)")
    positions: list[int] = Field(..., description="the positions patched, 0-based")
    metadata: dict[str, Any] = Field(..., description="model, prompt_tokens, patched_runs, forward_passes, "
                                                      "batches (rows per patched forward), time_ms")


@router.post("/patch", summary="Activation patching: clean activations written into the corrupted run",
             response_model=PatchResponse)
async def patch(body: PatchRequest, request: Request) -> Response:
    client: BrokerClient = request.app.state.broker
    try:
        model = await resolve_model(request, body.model)
    except BrokerError as exc:
        return error_response(exc)
    explicit = isinstance(body.positions, list)
    msg = P.Patch(rid=new_rid(), model=model, clean=body.clean, corrupted=body.corrupted, layers=body.layers,
                  components=list(body.components), positions="list" if explicit else body.positions,
                  position_list=list(body.positions) if explicit else [], answer=body.answer,
                  wrong_answer=body.wrong_answer, max_tokens=body.max_tokens, device=body.device)
    try:
        # A client that hangs up cancels the sweep, as it does a generation.
        reply = await until_disconnected(request, _ask(client, msg))
    except BrokerError as exc:
        return error_response(exc)
    if reply is None:
        return Response(status_code=499)  # nobody is listening; the request was cancelled
    return ORJSONResponse(reply.result)


async def _ask(client: BrokerClient, msg: P.Patch) -> P.PatchResult:
    """The worker's answer; a model that is not loaded yet is loaded first, as generation does."""
    try:
        reply = await client.request(msg)
    except BrokerError as exc:
        if exc.error_type != P.ErrorType.MODEL_NOT_LOADED:
            raise
        await client.request(P.Load(rid=new_rid(), model=msg.model, device=msg.device))
        msg.rid = new_rid()
        reply = await client.request(msg)
    assert isinstance(reply, P.PatchResult)
    return reply
