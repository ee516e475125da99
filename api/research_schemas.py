"""Request fields of the research surface (CONTRACT.md, "Research surface")."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
