"""Request fields of the research surface (CONTRACT.md, "Research surface")."""
from __future__ import annotations

import base64
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

MAX_LAYER_INDEX = 100_000  # anything past this cannot be a layer, and could not even travel to a worker


def check_layer_indexes(layers: list[int]) -> list[int]:
    if any(abs(i) > MAX_LAYER_INDEX for i in layers):
        raise ValueError("layer index out of range")
    return layers


class LogitLensSpec(BaseModel):
    """`logit_lens`: the LM head read off intermediate layers, for every generated token."""

    model_config = ConfigDict(extra="ignore")
    layers: list[int] = Field(..., min_length=1, max_length=256,
                              description="layers to read, indexed as hidden_state_layers (0 embeddings, -1 final)")
    top_k: int = Field(5, ge=1, le=20, description="how many of the most likely tokens per layer and token (1..20)")

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int]) -> list[int]:
        return check_layer_indexes(v)


MAX_INTERVENTIONS = 16
# All steering vectors of a request travel inside its header (at most 1 MiB).
MAX_STEERING_VALUES = 131_072
_BASE64_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "bfloat16"}


def _float32_bytes(vector: list[float] | str, dtype: str | None) -> bytes:
    """The vector as little-endian float32 bytes; ValueError (naming what is wrong) otherwise."""
    import binascii

    import numpy as np

    if isinstance(vector, str):
        try:
            raw = base64.b64decode(vector, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not valid base64") from None
        name = dtype or "float32"
        size = 4 if name == "float32" else 2
        if len(raw) % size:
            raise ValueError(f"{len(raw)} bytes is not a whole number of {name} values")
        if name == "bfloat16":
            array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, dtype=_BASE64_DTYPES[name]).astype(np.float32)
    else:
        array = np.asarray(vector, dtype=np.float64)
        if np.isfinite(array).all() and np.abs(array).max(initial=0.0) > np.finfo(np.float32).max:
            raise ValueError("a value is too large for float32")
        array = array.astype(np.float32)
    if array.size == 0:
        raise ValueError("empty")
    if not np.isfinite(array).all():
        raise ValueError("holds NaN or infinity")
    return array.astype("<f4").tobytes()


class Intervention(BaseModel):
    """One change to the residual stream of this request's row, at one layer."""

    model_config = ConfigDict(extra="ignore")
    layer: int = Field(..., ge=-MAX_LAYER_INDEX, le=MAX_LAYER_INDEX,
                       description="layer whose output (the residual stream) changes, indexed as hidden_state_layers: "
                                   "0 the embeddings, 1..N the decoder layers, -1 the final normed state")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="dtype of a base64 vector (default float32)")
    vector: list[float] | str = Field(..., description="the direction: hidden_size floats, or their raw "
                                                       "little-endian bytes in base64 (see dtype)")
    scale: float = Field(1.0, allow_inf_nan=False, description="how much: add h + scale*v; ablate h - scale*(h.v̂)v̂")
    op: Literal["add", "ablate"] = Field("add", description='"add" a vector, or "ablate" its direction')
    positions: Literal["all", "prompt", "generated"] = Field(
        "all", description='where: "prompt" positions (prefill), "generated" ones (each fed-back token), or "all"')

    _raw: bytes = PrivateAttr(b"")

    @field_validator("vector")
    @classmethod
    def _vector(cls, v: list[float] | str, info: ValidationInfo) -> list[float] | str:
        if isinstance(v, list) and len(v) > MAX_STEERING_VALUES:
            raise ValueError(f"at most {MAX_STEERING_VALUES} values")
        _float32_bytes(v, info.data.get("dtype"))  # NaN, infinity, bad base64: named as this field
        return v

    @model_validator(mode="after")
    def _keep_bytes(self) -> "Intervention":
        self._raw = _float32_bytes(self.vector, self.dtype)  # what the worker gets
        return self


def check_steering(items: list[Intervention] | None) -> list[Intervention] | None:
    if items is not None and sum(len(i._raw) // 4 for i in items) > MAX_STEERING_VALUES:
        raise ValueError(f"at most {MAX_STEERING_VALUES} vector values in all")
    return items


def steering_wire(items: list[Intervention] | None) -> list[dict[str, object]]:
    """The interventions as the worker takes them (P.Generate.steering): vectors as float32 bytes."""
    return [{"layer": i.layer, "vector": i._raw, "scale": float(i.scale), "op": i.op, "positions": i.positions}
            for i in items or []]
