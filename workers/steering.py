"""Per-request steering inside the batch: each row's own interventions on the residual stream.

An intervention changes one layer's output (the same slots as hidden-state
capture: 0 the embeddings, 1..N the decoder layers, N+1 the final normed
state) for one request's row only, at its prompt positions (the prefill),
its generated ones (each decode step's fed-back token) or both:

    add:    h + scale * v
    ablate: h - scale * (h . v_hat) v_hat,   v_hat = v / |v|

A forward pass gets, per slot, the rows that steer there; the hook changes
those rows (in float32, then back to the model's dtype) and copies nothing
else, so every other row of the batch computes exactly what it would alone.
A batch in which nobody steers attaches no hook at all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from workers.hidden import LayerIndexError, slot_for

MAX_INTERVENTIONS = 16
OPS = ("add", "ablate")
POSITIONS = ("all", "prompt", "generated")


@dataclass
class Intervention:
    slot: int
    op: str
    positions: str
    # add: scale * v; ablate: v_hat (unit length). None when it changes nothing (a zero vector or scale).
    vector: torch.Tensor | None
    scale: float

    def applies(self, prefill: bool) -> bool:
        return self.positions == "all" or self.positions == ("prompt" if prefill else "generated")


def parse(items: list[Any], num_layers: int, hidden_size: int, model_id: str,
          device: torch.device) -> list[Intervention]:
    """The request's interventions, checked; ValueError names the field that is wrong."""
    if len(items) > MAX_INTERVENTIONS:
        raise ValueError(f"steering: {len(items)} interventions, at most {MAX_INTERVENTIONS}")
    out = []
    for i, item in enumerate(items):
        where = f"steering.{i}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: not a map")
        layer, raw, scale = item.get("layer"), item.get("vector"), item.get("scale", 1.0)
        op, positions = item.get("op", "add"), item.get("positions", "all")
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ValueError(f"{where}.layer: must be an integer")
        try:
            slot = slot_for(layer, num_layers, f"{where}.layer")
        except LayerIndexError as exc:
            raise ValueError(str(exc)) from None
        if op not in OPS:
            raise ValueError(f"{where}.op: {op!r} is not one of {', '.join(OPS)}")
        if positions not in POSITIONS:
            raise ValueError(f"{where}.positions: {positions!r} is not one of {', '.join(POSITIONS)}")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise ValueError(f"{where}.scale: must be a finite number")
        if not isinstance(raw, (bytes, bytearray)) or len(raw) % 4:
            raise ValueError(f"{where}.vector: must be float32 bytes")
        values = np.frombuffer(raw, dtype="<f4")
        if values.size != hidden_size:
            raise ValueError(f"{where}.vector: has {values.size} values but {model_id}'s hidden size is {hidden_size}")
        if not np.isfinite(values).all():
            raise ValueError(f"{where}.vector: holds NaN or infinity")
        vector: torch.Tensor | None = torch.tensor(values, dtype=torch.float32, device=device)
        norm = float(vector.norm())
        if norm == 0 or scale == 0:
            vector = None  # changes nothing: the row is left exactly as it was
        elif op == "add":
            vector = vector * float(scale)
        else:
            vector = vector / norm
        out.append(Intervention(slot=slot, op=op, positions=positions, vector=vector, scale=float(scale)))
    return out


class _Round:
    """One intervention for each of some rows, at one slot: applied in a single vectorized step."""

    def __init__(self, rows: list[int], items: list[Intervention], width: int, device: torch.device):
        self.index = torch.tensor(rows, dtype=torch.long, device=device)
        zeros = torch.zeros(width, dtype=torch.float32, device=device)
        adds = [it.vector if it.op == "add" else zeros for it in items]
        units = [it.vector if it.op == "ablate" else zeros for it in items]
        self.add = torch.stack(adds) if any(it.op == "add" for it in items) else None
        has_ablate = any(it.op == "ablate" for it in items)
        self.unit = torch.stack(units) if has_ablate else None
        self.ablate_scale = torch.tensor([it.scale if it.op == "ablate" else 0.0 for it in items],
                                         dtype=torch.float32, device=device) if has_ablate else None

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.index_select(0, self.index)
        h = rows.float()
        if self.unit is not None:
            unit = self.unit[:, None, :]
            h = h - self.ablate_scale[:, None, None] * (h * unit).sum(dim=-1, keepdim=True) * unit
        if self.add is not None:
            h = h + self.add[:, None, :]
        return hidden.index_copy(0, self.index, h.to(hidden.dtype))


class SlotSteering:
    """Every steering row's interventions at one slot, in each row's order."""

    def __init__(self, rounds: list[_Round]):
        self.rounds = rounds

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        for r in self.rounds:
            hidden = r.apply(hidden)
        return hidden


def plan(per_row: list[list[Intervention]], prefill: bool, width: int,
         device: torch.device) -> dict[int, SlotSteering]:
    """slot -> what the hook there does, for a batch whose row i asked for `per_row[i]`."""
    by_slot: dict[int, list[list[tuple[int, Intervention]]]] = {}
    for row, items in enumerate(per_row):
        seen: dict[int, int] = {}
        for item in items:
            if item.vector is None or not item.applies(prefill):
                continue
            k = seen.get(item.slot, 0)  # this row's k-th intervention at this slot goes in round k
            seen[item.slot] = k + 1
            rounds = by_slot.setdefault(item.slot, [])
            if len(rounds) <= k:
                rounds.append([])
            rounds[k].append((row, item))
    return {slot: SlotSteering([_Round([r for r, _ in rnd], [it for _, it in rnd], width, device) for rnd in rounds])
            for slot, rounds in by_slot.items()}
