"""Activation patching (POST /patch) as a job the engine advances one forward pass at a time.

A job runs the clean and corrupted prompts together (one forward of two
rows), keeping the clean activation of every requested (layer, component) at
the chosen positions; then the patched runs go as the ROWS of a few batched
forwards of the corrupted prompt, each row with its own (layer, component)
replaced by the clean activation (workers/patch_hooks.py). The clean
activations live in the job and go with it.

Why a job and not one call: a sweep of hundreds of runs takes many forward
passes, and the engine thread also serves streams. The engine calls `step()`
once per loop, between the runners' decode steps, so a stream waits for at
most one chunk. Each chunk is sized by the memory budget and by time: the
rows that fit in about STEP_S seconds at the rate the last forward ran at
(SHARED_STEP_S while streams are running), growing at most 4x per step; with
no stream running, at least MIN_CHUNK_TOKENS prompt tokens, since smaller
batches waste a slow (or busy) machine's time.

Savings that change nothing in the numbers (up to float rounding):
- Runs go in layer order, and a chunk whose rows patch nothing before block
  L does not run blocks 0..L-1: they would compute the corrupted run again
  for every row, so they answer with its recorded output (patch_hooks.skipped).
  Not when text is asked for: a skipped block keeps no KV cache.
- When every patched position is at or after p0 > 0, the corrupted prompt's
  first p0 positions are the same in every patched run: their keys and values
  come from the corrupted run and each row runs only the rest.
- Text (`max_tokens`) decodes from each row's own KV cache, all rows of a
  chunk in one decode step.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers.cache_utils import DynamicLayer

from loom import protocol as P
from workers.kv_cache import GrowingLayer
from workers.model_store import LoadedModel
from workers.patch_hooks import hooked, reader, record_outputs, skipped, writer
from workers.patch_plan import decoder_blocks, describe_token, plan_patch
from workers.runner import _cache_factory

log = logging.getLogger("loom.worker")

Emit = Callable[[P.Message, list[Any]], None]

STEP_S = 1.0
SHARED_STEP_S = 0.25
GROWTH = 4
MIN_CHUNK_TOKENS = 256
CPU_MEMORY_BUDGET = 1 << 30
GPU_MEMORY_FRACTION = 0.5  # of the memory free when a chunk is sized


@dataclass
class _Generation:
    """Greedy text for the rows of one forward, decoded together from their KV cache."""

    targets: list[dict[str, Any]]  # the answer entries that get a "text"
    cache: Any
    left: int
    tokens: list[list[int]] = field(default_factory=list)
    done: list[bool] = field(default_factory=list)
    last: torch.Tensor | None = None


class PatchJob:
    def __init__(self, lm: LoadedModel, req: P.Patch, emit: Emit):
        self.lm = lm
        self.rid = req.rid
        self.emit = emit
        self.plan = plan_patch(lm, req)
        self.blocks = decoder_blocks(lm)
        # By layer, so that each chunk's rows start late in the model (see `skipped`).
        self.pending = sorted(range(len(self.plan.runs)), key=lambda i: self.plan.runs[i][0])
        self.results: list[dict[str, Any] | None] = [None] * len(self.plan.runs)
        self.clean_acts: dict[tuple[int, str], torch.Tensor] = {}
        self.summary: dict[str, Any] | None = None
        self.answer = self.wrong = 0
        self.generation: _Generation | None = None
        self.positions = torch.tensor(self.plan.positions, dtype=torch.long, device=lm.device)
        self.p0 = self.plan.positions[0]
        self.prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.corrupted_outputs: dict[int, torch.Tensor | None] = {}  # block -> its output in the corrupted run
        self.rate: float | None = None  # prompt tokens per second of the last forward
        self.last_rows = 0
        self.memory_rows: int | None = None  # lowered after an out-of-memory
        self.batches: list[int] = []
        self.forwards = 0
        self.started = time.perf_counter()
        self._new_cache = _cache_factory(lm)

    @torch.inference_mode()
    def step(self, shared: bool) -> bool:
        """One forward pass; True once the answer has been sent."""
        if self.generation is not None:
            self._decode()
        elif self.summary is None:
            self._baseline()
        elif self.pending:
            self._chunk(shared)
        if self.generation is None and not self.pending and self.summary is not None:
            self._answer()
            return True
        return False

    # --- forward passes -----------------------------------------------------------

    def _forward(self, ids: torch.Tensor, cache: Any) -> torch.Tensor:
        lm = self.lm
        kwargs: dict[str, Any] = {}
        if cache is not None:
            kwargs[lm.cache_kwarg] = cache
        if lm.accepts_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = lm.model(input_ids=ids, use_cache=cache is not None, **kwargs)
        self.forwards += 1
        return out.logits[:, -1, :].float()

    def _baseline(self) -> None:
        plan, lm = self.plan, self.lm
        ids = torch.tensor([plan.clean_ids, plan.corrupted_ids], dtype=torch.long, device=lm.device)
        cache = self._new_cache() if self.p0 > 0 or plan.max_tokens > 0 else None
        edits = [(run, reader(self.clean_acts, run, 0, self.positions)) for run in plan.runs]
        # Blocks that no row of a chunk patches answer from the corrupted run (only without text: a
        # skipped block keeps no KV cache to decode from).
        below = 0 if plan.max_tokens else max(layer for layer, _ in plan.runs)
        everywhere = torch.arange(len(plan.corrupted_ids), device=lm.device)
        handles = record_outputs(self.blocks, below, 1, everywhere, self.corrupted_outputs)
        t0 = time.perf_counter()
        try:
            with hooked(self.blocks, edits):
                logits = self._forward(ids, cache)
        finally:
            for handle in handles:
                handle.remove()
        self._measure(ids.numel(), 2, t0)
        self.answer = plan.answer_id if plan.answer_id is not None else int(logits[0].argmax())
        self.wrong = plan.wrong_id if plan.wrong_id is not None else int(logits[1].argmax())
        self.summary = {"clean": self._entry(logits[0]), "corrupted": self._entry(logits[1])}
        if self.p0 > 0:
            self.prefix = _prefix(cache, row=1, length=self.p0, full=len(plan.clean_ids))
            if self.prefix is None:  # a cache layout the prefix cannot be read from: run whole prompts
                self.p0 = 0
        if plan.max_tokens > 0:
            self._generate([self.summary["clean"], self.summary["corrupted"]], cache, logits)

    def _chunk(self, shared: bool) -> None:
        plan, lm = self.plan, self.lm
        length = len(plan.corrupted_ids) - self.p0
        rows = self._take(shared, length)
        runs = [plan.runs[i] for i in rows]
        ids = torch.tensor([plan.corrupted_ids[self.p0:]], dtype=torch.long, device=lm.device).repeat(len(rows), 1)
        shifted = self.positions - self.p0
        edits = [(run, writer(r, shifted, self.clean_acts[run])) for r, run in enumerate(runs)]
        below = min(layer for layer, _ in runs)
        if not all(self.corrupted_outputs.get(i) is not None for i in range(below)):
            below = 0
        t0 = time.perf_counter()
        try:
            cache = self._prefix_cache(len(rows)) if self.p0 > 0 else self._new_cache() if plan.max_tokens else None
            same = {i: self.corrupted_outputs[i][self.p0:] for i in range(below)}
            with hooked(self.blocks, edits), skipped(self.blocks, same, below):
                logits = self._forward(ids, cache)
        except torch.OutOfMemoryError:
            if len(rows) == 1:
                raise
            self.pending[:0] = rows  # try again with half as many rows
            self.memory_rows = max(1, len(rows) // 2)
            log.warning("patching %s: out of memory with %d rows; now at most %d", self.rid, len(rows),
                        self.memory_rows)
            _release(lm.device)
            return
        self._measure(ids.numel(), len(rows), t0)
        self.batches.append(len(rows))
        clean, corrupted = self.summary["clean"]["logit_diff"], self.summary["corrupted"]["logit_diff"]
        for r, (i, (layer, component)) in enumerate(zip(rows, runs)):
            entry = self._entry(logits[r])
            recovered = None if clean == corrupted else (entry["logit_diff"] - corrupted) / (clean - corrupted)
            self.results[i] = {"layer": layer + 1, "component": component, **entry, "recovered": recovered}
            del self.clean_acts[(layer, component)]  # held no longer than needed
        if plan.max_tokens > 0:
            self._generate([self.results[i] for i in rows], cache, logits)

    def _entry(self, logits: torch.Tensor) -> dict[str, Any]:
        top = int(logits.argmax())
        return {"logit_diff": float(logits[self.answer] - logits[self.wrong]),
                "top_token": self.lm.tokenizer.decode([top]), "top_token_id": top}

    def _prefix_cache(self, rows: int) -> Any:
        assert self.prefix is not None
        cache = self._new_cache()
        cache.layers = [GrowingLayer(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in self.prefix]
        return cache

    # --- chunk size -------------------------------------------------------------------

    def _take(self, shared: bool, length: int) -> list[int]:
        rows = self.memory_rows or max(1, _memory_budget(self.lm.device) // self._row_bytes(length))
        if self.rate is not None:
            target = SHARED_STEP_S if shared else STEP_S
            timed = min(int(target * self.rate / length), GROWTH * max(1, self.last_rows))
            rows = min(rows, max(1, timed if shared else max(timed, -(-MIN_CHUNK_TOKENS // length))))
        left = len(self.pending)
        rows = -(-left // -(-left // max(1, rows)))  # chunks of even size: no small tail
        taken, self.pending = self.pending[:rows], self.pending[rows:]
        return taken

    def _row_bytes(self, length: int) -> int:
        """A generous estimate of one row's peak memory in a chunk's forward (and its KV cache)."""
        lm = self.lm
        cfg = lm.model.config.get_text_config() if hasattr(lm.model.config, "get_text_config") else lm.model.config
        h = lm.hidden_size
        inter = getattr(cfg, "intermediate_size", None) or 4 * h
        heads = getattr(cfg, "num_attention_heads", 1) or 1
        kv = (getattr(cfg, "num_key_value_heads", None) or heads) * (getattr(cfg, "head_dim", None) or h // heads)
        total = len(self.plan.corrupted_ids) + self.plan.max_tokens
        per_position = 8 * h + 3 * inter + heads * total
        if not lm.accepts_logits_to_keep:
            per_position += int(getattr(cfg, "vocab_size", 0))
        size = next(lm.model.parameters()).element_size()
        return size * (length * per_position + 2 * lm.num_layers * total * kv) + 4 * int(getattr(cfg, "vocab_size", 0))

    def _measure(self, tokens: int, rows: int, t0: float) -> None:
        self.rate = tokens / max(time.perf_counter() - t0, 1e-6)
        self.last_rows = rows

    # --- text ---------------------------------------------------------------------------

    def _generate(self, targets: list[dict[str, Any]], cache: Any, logits: torch.Tensor) -> None:
        for i, layer in enumerate(cache.layers):
            if not isinstance(layer, GrowingLayer):  # a decode step then writes one column in place
                cache.layers[i] = GrowingLayer(layer.keys, layer.values)
        gen = _Generation(targets=targets, cache=cache, left=self.plan.max_tokens,
                          tokens=[[] for _ in targets], done=[False] * len(targets))
        self.generation = gen
        self._accept(logits.argmax(dim=-1).tolist())

    def _decode(self) -> None:
        gen = self.generation
        assert gen is not None and gen.last is not None
        self._accept(self._forward(gen.last, gen.cache).argmax(dim=-1).tolist())

    def _accept(self, tokens: list[int]) -> None:
        gen = self.generation
        assert gen is not None
        for r, token in enumerate(tokens):
            if gen.done[r]:
                continue
            if token in self.lm.eos_ids:
                gen.done[r] = True
            else:
                gen.tokens[r].append(token)
        gen.left -= 1
        gen.last = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.lm.device)
        if gen.left <= 0 or all(gen.done):
            for target, ids in zip(gen.targets, gen.tokens):
                target["text"] = self.lm.tokenizer.decode(ids, skip_special_tokens=True,
                                                          clean_up_tokenization_spaces=False)
            self.generation = None

    # --- the answer -----------------------------------------------------------------------

    def _answer(self) -> None:
        assert self.summary is not None
        plan, lm = self.plan, self.lm
        elapsed = time.perf_counter() - self.started
        result = {
            **self.summary,
            "results": self.results,
            "answer": describe_token(lm, self.answer),
            "wrong_answer": describe_token(lm, self.wrong),
            "positions": plan.positions,
            "metadata": {"model": lm.model_id, "prompt_tokens": len(plan.clean_ids), "patched_runs": len(plan.runs),
                         "forward_passes": self.forwards, "batches": self.batches,
                         "time_ms": round(elapsed * 1e3, 2)},
        }
        log.info("patch %s: %d runs in %d batches (%s rows), %d forward passes, %.0f ms", self.rid, len(plan.runs),
                 len(self.batches), "/".join(map(str, self.batches)), self.forwards, elapsed * 1e3)
        self.emit(P.PatchResult(rid=self.rid, result=result), [])


def _prefix(cache: Any, row: int, length: int, full: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Row `row`'s keys and values of the first `length` positions, from a cache filled by a whole prompt."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(type(layer) is DynamicLayer and layer.keys.shape[-2] == full for layer in layers):
        return None  # e.g. sliding-window layers that dropped positions
    return [(layer.keys[row:row + 1, :, :length].clone(), layer.values[row:row + 1, :, :length].clone())
            for layer in layers]


def _memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_MEMORY_FRACTION)
    return CPU_MEMORY_BUDGET


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class PatchJobs:
    """The worker's patch jobs, advanced in turn by the engine loop."""

    def __init__(self, emit: Emit):
        self.emit = emit
        self.jobs: list[PatchJob] = []

    def __len__(self) -> int:
        return len(self.jobs)

    def add(self, lm: LoadedModel, req: P.Patch) -> None:
        """Checks the request (raises RequestError) and queues it."""
        self.jobs.append(PatchJob(lm, req, self.emit))

    def step(self, shared: bool) -> None:
        """One forward pass of the next job (round robin)."""
        job = self.jobs.pop(0)
        try:
            done = job.step(shared)
        except Exception as exc:  # e.g. out of memory with one row: fail this request, keep serving
            log.exception("patch %s failed", job.rid)
            self.emit(P.Error(rid=job.rid, type=P.ErrorType.INTERNAL, message=f"patching failed: {exc}"), [])
            return
        if not done:
            self.jobs.append(job)

    def cancel(self, rid: str) -> bool:
        kept = [job for job in self.jobs if job.rid != rid]
        cancelled = len(kept) != len(self.jobs)
        self.jobs = kept
        return cancelled

    def fail(self, error_type: str, message: str, model_id: str | None = None) -> None:
        """Answer and drop the jobs on `model_id` (every job when None)."""
        for job in [j for j in self.jobs if model_id is None or j.lm.model_id == model_id]:
            self.jobs.remove(job)
            self.emit(P.Error(rid=job.rid, type=error_type, message=message), [])
