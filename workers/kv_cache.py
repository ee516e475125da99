"""A batch's KV cache: left-padded rows that join and leave between steps.

Rows are aligned at the right (the newest position), so one decode step
appends one column for every row. A row that joins with a prompt longer than
the batch's history pads the others on the left; columns that are padding for
every row are trimmed when rows leave, so memory follows the live rows.
"""
from __future__ import annotations

from typing import Any

import torch


def _layers(cache: Any) -> list[tuple[Any, str, str]]:
    # transformers >= 4.56 keeps per-layer objects; older versions keep two lists.
    if hasattr(cache, "layers"):
        return [(layer, "keys", "values") for layer in cache.layers]
    return [(cache, f"key_cache.{i}", f"value_cache.{i}") for i in range(len(cache.key_cache))]


def _get(obj: Any, name: str) -> torch.Tensor:
    if "." in name:
        attr, i = name.split(".")
        return getattr(obj, attr)[int(i)]
    return getattr(obj, name)


def _set(obj: Any, name: str, value: torch.Tensor) -> None:
    if "." in name:
        attr, i = name.split(".")
        getattr(obj, attr)[int(i)] = value
    else:
        setattr(obj, name, value)


def _map(cache: Any, fn) -> None:
    for obj, k, v in _layers(cache):
        _set(obj, k, fn(_get(obj, k)))
        _set(obj, v, fn(_get(obj, v)))


def _pad_left(t: torch.Tensor, n: int, dim: int = -2) -> torch.Tensor:
    """Zeros before `t` along `dim` (the sequence axis: -2 for K/V, 1 for the mask)."""
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class BatchCache:
    def __init__(self) -> None:
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [rows, columns] of 1 (real) / 0 (padding)
        self._padded = False

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def append_row(self, row_cache: Any, length: int, device: torch.device) -> None:
        """Add one prefilled sequence (its own single-row cache) as the last row."""
        row_mask = torch.ones((1, length), dtype=torch.long, device=device)
        if self.cache is None:
            self.cache, self.mask, self._padded = row_cache, row_mask, False
            return
        width = max(self.width, length)
        grow, row_pad = width - self.width, width - length
        rows = []
        for (obj, k, v), (robj, rk, rv) in zip(_layers(self.cache), _layers(row_cache)):
            for name, rname in ((k, rk), (v, rv)):
                merged = torch.cat([_pad_left(_get(obj, name), grow), _pad_left(_get(robj, rname), row_pad)], dim=0)
                rows.append((obj, name, merged))
        for obj, name, merged in rows:
            _set(obj, name, merged)
        self.mask = torch.cat([_pad_left(self.mask, grow, 1), _pad_left(row_mask, row_pad, 1)], dim=0)
        self._padded = self._padded or grow > 0 or row_pad > 0

    @property
    def padded(self) -> bool:
        """Whether any row has padding; without it the model needs no mask."""
        return self._padded

    def next_mask(self) -> torch.Tensor:
        """The attention mask for a decode step (history plus the new column)."""
        assert self.mask is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        return self.mask

    def keep_rows(self, keep: list[int]) -> None:
        if not keep:
            self.cache, self.mask = None, None
            return
        assert self.mask is not None
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        # Columns that are padding in every remaining row can go.
        trim = int((mask.cumsum(dim=1) == 0).all(dim=0).sum())
        self.mask = mask[:, trim:]
        self._padded = bool((self.mask == 0).any())
        _map(self.cache, lambda t: t.index_select(0, index)[..., trim:, :])
