"""What one forward pass produces for the rows that asked: states, logprobs, lens.

The runner calls `plan()` before a forward pass (which rows' states the hooks
copy) and `step()` after it (each row's extras for its token). Arrays leave
as raw buffers of the captured tensors, never as float lists, and are not
kept here: a streaming request's states are gone from the worker once sent.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from workers.hidden import ForwardPlan, LayerHooks, Take, layer_label
from workers.lens import LogitLens
from workers.logprobs import TokenTexts, logprob_entries
from workers.pooling import pool
from workers.sequence import Sequence
from workers.staging import HostStaging, host_array
from workers.steering import plan as steering_plan


@dataclass
class RowOut:
    """A row's extras for this step's token (empty lists / None when it asked for none)."""

    specs: list[dict[str, Any]] = field(default_factory=list)
    buffers: list[Any] = field(default_factory=list)
    logprob: dict[str, Any] | None = None
    lens: dict[str, Any] | None = None


class Captured:
    """One forward pass's captured tensors, read by batch row."""

    def __init__(self, tensors: dict[int, torch.Tensor], rows_by_slot: dict[int, list[int]], plan: ForwardPlan):
        self.tensors = tensors
        self.where = {slot: {row: j for j, row in enumerate(rows)} for slot, rows in rows_by_slot.items()}
        self.full = {slot: take.full for slot, take in plan.take.items()}

    def last(self, slot: int, row: int) -> torch.Tensor:
        """[H]: the state at the row's latest position."""
        t = self.tensors[slot][self.where[slot][row]]
        return t[-1] if self.full[slot] else t

    def block(self, slot: int, row: int, length: int) -> torch.Tensor:
        """[length, H]: the row's last `length` positions (prefill rows are left-padded)."""
        return self.tensors[slot][self.where[slot][row]][-length:]


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, little-endian, as they are in memory: no float lists."""
    return memoryview(np.ascontiguousarray(host_array(tensor.detach().to("cpu").contiguous())).data)


class Outputs:
    def __init__(self, hooks: LayerHooks, texts: TokenTexts, dtype_name: str, device: torch.device, hidden_size: int):
        self.hooks = hooks
        self.texts = texts
        self.lens = LogitLens(hooks.model, hooks.norm, hooks.final_slot, texts)
        self.dtype_name = dtype_name
        self.device = device
        self.num_layers = hooks.num_layers
        self.hidden_size = hidden_size
        self.staging = HostStaging(device, "capture")

    # --- before the forward pass ----------------------------------------------------

    def plan(self, seqs: list[Sequence], prefill: bool) -> tuple[ForwardPlan, dict[int, list[int]]]:
        """Which rows each hook copies, and whether every position (a prefill whose row wants its prompt)."""
        rows_by_slot: dict[int, list[int]] = {}
        full: set[int] = set()
        for i, seq in enumerate(seqs):
            if not (seq.slots or seq.lens_slots):
                continue
            for slot in seq.capture_slots:
                rows_by_slot.setdefault(slot, []).append(i)
            if prefill and seq.wants_prompt_block:
                full.update(seq.slots)
        take = {}
        for slot, rows in rows_by_slot.items():
            index = None if len(rows) == len(seqs) else torch.tensor(rows, dtype=torch.long, device=self.device)
            take[slot] = Take(index, slot in full)
        steer = {}
        if any(seq.steering for seq in seqs):
            steer = steering_plan([seq.steering for seq in seqs], prefill, self.hidden_size, self.device)
        return ForwardPlan(take=take, steer=steer), rows_by_slot

    # --- after it --------------------------------------------------------------------

    def spec(self, seq: Sequence, slot: int, states: torch.Tensor, position: int | None,
             buffer: Any = None) -> tuple[dict[str, Any], Any]:
        """An ArraySpec and its buffer for `states` ([n, H]) (`buffer`: its bytes, already on the host);
        `position` of its first row (None: not per-position)."""
        spec: dict[str, Any] = {"layer": layer_label(slot, self.num_layers), "keys": seq.slots[slot],
                                "shape": [int(states.shape[0]), int(states.shape[-1])],
                                "dtype": "float32" if states.dtype == torch.float32 else self.dtype_name}
        if position is not None:
            spec["position"] = position
            spec["prompt_tokens"] = len(seq.prompt_ids)
        return spec, raw_bytes(states) if buffer is None else buffer

    def _stream(self, streamed: list[tuple[RowOut, Sequence, int]]) -> None:
        """This step's state of each (row, slot) that streams: one copy to the host per step (per dtype)."""
        groups: dict[tuple[torch.dtype, int], list[tuple[RowOut, Sequence, int]]] = {}
        for entry in streamed:
            state = entry[1].hidden[entry[2]]
            groups.setdefault((state.dtype, state.shape[-1]), []).append(entry)
        for entries in groups.values():
            host = self.staging.rows([seq.hidden[slot] for _, seq, slot in entries])
            for (out, seq, slot), buf in zip(entries, host):
                spec, buf = self.spec(seq, slot, seq.hidden[slot][None], seq.position, buf)
                out.specs.append(spec)
                out.buffers.append(buf)

    def prompt_states(self, seq: Sequence, got: Captured, row: int) -> tuple[list[dict[str, Any]], list[Any]]:
        """The prompt's [P, H] block per asked layer, padding stripped."""
        specs, buffers = [], []
        for slot in seq.slots:
            spec, buf = self.spec(seq, slot, got.block(slot, row, len(seq.prompt_ids)), 0)
            specs.append(spec)
            buffers.append(buf)
        return specs, buffers

    def embedding(self, seq: Sequence, got: Captured, row: int) -> tuple[dict[str, Any], Any]:
        (slot,) = seq.slots
        vector = pool(got.block(slot, row, len(seq.prompt_ids)), seq.pooling or "last_token", seq.normalize)
        return self.spec(seq, slot, vector, None)

    def step(self, seqs: list[Sequence], rows: list[int], logits: torch.Tensor, tokens: list[int], got: Captured,
             prefill: bool) -> dict[int, RowOut]:
        """Extras for the batch rows `rows` (the others asked for none), for the token each just chose.

        Every row keeps its latest state for the Final (`last`); rows that
        stream states get this step's one (a prefill's rows asking for the
        prompt or all got theirs in the prompt block).
        """
        outs: dict[int, RowOut] = {}
        lp_rows = []
        lens_rows: dict[int, list[int]] = {}
        streamed: list[tuple[RowOut, Sequence, int]] = []
        for i in rows:
            seq = seqs[i]
            for slot in seq.slots:
                seq.hidden[slot] = got.last(slot, i)
            out = outs[i] = RowOut()
            if seq.positions == "generated" or (seq.positions == "all" and not prefill):
                streamed.extend((out, seq, slot) for slot in seq.slots)
            if seq.top_logprobs >= 0:
                lp_rows.append(i)
            for slot in seq.lens_slots:
                lens_rows.setdefault(slot, []).append(i)
        self._stream(streamed)
        if lp_rows:
            index = torch.tensor(lp_rows, dtype=torch.long, device=logits.device)
            entries = logprob_entries(logits.index_select(0, index), [tokens[i] for i in lp_rows],
                                      [seqs[i].top_logprobs for i in lp_rows], self.texts)
            for i, entry in zip(lp_rows, entries):
                outs[i].logprob = entry
        for slot, slot_rows in lens_rows.items():
            states = torch.stack([got.last(slot, i) for i in slot_rows])
            tops = self.lens.read(slot, states, [seqs[i].lens_top_k for i in slot_rows])
            for i, entries in zip(slot_rows, tops):
                lens = outs[i].lens
                if lens is None:
                    lens = outs[i].lens = {"token_index": seqs[i].generated, "layers": {}}
                for key in seqs[i].lens_slots[slot]:
                    lens["layers"][str(key)] = entries
        return outs
