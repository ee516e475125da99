"""HTTP request bodies, validated by pydantic; field names follow CONTRACT.md."""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.research_schemas import MAX_INTERVENTIONS, Intervention, LogitLensSpec, check_steering

LayerSpec = Union[Literal["all"], int, list[int]]


def _empty_device_is_none(v: str | None) -> str | None:
    """An empty device means no preference, like an empty model ("" would match no worker)."""
    return (v.strip() or None) if isinstance(v, str) else v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class GenerationFields(BaseModel):
    """Fields shared by /v1/chat/completions and /generate. Unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field("", description='hub id or model directory name; "" means the server\'s default model')
    max_tokens: int = Field(256, ge=1, le=8192)
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="0 means greedy")
    top_p: float = Field(0.9, ge=0.0, le=1.0)
    stream: bool = False
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="seed for sampling (temperature > 0)")
    return_hidden_states: bool = False
    hidden_state_layers: LayerSpec | None = Field(
        None, description='"all", a layer index or a list; 0 is the embeddings, -1 the final state')
    device: str | None = Field(None, max_length=64, description="run on a worker with this device, e.g. cuda:1")
    # Research surface (CONTRACT.md): which positions, which encoding, logprobs, logit lens.
    hidden_state_positions: Literal["last", "generated", "prompt", "all"] = Field(
        "last", description='"last": [1, H], the state behind the last token; "generated": one row per generated '
                            'token; "prompt": one per prompt token; "all": prompt then generated (P + G - 1 rows). '
                            "Streaming sends non-last positions as `hidden_states` events")
    hidden_state_format: Literal["list", "base64"] = Field(
        "list", description='"list": JSON floats; "base64": the raw little-endian bytes of each array, row-major')
    logprobs: bool = Field(False, description="log-probabilities of each generated token (raw logits, float32)")
    top_logprobs: int = Field(0, ge=0, le=20, description="also the most likely alternatives per token (0..20)")
    logit_lens: LogitLensSpec | None = Field(
        None, description="the LM head (after the final norm) applied to the listed layers' states, per token")
    steering: list[Intervention] | None = Field(
        None, max_length=MAX_INTERVENTIONS,
        description="changes to this request's residual stream, applied in order (at most 16); "
                    "returned hidden states are the steered ones")

    @field_validator("steering")
    @classmethod
    def _steering(cls, v: list[Intervention] | None) -> list[Intervention] | None:
        return check_steering(v)

    @field_validator("hidden_state_layers")
    @classmethod
    def _layers(cls, v: LayerSpec | None) -> LayerSpec | None:
        if isinstance(v, list):
            if not v:
                raise ValueError("give at least one layer, or leave hidden_state_layers out")
            if len(v) > 1024:
                raise ValueError("at most 1024 layers")
        # Each index too: one past 64 bits cannot even be sent to a worker (it was a 500).
        if any(abs(i) > 100_000 for i in (v if isinstance(v, list) else [v] if isinstance(v, int) else [])):
            raise ValueError("layer index out of range")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        return _empty_device_is_none(v)


class ChatRequest(GenerationFields):
    messages: list[ChatMessage] = Field(..., min_length=1)


class GenerateRequest(GenerationFields):
    prompt: str = Field(..., min_length=1)
    hidden_state_layers: LayerSpec | None = Field([-1], description="layers to return (default [-1])")


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(..., min_length=1, max_length=512)
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    device: str | None = Field(None, max_length=64)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        return _empty_device_is_none(v)
