"""One request's generation state inside a worker."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from workers.detokenizer import IncrementalDetokenizer


@dataclass(eq=False)
class Sequence:
    rid: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    generator: torch.Generator | None
    # capture slot -> the layer indices the client asked for that name it
    slots: dict[int, list[int]]
    detok: IncrementalDetokenizer
    generated: int = 0
    last_token: int = -1
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    cancelled: bool = False
    started: float = field(default_factory=time.perf_counter)

    @property
    def position(self) -> int:
        """Position id of `last_token`, the next input to the model."""
        return len(self.prompt_ids) + self.generated - 1
