"""Log-probabilities of chosen tokens and their top alternatives, for the rows that ask.

Computed from the model's raw logits (before temperature and top_p) in
float32, one log-softmax and one top-k for all asking rows of a step.
"""
from __future__ import annotations

from typing import Any

import torch


class TokenTexts:
    """Each token id's text decoded on its own, cached: the top-k lists of a
    long stream name the same few thousand tokens over and over."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode(
                [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return text

    def entries(self, ids: list[int], values: list[float]) -> list[dict[str, Any]]:
        return [{"token_id": i, "token": self(i), "logprob": v} for i, v in zip(ids, values)]


def top_k(log_probs: torch.Tensor, ks: list[int]) -> tuple[list[list[float]], list[list[int]]]:
    """Each row's `ks[row]` best (log-prob, id) pairs, best first, from one topk call."""
    k = max(ks, default=0)
    if k == 0:
        return [[] for _ in ks], [[] for _ in ks]
    values, ids = log_probs.topk(k, dim=-1, sorted=True)
    values_l, ids_l = values.tolist(), ids.tolist()
    return [v[:n] for v, n in zip(values_l, ks)], [i[:n] for i, n in zip(ids_l, ks)]


def logprob_entries(logits: torch.Tensor, tokens: list[int], tops: list[int],
                    texts: TokenTexts) -> list[dict[str, Any]]:
    """One entry per row of `logits` ([rows, vocab]): the chosen token's log-prob and its top alternatives."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    chosen = log_probs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    top_values, top_ids = top_k(log_probs, tops)
    return [{"token_id": t, "token": texts(t), "logprob": lp, "top_logprobs": texts.entries(ids, vals)}
            for t, lp, vals, ids in zip(tokens, chosen, top_values, top_ids)]
