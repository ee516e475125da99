"""Next-token choice for a batch in which every row has its own settings.

Sampled rows are drawn by inverse CDF, vectorized over the batch: each row
takes a uniform number from its own generator (one cheap call; a multinomial
draw per row cost ~25 us on 2 CPU cores) and the search for where it lands in
the row's cumulative weights runs for all rows at once. A `random.Random`
as a row's generator costs ~0.2 us a draw, a `torch.Generator` ~2 us. The nucleus (top_p)
is enforced by rejection instead of a sort (sorting [64, 512] took 1.4 ms on
the CPU, [64, 8192] 31 ms): a draw outside it is redrawn from the tokens more
likely than the rejected one, which still hold the whole nucleus, so the
accepted token follows the nucleus distribution exactly; each rejection at
least halves the candidates' mass on average, so rows finish in a few rounds.
A row's pick depends only on its own logits, settings and generator, so a
seeded request gives the same text whatever else is in its batch, in any order
(up to float rounding in the model's own batched arithmetic).

On the CPU the same steps run on numpy views of the logits: a torch op on a
[64, 512] tensor costs 5-30 us of dispatch and single-threaded reduction
where numpy's costs 1-7 us, and a step's sampling is a dozen such ops (the
whole step went from ~210 to ~100 us at batch 64 and vocabulary 512). Its float32 exp may differ
from torch's in the last bit, which moves a pick only when a uniform lands
within that bit of a boundary; each row's result still depends only on its
own row.
"""
from __future__ import annotations

import random
from typing import Sequence as Seq, Union

import numpy as np
import torch

from workers.staging import to_device

Generator = Union[random.Random, torch.Generator, None]


def choose_tokens(logits: torch.Tensor, temperatures: Seq[float], top_ps: Seq[float],
                  generators: Seq[Generator]) -> list[int]:
    """One token id per row of `logits` ([rows, vocab]).

    Temperature 0 is greedy. Others sample from the temperature-scaled
    distribution cut to its nucleus: a token is kept while the mass of the
    tokens strictly more likely than it is below top_p (so the most likely
    token always is, and tokens of equal probability are kept or cut
    together). Each row draws from its own generator: a random.Random, a CPU
    torch.Generator, or None for torch's global one.
    """
    sampled = [i for i, t in enumerate(temperatures) if t > 0]
    if logits.device.type == "cpu":
        return _choose_on_host(logits, sampled, temperatures, top_ps, generators)
    if not sampled:
        return logits.argmax(dim=-1).tolist()
    device = logits.device
    every = len(sampled) == logits.shape[0]
    rows = logits if every else logits[sampled]
    weights = _weights(rows.float(), to_device([temperatures[i] for i in sampled], torch.float32, device))
    tops = to_device([top_ps[i] for i in sampled], torch.float32, device).to(weights.dtype)

    def uniforms(active: list[int]) -> torch.Tensor:
        # The generators live on the CPU; only these numbers travel (from
        # pinned memory, without waiting), so on a GPU a step without a
        # nucleus has one host sync (the final tolist), not a [rows, vocab] copy.
        return to_device([_uniform(generators[sampled[j]]) for j in active], torch.float64, device)

    picks = _draw(weights, tops, uniforms, cut_any=any(not top_ps[i] >= 1.0 for i in sampled))
    if every:
        return picks.tolist()
    chosen = logits.argmax(dim=-1)
    chosen.index_copy_(0, torch.tensor(sampled, device=device), picks)
    return chosen.tolist()


def _uniform(generator: Generator) -> float:
    """A number in [0, 1) from one row's own generator."""
    if isinstance(generator, random.Random):
        return generator.random()
    return float(torch.rand((), dtype=torch.float64, generator=generator))


def _weights(rows: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """Unnormalized probabilities exp((logit - max) / T); the maximum is exactly 1.

    Shifting the maximum to 0 first means a tiny temperature sends the others
    to exp(-inf) = 0, never the maximum to inf (nan); dividing by the total is
    left to the search, which scales the uniform instead.
    """
    temps = temperatures.to(rows.dtype).clamp_min(torch.finfo(rows.dtype).tiny)  # 1e-45 is 0 in float32
    # In place on the one new tensor: each pass over [rows, vocab] costs.
    return (rows - rows.max(dim=-1, keepdim=True).values).div_(temps[:, None]).exp_()


def _draw(weights: torch.Tensor, top_ps: torch.Tensor, uniforms, cut_any: bool) -> torch.Tensor:
    """A token per row from `weights` cut to each row's nucleus (`cut_any`: some row has one);
    uniforms(active rows) gives their draws. Each rejection round is a host sync (which rows redraw)."""
    n = weights.shape[0]
    picks = torch.empty(n, dtype=torch.long, device=weights.device)
    limit = None
    uncut = top_ps >= 1.0
    active = list(range(n))
    w, floor = weights, None  # floor: each active row's candidates are the tokens heavier than it
    while True:
        x, mass = _inverse_cdf(w if floor is None else w * (w > floor), uniforms(active))
        if not cut_any:
            picks[:] = x[:, 0]
            return picks
        if limit is None:  # the first round's mass is the whole row's
            limit = top_ps * mass[:, 0]
        wx = w.gather(1, x)
        before = (w * (w > wx)).sum(dim=-1)  # the mass of the tokens more likely than the draw
        index = torch.tensor(active, device=w.device)
        ok = (before < limit[index]) | (before == 0) | uncut[index]
        picks.index_copy_(0, index[ok], x[ok, 0])
        redraw = (~ok).nonzero()[:, 0].tolist()
        if not redraw:
            return picks
        # The draw lies outside the nucleus, and so does every token no more
        # likely than it: those leave the candidates for good.
        keep = torch.tensor(redraw, device=w.device)
        active = [active[j] for j in redraw]
        w, floor = w.index_select(0, keep), wx.index_select(0, keep)


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each uniform in [0, 1) lands in its row's cumulative weights: column index [rows, 1], and the mass [rows, 1]."""
    cdf = weights.cumsum(dim=-1)
    mass = cdf[:, -1:]
    # Strictly below the mass: the first cdf entry above the target then
    # exists and is where the cdf rose (a token of weight > 0), even when the
    # uniform times the mass rounds up to the mass.
    target = torch.minimum(uniforms[:, None].to(cdf.dtype) * mass, torch.nextafter(mass, torch.zeros_like(mass)))
    return torch.searchsorted(cdf, target, right=True), mass


# --- the CPU path: the same algorithm on numpy arrays ---------------------------------------------------

_TINY = np.finfo(np.float32).tiny


def _choose_on_host(logits: torch.Tensor, sampled: list[int], temperatures: Seq[float], top_ps: Seq[float],
                    generators: Seq[Generator]) -> list[int]:
    """choose_tokens for CPU logits (see the module docstring)."""
    a = (logits if logits.dtype == torch.float32 and not logits.requires_grad else logits.detach().float()).numpy()
    if not sampled:
        return a.argmax(axis=1).tolist()
    every = len(sampled) == a.shape[0]
    if every:
        temps, tops, gens, rows = temperatures, top_ps, generators, a
    else:
        temps = [temperatures[i] for i in sampled]
        tops = [top_ps[i] for i in sampled]
        gens = [generators[i] for i in sampled]
        rows = a[sampled]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        w = rows - rows.max(axis=1, keepdims=True)
        t0 = temps[0]
        if temps.count(t0) == len(temps):  # one temperature (the usual batch): the same quotients, by a scalar
            w /= np.maximum(np.float32(t0), _TINY)
        else:
            w /= np.maximum(np.array(temps, dtype=np.float32), _TINY)[:, None]
        np.exp(w, out=w)
    cut = [j for j, p in enumerate(tops) if not p >= 1.0]
    picks = _draw_on_host(w, np.array(tops, dtype=np.float32), gens, bool(cut))
    if every:
        return picks.tolist()
    chosen = a.argmax(axis=1)
    chosen[sampled] = picks
    return chosen.tolist()


def _draw_on_host(w: np.ndarray, top_ps: np.ndarray, gens: Seq[Generator], cut_any: bool) -> np.ndarray:
    """_draw on numpy arrays: a token per row of weights `w`, each row cut to its nucleus."""
    n = w.shape[0]
    x, mass = _inverse_cdf_on_host(w, _uniforms_on_host(gens))
    if not cut_any:
        return x
    picks = np.empty(n, dtype=np.int64)
    limit = top_ps * mass
    uncut = top_ps >= 1.0
    active = np.arange(n)
    while True:
        wx = w[np.arange(len(active)), x]
        before = (w * (w > wx[:, None])).sum(axis=1)  # the mass of the tokens more likely than the draw
        ok = (before < limit[active]) | (before == 0) | uncut[active]
        picks[active[ok]] = x[ok]
        redraw = np.flatnonzero(~ok)
        if not len(redraw):
            return picks
        # Outside the nucleus, as is every token no more likely than it: those leave the candidates.
        active = active[redraw]
        w = w[redraw]
        w = w * (w > wx[redraw][:, None])
        x, _ = _inverse_cdf_on_host(w, _uniforms_on_host([gens[j] for j in active]))


def _uniforms_on_host(gens: Seq[Generator]) -> np.ndarray:
    """Each generator's uniform (_uniform), as float32: the precision of the weights it scales."""
    python = random.Random
    return np.array([g.random() if type(g) is python else _uniform(g) for g in gens], dtype=np.float32)


def _inverse_cdf_on_host(w: np.ndarray, uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """_inverse_cdf on numpy arrays (`uniforms` float32): the column each uniform lands on [rows], and each
    row's mass [rows].

    The cumulative sum and the search are torch's (numpy's accumulate is 3-4x slower, and a row-wise
    search has no batched numpy form); both share the arrays' memory.
    """
    cdf = torch.from_numpy(w).cumsum(dim=1)
    mass = cdf[:, -1].numpy()
    target = np.minimum(uniforms * mass, np.nextafter(mass, np.float32(0)))
    return torch.searchsorted(cdf, torch.from_numpy(target[:, None]), right=True).numpy()[:, 0], mass
