"""The batch KV cache against a plain reference: every row's keys, values and mask, after
random joins, decode steps and departures (rows leave in place, the order the cache reports)."""
from __future__ import annotations

import random
from types import SimpleNamespace

import torch

from workers import kv_cache
from workers.kv_cache import BatchCache

HEADS, DIM, LAYERS = 2, 3, 2


def _prefill(rng: random.Random, lengths: list[int]) -> tuple[SimpleNamespace, torch.Tensor, list[list[torch.Tensor]]]:
    """A prefill's cache (left-padded, padding zeroed), its mask, and each row's real K and V per layer."""
    width = max(lengths)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    layers, real = [], [[] for _ in lengths]
    for _ in range(LAYERS):
        k = torch.randn(len(lengths), HEADS, width, DIM) * mask[:, None, :, None]
        v = torch.randn(len(lengths), HEADS, width, DIM) * mask[:, None, :, None]
        layers.append(SimpleNamespace(keys=k, values=v))
        for i, n in enumerate(lengths):
            real[i].append((k[i, :, width - n:], v[i, :, width - n:]))
    return SimpleNamespace(layers=layers), mask, real


def _check(kv: BatchCache, rows: list[int], real: dict[int, list]) -> None:
    width = max(real[r][0][0].shape[1] for r in rows)
    assert kv.mask.shape == (len(rows), width)
    for j, r in enumerate(rows):
        n = real[r][0][0].shape[1]
        assert kv.mask[j].tolist() == [0] * (width - n) + [1] * n
        for layer, (k, v) in zip(kv.cache.layers, real[r]):
            assert layer.keys.shape == (len(rows), HEADS, width, DIM)
            assert torch.equal(layer.keys[j, :, width - n:], k) and torch.equal(layer.values[j, :, width - n:], v)
            assert not layer.keys[j, :, :width - n].any() and not layer.values[j, :, :width - n].any()
    assert kv.padded == bool((kv.mask == 0).any())


def test_joins_steps_and_departures_match_a_reference(monkeypatch):
    monkeypatch.setattr(kv_cache, "GROW_COLUMNS", 8)  # so the columns run out often
    rng = random.Random(0)
    torch.manual_seed(0)
    kv = BatchCache()
    rows: list[int] = []  # row ids in the cache's order
    real: dict[int, list] = {}
    next_id = 0
    grew = moved = 0
    for step in range(300):
        op = rng.random()
        if op < 0.15 or not rows:  # a group joins, sometimes with prompts longer than the history
            lengths = [rng.randint(1, 12 if rng.random() < 0.8 else 60) for _ in range(rng.randint(1, 5))]
            cache, mask, new = _prefill(rng, lengths)
            kv.append_rows(cache, mask, room=rng.randint(0, 20))  # rows said to be waiting
            for r in new:
                real[next_id] = r
                rows.append(next_id)
                next_id += 1
        elif op < 0.35:  # some rows leave
            keep = sorted(rng.sample(range(len(rows)), rng.randint(0, len(rows) - 1)))
            order = kv.keep_rows(keep)
            assert sorted(order) == keep
            moved += order != keep
            rows = [rows[i] for i in order]
            if not rows:
                assert kv.cache is None and kv.mask is None
                continue
        else:  # a decode step: every layer gets one column per row
            capacity = kv.cache.layers[0]._k.shape[-2]
            kv.next_mask()
            for i, layer in enumerate(kv.cache.layers):
                k, v = torch.randn(len(rows), HEADS, 1, DIM), torch.randn(len(rows), HEADS, 1, DIM)
                layer.update(k, v)
                for j, r in enumerate(rows):
                    old_k, old_v = real[r][i]
                    real[r][i] = (torch.cat([old_k, k[j]], dim=1), torch.cat([old_v, v[j]], dim=1))
            grew += kv.cache.layers[0]._k.shape[-2] != capacity
        _check(kv, rows, real)
        if kv.cache is not None:
            assert all(layer._k.shape[0] >= len(rows) for layer in kv.cache.layers)
    assert moved and grew  # leavers were filled from later rows, and the columns ran out at least once


def test_a_departure_copies_only_the_rows_that_move():
    """Rows before the leaver keep their place; the last row fills the hole; nothing is reallocated."""
    kv = BatchCache()
    cache, mask, _ = _prefill(random.Random(1), [4, 4, 4, 4])
    kv.append_rows(cache, mask)
    buffers = [layer._k.data_ptr() for layer in kv.cache.layers]
    before = [layer.keys.clone() for layer in kv.cache.layers]
    order = kv.keep_rows([0, 2, 3])
    assert order == [0, 3, 2]
    assert [layer._k.data_ptr() for layer in kv.cache.layers] == buffers
    for layer, old in zip(kv.cache.layers, before):
        assert torch.equal(layer.keys, old[[0, 3, 2]])
