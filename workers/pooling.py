"""An embedding from one layer's prompt states: pooled, optionally unit length."""
from __future__ import annotations

import torch


def pool(states: torch.Tensor, pooling: str, normalize: bool) -> torch.Tensor:
    """[1, H] float32 from `states` ([P, H], the prompt's real tokens only, no padding)."""
    states = states.float()
    if pooling == "mean":
        vector = states.mean(dim=0, keepdim=True)
    elif pooling == "first_token":
        vector = states[:1]
    else:  # last_token
        vector = states[-1:]
    if normalize:
        vector = vector / vector.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return vector.contiguous()
