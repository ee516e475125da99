"""A batch's KV cache: left-padded rows that join and leave between steps.

Rows are aligned at the right (the newest position), so one decode step
appends one column for every row. A row that joins with a prompt longer than
the batch's history pads the others on the left; columns that are padding for
every row are trimmed when rows leave, so memory follows the live rows.

Each layer's keys and values live in a buffer with room for more columns: a
decode step writes its column in place instead of copying the whole cache
(transformers' DynamicCache concatenates, which costs O(length) per step and
O(length^2) per stream). Buffers grow by a fixed number of columns, so the
slack stays a few MB whatever the length.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

GROW_COLUMNS = 128


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into preallocated buffers."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, spare: int = GROW_COLUMNS):
        super().__init__()
        length = keys.shape[-2]
        self._k = _with_room(keys, length + spare)
        self._v = _with_room(values, length + spare)
        self._length = length
        self.device = keys.device
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys = self._k[..., : self._length, :]
        self.values = self._v[..., : self._length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        n = key_states.shape[-2]
        end = self._length + n
        if end > self._k.shape[-2]:
            self._k = _with_room(self.keys, end + GROW_COLUMNS)
            self._v = _with_room(self.values, end + GROW_COLUMNS)
        self._k[..., self._length:end, :] = key_states
        self._v[..., self._length:end, :] = value_states
        self._length = end
        self._views()
        return self.keys, self.values


def _with_room(t: torch.Tensor, columns: int) -> torch.Tensor:
    """A [rows, heads, columns, dim] buffer holding `t` at the start of its columns."""
    shape = list(t.shape)
    shape[-2] = columns
    buf = t.new_empty(shape)
    buf[..., : t.shape[-2], :] = t
    return buf


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Zeros before `t` along `dim` (the sequence axis: -2 for K/V, 1 for the mask)."""
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class BatchCache:
    def __init__(self) -> None:
        self.cache: Any = None  # a DynamicCache whose layers are GrowingLayers
        self.mask: torch.Tensor | None = None  # [rows, columns] of 1 (real) / 0 (padding)
        self._padded = False

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    @property
    def nbytes(self) -> int:
        """Memory held for keys and values, the spare columns included (read for /metrics)."""
        cache = self.cache
        if cache is None:
            return 0
        return sum(layer._k.nbytes + layer._v.nbytes for layer in cache.layers)

    @property
    def padded(self) -> bool:
        """Whether any row has padding; without it the model needs no mask."""
        return self._padded

    def append_rows(self, rows_cache: Any, rows_mask: torch.Tensor) -> None:
        """Add prefilled sequences (their own cache and [n, length] mask) as the last rows."""
        length = rows_mask.shape[1]
        width = max(self.width, length)
        grow, row_pad = width - self.width, width - length
        new_layers = rows_cache.layers
        if self.cache is None:
            merged = [(layer.keys, layer.values) for layer in new_layers]
            self.mask = rows_mask
        else:
            merged = [
                (torch.cat([_pad_left(old.keys, grow, -2), _pad_left(new.keys, row_pad, -2)], dim=0),
                 torch.cat([_pad_left(old.values, grow, -2), _pad_left(new.values, row_pad, -2)], dim=0))
                for old, new in zip(self.cache.layers, new_layers)
            ]
            self.mask = torch.cat([_pad_left(self.mask, grow, 1), _pad_left(rows_mask, row_pad, 1)], dim=0)
        rows_cache.layers = [GrowingLayer(k, v) for k, v in merged]
        self.cache = rows_cache
        self._padded = bool((self.mask == 0).any())

    def next_mask(self) -> torch.Tensor:
        """The attention mask for a decode step (history plus the new column)."""
        assert self.mask is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        return self.mask

    def keep_rows(self, keep: list[int]) -> None:
        if not keep:
            self.cache, self.mask, self._padded = None, None, False
            return
        assert self.mask is not None
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        # Columns that are padding in every remaining row can go.
        trim = int((mask.cumsum(dim=1) == 0).all(dim=0).sum())
        self.mask = mask[:, trim:]
        self._padded = bool((self.mask == 0).any())
        self.cache.layers = [
            GrowingLayer(layer.keys.index_select(0, index)[..., trim:, :],
                         layer.values.index_select(0, index)[..., trim:, :])
            for layer in self.cache.layers
        ]
