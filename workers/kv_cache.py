"""A batch's KV cache: left-padded rows that join and leave between steps.

Rows are aligned at the right (the newest position), so one decode step
appends one column for every row. A row that joins with a prompt longer than
the batch's history pads the others on the left; columns that are padding for
every row are dropped when rows leave, so attention follows the live rows.

Each layer's keys and values live in a buffer with room for more rows and
columns, and are views into it: a decode step writes its column in place
instead of copying the cache (transformers' DynamicCache concatenates, which
costs O(length) per step and O(length^2) per stream); buffers grow by a fixed
number of columns, so the slack stays a few MB whatever the length. Rows come
and go in place too: a row that leaves is overwritten by one of the last rows
(the batch's row order changes, which no row's result depends on), so a
departure copies one row per layer instead of the whole cache; dropped padding
columns just move the view's start; a joining row is written into spare rows.
Only a join that does not fit (more rows than the room, or a prompt longer than
the room on the left) builds new buffers.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

GROW_COLUMNS = 128
ROW_ROOM = 16  # rows are allocated in multiples of this
FEW_HOLES = 8  # rows leaving at once up to which each is copied on its own


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views [rows, heads, start:end, dim] into larger buffers."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, spare: int = GROW_COLUMNS, rows: int | None = None):
        super().__init__()
        rows = keys.shape[0] if rows is None else rows
        length = keys.shape[-2]
        self._k = _with_room(keys, rows, length + spare)
        self._v = _with_room(values, rows, length + spare)
        self.rows, self.start, self._length = keys.shape[0], 0, length
        self.device = keys.device
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys = self._k[: self.rows, :, self.start : self._length, :]
        self.values = self._v[: self.rows, :, self.start : self._length, :]

    def _rebuild(self, row_capacity: int, columns: int) -> None:
        """New buffers holding the live region at column 0."""
        self._k = _with_room(self.keys, row_capacity, columns)
        self._v = _with_room(self.values, row_capacity, columns)
        self._length -= self.start
        self.start = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        n = key_states.shape[-2]
        if self._length + n > self._k.shape[-2]:
            self._rebuild(self._k.shape[0], self._length - self.start + n + GROW_COLUMNS)
        end = self._length + n
        self._k[: self.rows, :, self._length : end, :] = key_states
        self._v[: self.rows, :, self._length : end, :] = value_states
        self._length = end
        self._views()
        return self.keys, self.values

    def fill_holes(self, holes: list[int], sources: list[int], rows: int, trim: int) -> None:
        """Rows `sources` move into rows `holes`; `rows` remain; the first `trim` columns go."""
        live = slice(self.start, self._length)
        if len(holes) <= FEW_HOLES:
            # A plain copy per row: ~6x faster than advanced indexing (index_put) for a row or two.
            for hole, source in zip(holes, sources):
                self._k[hole, :, live].copy_(self._k[source, :, live])
                self._v[hole, :, live].copy_(self._v[source, :, live])
        else:
            index = torch.tensor(holes, dtype=torch.long, device=self._k.device)
            source_index = torch.tensor(sources, dtype=torch.long, device=self._k.device)
            for buf in (self._k, self._v):
                view = buf[:, :, live]
                view.index_copy_(0, index, view.index_select(0, source_index))
        self.rows = rows
        self.start += trim
        self._views()

    def join(self, keys: torch.Tensor, values: torch.Tensor, grow: int, room: int = 0) -> None:
        """Add rows `keys`/`values` ([n, heads, length, dim], right-aligned) below the others,
        whose history first gains `grow` padding columns on the left; new buffers get `room` more rows."""
        n, length = keys.shape[0], keys.shape[-2]
        rows = self.rows
        if rows + n > self._k.shape[0] or self.start < grow:
            width = self._length - self.start
            capacity = _round_up(rows + n + room, ROW_ROOM)
            self._k = _with_room(self.keys, capacity, grow + width + GROW_COLUMNS, left=grow)
            self._v = _with_room(self.values, capacity, grow + width + GROW_COLUMNS, left=grow)
            self.start, self._length = grow, grow + width
        padding = slice(self.start - grow, self.start)
        self._k[:rows, :, padding].zero_()
        self._v[:rows, :, padding].zero_()
        self.start -= grow
        new = slice(rows, rows + n)
        cut = self._length - length  # the new rows' padding: columns start..cut
        self._k[new, :, self.start : cut].zero_()
        self._v[new, :, self.start : cut].zero_()
        self._k[new, :, cut : self._length] = keys
        self._v[new, :, cut : self._length] = values
        self.rows += n
        self._views()


def _with_room(t: torch.Tensor, rows: int, columns: int, left: int = 0) -> torch.Tensor:
    """A [rows, heads, columns, dim] buffer holding `t` in its first rows, from column `left`."""
    shape = list(t.shape)
    shape[0], shape[-2] = max(rows, shape[0]), columns
    buf = t.new_empty(shape)
    buf[: t.shape[0], :, left : left + t.shape[-2], :] = t
    return buf


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Zeros before `t` along `dim` (the sequence axis of the mask: 1)."""
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class BatchCache:
    def __init__(self) -> None:
        self.cache: Any = None  # a DynamicCache whose layers are GrowingLayers
        # The mask ([rows, columns] of 1 (real) / 0 (padding)) is the first `_width` columns of
        # `_mask_buf`, whose spare columns are already 1: a decode step's new column costs no tensor op.
        self._mask_buf: torch.Tensor | None = None
        self._width = 0
        self._padded = False

    @property
    def mask(self) -> torch.Tensor | None:
        return None if self._mask_buf is None else self._mask_buf[:, : self._width]

    @mask.setter
    def mask(self, mask: torch.Tensor | None) -> None:
        if mask is None:
            self._mask_buf, self._width = None, 0
            return
        self._width = mask.shape[1]
        self._mask_buf = mask.new_ones((mask.shape[0], self._width + GROW_COLUMNS))
        self._mask_buf[:, : self._width] = mask

    @property
    def width(self) -> int:
        return self._width

    @property
    def nbytes(self) -> int:
        """Memory held for keys and values, the spare rows and columns included (read for /metrics)."""
        cache = self.cache
        if cache is None:
            return 0
        return sum(layer._k.nbytes + layer._v.nbytes for layer in cache.layers)

    @property
    def padded(self) -> bool:
        """Whether any row has padding; without it the model needs no mask."""
        return self._padded

    def append_rows(self, rows_cache: Any, rows_mask: torch.Tensor, room: int = 0) -> None:
        """Add prefilled sequences (their own cache and [n, length] mask) as the last rows;
        buffers made now have room for `room` more (rows about to join)."""
        length = rows_mask.shape[1]
        if self.cache is None:
            self.mask = rows_mask
            rows = rows_mask.shape[0] + room  # exact: a lone request holds no spare rows
            rows_cache.layers = [GrowingLayer(layer.keys, layer.values, rows=rows) for layer in rows_cache.layers]
            self.cache = rows_cache
        else:
            width = max(self.width, length)
            grow = width - self.width
            for layer, new in zip(self.cache.layers, rows_cache.layers):
                layer.join(new.keys, new.values, grow, room)
            self.mask = torch.cat([_pad_left(self.mask, grow, 1), _pad_left(rows_mask, width - length, 1)], dim=0)
        self._padded = bool((self.mask == 0).any())

    def next_mask(self) -> torch.Tensor | None:
        """The attention mask for a decode step (history plus the new column); None when no row is padded."""
        assert self._mask_buf is not None
        if self._width == self._mask_buf.shape[1]:
            self.mask = self.mask  # a wider buffer
        self._width += 1
        return self.mask if self._padded else None

    def keep_rows(self, keep: list[int]) -> list[int]:
        """Keep the rows `keep` (ascending); returns the old index of each row in the new order."""
        if not keep:
            self.cache, self.mask, self._padded = None, None, False
            return []
        assert self.mask is not None
        n = len(keep)
        kept = set(keep)
        holes = [i for i in range(n) if i not in kept]
        sources = [i for i in keep if i >= n]  # as many as there are holes
        order = list(range(n))
        for hole, source in zip(holes, sources):
            order[hole] = source
        device = self.mask.device
        mask = self.mask.index_select(0, torch.tensor(order, dtype=torch.long, device=device))
        # Columns that are padding in every remaining row can go.
        trim = int((mask.cumsum(dim=1) == 0).all(dim=0).sum())
        self.mask = mask[:, trim:]
        self._padded = bool((self.mask == 0).any())
        for layer in self.cache.layers:
            layer.fill_holes(holes, sources, n, trim)
        return order
