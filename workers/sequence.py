"""One request's generation state inside a worker."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from workers.detokenizer import Detokenizer

# hidden_state_positions whose states leave the worker as they are made.
STREAMED_POSITIONS = ("generated", "prompt", "all")


@dataclass(eq=False)
class Sequence:
    rid: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    generator: random.Random | torch.Generator | None  # a sampled row's own; None for greedy
    # capture slot -> the layer indices the client asked for that name it
    slots: dict[int, list[int]]
    detok: Detokenizer
    positions: str = "last"  # "last" | "generated" | "prompt" | "all"
    lens_slots: dict[int, list[int]] = field(default_factory=dict)  # logit lens: slot -> layer indices asked
    lens_top_k: int = 0
    top_logprobs: int = -1  # -1: no logprobs; else how many alternatives per token
    pooling: str | None = None  # an embedding request: pooled after prefill, nothing generated
    normalize: bool = False
    steering: list[Any] = field(default_factory=list)  # workers.steering.Intervention, in order
    generated: int = 0
    last_token: int = -1
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    # Logprob entries of tokens whose text the detokenizer still holds back.
    pending_logprobs: list[dict[str, Any]] = field(default_factory=list)
    cancelled: bool = False
    started: float = field(default_factory=time.perf_counter)

    def accept(self, token: int) -> str:
        """Count `token` (not an end of turn) as generated; the text it completes."""
        self.generated += 1
        self.last_token = token
        return self.detok.push(token)

    @property
    def position(self) -> int:
        """Position id of `last_token`, the next input to the model."""
        return len(self.prompt_ids) + self.generated - 1

    @property
    def capture_slots(self) -> set[int]:
        return self.slots.keys() | self.lens_slots.keys()

    @property
    def wants_prompt_block(self) -> bool:
        """Whether every prompt position's state is needed after prefill."""
        return self.pooling is not None or self.positions in ("prompt", "all")
