"""workers.sampling.choose_tokens: batch-independent seeded draws, the right distribution, the top_p cut."""
from __future__ import annotations

import math
import random

import pytest
import torch

from workers.sampling import choose_tokens

# Chi-square critical values at p = 0.001 by degrees of freedom: a correct
# sampler fails one of these checks about once in a thousand seeds, and the
# seeds are fixed, so a pass is a pass every run.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _row_generator(seed: int, kind: str):
    """The two kinds of per-row generator choose_tokens takes."""
    return random.Random(seed) if kind == "python" else _generator(seed)


def _requests(vocab: int, n: int, rng: random.Random) -> list[dict]:
    """Requests with assorted settings; greedy ones among them (no generator)."""
    out = []
    for i in range(n):
        temperature = rng.choice([0.0, 0.3, 0.8, 1.0, 1.7, 1e-30])
        out.append({"seed": 1000 + i, "temperature": temperature, "top_p": rng.choice([0.0, 0.5, 0.9, 1.0]),
                    "logits": torch.randn(12, vocab, generator=_generator(i)) * rng.choice([0.5, 2.0, 8.0])})
    # Ties at the top: a stable order must decide them the same way in any batch.
    out[0]["logits"][:, :5] = out[0]["logits"].max() + 1
    return out


def _run(reqs: list[dict], kind: str) -> list[list[int]]:
    """Twelve steps for `reqs` as one batch, each with a fresh generator from its seed."""
    gens = [_row_generator(r["seed"], kind) if r["temperature"] > 0 else None for r in reqs]
    picks: list[list[int]] = [[] for _ in reqs]
    for step in range(12):
        logits = torch.stack([r["logits"][step] for r in reqs])
        got = choose_tokens(logits, [r["temperature"] for r in reqs], [r["top_p"] for r in reqs], gens)
        for row, token in zip(picks, got):
            row.append(token)
    return picks


@pytest.mark.parametrize("kind", ["torch", "python"])
@pytest.mark.parametrize("vocab", [7, 512, 8192])
def test_a_seeded_request_gets_the_same_tokens_alone_and_in_any_batch(vocab, kind):
    rng = random.Random(vocab)
    reqs = _requests(vocab, 10, rng)
    alone = [_run([r], kind)[0] for r in reqs]
    for trial in range(4):
        order = list(range(len(reqs)))
        rng.shuffle(order)
        subset = order[: rng.randint(2, len(reqs))]
        together = _run([reqs[i] for i in subset], kind)
        for i, tokens in zip(subset, together):
            assert tokens == alone[i], (trial, i, reqs[i]["temperature"], reqs[i]["top_p"])


def test_greedy_rows_are_the_argmax():
    logits = torch.randn(16, 300, generator=_generator(3))
    temps = [0.0 if i % 2 else 0.9 for i in range(16)]
    got = choose_tokens(logits, temps, [0.9] * 16, [None if t == 0 else _generator(i) for i, t in enumerate(temps)])
    argmax = logits.argmax(dim=-1).tolist()
    assert [g for g, t in zip(got, temps) if t == 0] == [a for a, t in zip(argmax, temps) if t == 0]
    assert choose_tokens(logits, [0.0] * 16, [1.0] * 16, [None] * 16) == argmax


def _frequencies(probs: list[float], temperature: float, top_p: float, draws: int) -> list[int]:
    """Draw `draws` tokens from a fixed distribution, as a batch of 500 seeded rows."""
    logits = torch.tensor(probs).log()
    counts = [0] * len(probs)
    rows = 500
    gens = [random.Random(7 + i) for i in range(rows)]
    for _ in range(draws // rows):
        for token in choose_tokens(logits.expand(rows, -1), [temperature] * rows, [top_p] * rows, gens):
            counts[token] += 1
    return counts


def _chi_square(counts: list[int], expected: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, expected) if p > 0)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 1.6])
def test_draws_follow_the_temperature_scaled_distribution(temperature):
    probs = [0.4, 0.25, 0.2, 0.1, 0.05]
    scaled = [p ** (1 / temperature) for p in probs]
    expected = [s / sum(scaled) for s in scaled]
    counts = _frequencies(probs, temperature, 1.0, 30_000)
    assert _chi_square(counts, expected) < CHI2_999[len(probs) - 1], counts


@pytest.mark.parametrize("top_p, kept", [(0.7, 2), (0.65, 2), (0.5, 1), (0.9, 3), (0.0, 1), (0.99, 4)])
def test_top_p_keeps_a_token_while_the_mass_before_it_is_below_top_p(top_p, kept):
    probs = [0.5, 0.25, 0.15, 0.1]  # masses before each token: 0, 0.5, 0.75, 0.9
    counts = _frequencies(probs, 1.0, top_p, 20_000)
    assert all(c == 0 for c in counts[kept:]), counts
    if kept > 1:
        expected = [p / sum(probs[:kept]) for p in probs[:kept]]
        assert _chi_square(counts[:kept], expected) < CHI2_999[kept - 1], counts


def test_tokens_of_zero_probability_are_never_drawn():
    # -inf logits, and logits so far below the top that a small temperature
    # makes their weight exactly 0 in float32: neither may be picked, whatever
    # the uniform (including values that round the target up to the mass).
    logits = torch.full((64, 1000), -math.inf)
    logits[:, 10] = 0.0
    logits[:, 500] = -0.1
    logits[:, 999] = -200.0
    gens = [_generator(i) for i in range(64)]
    seen = set()
    for _ in range(50):
        seen.update(choose_tokens(logits, [0.9] * 32 + [0.05] * 32, [1.0] * 16 + [0.95] * 16 + [1.0] * 32, gens))
    assert seen <= {10, 500, 999} and {10, 500} <= seen
    near_one = torch.tensor([1.0 - 2 ** -24])
    weights = torch.zeros(1, 1000)
    weights[0, 3] = 1.0
    from workers.sampling import _inverse_cdf

    assert _inverse_cdf(weights, near_one)[0].item() == 3
    assert _inverse_cdf(weights, torch.zeros(1))[0].item() == 3


def test_tiny_temperatures_are_greedy_and_never_nan():
    logits = torch.randn(8, 4096, generator=_generator(11)) * 30
    for temperature in (1e-30, 1e-45, 1e-6):
        got = choose_tokens(logits, [temperature] * 8, [0.9] * 4 + [1.0] * 4, [_generator(i) for i in range(8)])
        assert got == logits.argmax(dim=-1).tolist()


def test_half_precision_logits():
    logits = torch.randn(4, 256, generator=_generator(5)).half()
    gens = [_generator(i) for i in range(4)]
    got = choose_tokens(logits, [0.8] * 4, [0.9] * 4, gens)
    again = choose_tokens(logits.float(), [0.8] * 4, [0.9] * 4, [_generator(i) for i in range(4)])
    assert got == again and all(0 <= t < 256 for t in got)


def test_the_host_search_lands_where_the_tensor_search_does():
    # The CPU path (numpy) searches below the mass only for rows whose target rounded up to it; the
    # tensor path clamps every row. Uniforms just under 1 round to 1.0 in float32 and take that branch.
    import numpy as np

    from workers.sampling import _inverse_cdf, _inverse_cdf_on_host

    rng = torch.Generator().manual_seed(5)
    weights = torch.rand(64, 300, generator=rng) * (torch.rand(64, 300, generator=rng) > 0.5)
    weights[:, -20:] = 0  # trailing tokens of weight 0 must never be drawn
    weights[::7] = 0
    weights[::7, 4] = 1.0  # rows with a single candidate
    uniforms = torch.rand(64, dtype=torch.float64, generator=rng)
    uniforms[::3] = 1.0 - 2.0 ** -40  # rounds to 1.0 in float32: the target meets the mass
    uniforms[1::5] = 0.0
    expected, mass = _inverse_cdf(weights, uniforms)
    got, host_mass = _inverse_cdf_on_host(weights.numpy().copy(), uniforms.numpy().astype(np.float32))
    assert got.tolist() == expected[:, 0].tolist()
    assert host_mass.tolist() == mass[:, 0].tolist()
    assert (weights.gather(1, torch.from_numpy(got)[:, None]) > 0).all()
