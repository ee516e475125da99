"""The logit lens: the LM head read off an intermediate layer's state.

Each state goes through the model's final norm first (the final state, slot
N+1, already has), then the LM head; the answer is the log-softmax's top k,
in float32. Only the rows that asked are computed, one batch per layer.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from workers.logprobs import TokenTexts, top_k


class LogitLens:
    def __init__(self, model: nn.Module, norm: nn.Module | None, final_slot: int, texts: TokenTexts):
        self.head = model.get_output_embeddings()
        self.norm = norm
        self.final_slot = final_slot
        self.texts = texts

    def read(self, slot: int, states: torch.Tensor, ks: list[int]) -> list[list[dict[str, Any]]]:
        """For each row of `states` ([rows, H], captured at `slot`), its top `ks[row]` tokens."""
        if slot != self.final_slot:
            assert self.norm is not None  # admission refuses other layers without a norm
            states = self.norm(states)
        log_probs = torch.log_softmax(self.head(states).float(), dim=-1)
        values, ids = top_k(log_probs, ks)
        return [self.texts.entries(i, v) for i, v in zip(ids, values)]
