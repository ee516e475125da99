"""Next-token choice for a batch in which every row has its own settings."""
from __future__ import annotations

from typing import Sequence as Seq

import torch


def choose_tokens(logits: torch.Tensor, temperatures: Seq[float], top_ps: Seq[float],
                  generators: Seq[torch.Generator | None]) -> list[int]:
    """One token id per row of `logits` ([rows, vocab]).

    Temperature 0 is greedy. Others sample from the temperature-scaled
    distribution cut to the smallest set whose mass reaches top_p (nucleus),
    each row drawing from its own generator so that a seeded request gives
    the same text whatever else is in the batch.
    """
    chosen = logits.argmax(dim=-1).tolist()
    sampled = [i for i, t in enumerate(temperatures) if t > 0]
    if not sampled:
        return chosen
    # Sampled rows go to the CPU, where each request's generator lives; it is
    # one [rows, vocab] copy per step, and seeded results match across devices.
    rows = logits[sampled].float().cpu()
    # Shift each row's maximum to 0 (softmax does not change) so that a tiny
    # temperature sends the others to -inf, never the maximum to inf (nan).
    rows = rows - rows.max(dim=-1, keepdim=True).values
    temps = torch.tensor([temperatures[i] for i in sampled], dtype=rows.dtype, device=rows.device)
    temps = temps.clamp_min(torch.finfo(rows.dtype).tiny)  # 1e-45 is 0 in float32
    probs = torch.softmax(rows / temps[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    tops = torch.tensor([top_ps[i] for i in sampled], dtype=rows.dtype, device=rows.device)
    # Keep a token while the mass before it is below top_p (always keeps the first).
    outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= tops[:, None]
    outside[:, 0] = False
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    for j, i in enumerate(sampled):
        pick = torch.multinomial(sorted_probs[j], 1, generator=generators[i])
        chosen[i] = int(order[j, pick])
    return chosen
