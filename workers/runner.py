"""Continuous batching for one loaded model.

Each call to `step()` runs one decode step for every running row, then
prefills the requests that arrived since (together, left-padded, when
several came at once) and merges them into the batch's KV cache. Finished and
cancelled rows leave before the next step.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np
import torch

from loom import protocol as P
from workers.detokenizer import IncrementalDetokenizer
from workers.hidden import HiddenCapture, slot_for
from workers.kv_cache import BatchCache
from workers.model_store import DTYPE_NAMES, LoadedModel
from workers.sampling import choose_tokens
from workers.sequence import Sequence

log = logging.getLogger("loom.worker")

Emit = Callable[[P.Message, list[Any]], None]

# Most prompts prefilled in one forward pass: new arrivals join together, but
# a burst does not become one huge allocation.
MAX_PREFILL_ROWS = 16


class RequestError(Exception):
    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


class ModelRunner:
    def __init__(self, loaded: LoadedModel, emit: Emit):
        self.loaded = loaded
        self.emit = emit
        self.capture = HiddenCapture(loaded.model, loaded.num_layers)
        self.kv = BatchCache()
        self.rows: list[Sequence] = []
        self.pending: list[Sequence] = []
        self.dtype_name = DTYPE_NAMES.get(loaded.dtype, "float32")
        self._new_cache = _cache_factory(loaded)

    # --- admission ------------------------------------------------------------

    @property
    def active(self) -> int:
        return len(self.rows) + len(self.pending)

    def admit(self, req: P.Generate) -> None:
        """Validate and queue a request; raises RequestError for bad input."""
        lm = self.loaded
        ids = self._prompt_ids(req)
        if not ids:
            raise RequestError(P.ErrorType.INVALID_REQUEST, "the prompt is empty")
        if len(ids) >= lm.max_context:
            raise RequestError(
                P.ErrorType.CONTEXT_LENGTH,
                f"the prompt has {len(ids)} tokens but {lm.model_id} has a context of {lm.max_context} "
                "tokens; shorten the messages or the prompt",
            )
        layers = list(req.layers)
        if req.all_layers:
            layers += [*range(lm.num_layers + 1), -1]
        slots: dict[int, list[int]] = {}
        try:
            for layer in layers:
                keys = slots.setdefault(slot_for(layer, lm.num_layers), [])
                if layer not in keys:
                    keys.append(layer)
        except ValueError as exc:
            raise RequestError(P.ErrorType.INVALID_REQUEST, str(exc)) from None
        generator = None
        if req.temperature > 0:
            generator = torch.Generator(device="cpu")
            if req.seed is not None:
                generator.manual_seed(int(req.seed))
            else:
                generator.seed()
        self.pending.append(Sequence(
            rid=req.rid,
            prompt_ids=ids,
            max_tokens=max(1, min(req.max_tokens, lm.max_context - len(ids))),
            temperature=float(req.temperature),
            top_p=float(req.top_p),
            generator=generator,
            slots=slots,
            detok=IncrementalDetokenizer(lm.tokenizer, ids[-4:]),
        ))

    def _prompt_ids(self, req: P.Generate) -> list[int]:
        tok = self.loaded.tokenizer
        if req.messages is not None:
            if not getattr(tok, "chat_template", None):
                raise RequestError(
                    P.ErrorType.INVALID_REQUEST,
                    f"{self.loaded.model_id} has no chat template; use /generate with a raw prompt",
                )
            try:
                text = tok.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # templates raise their own errors (e.g. role order)
                raise RequestError(P.ErrorType.INVALID_REQUEST, f"chat template rejected the messages: {exc}") from None
            return list(tok(text, add_special_tokens=False)["input_ids"])
        return list(tok(req.prompt or "", add_special_tokens=True)["input_ids"])

    def cancel(self, rid: str) -> bool:
        for seq in self.pending:
            if seq.rid == rid:
                self.pending.remove(seq)
                return True
        for seq in self.rows:
            if seq.rid == rid:
                seq.cancelled = True
                return True
        return False

    def fail_all(self, error_type: str, message: str) -> None:
        for seq in self.pending + self.rows:
            self.emit(P.Error(rid=seq.rid, type=error_type, message=message), [])
        self.pending.clear()
        self.rows.clear()
        self.kv = BatchCache()

    # --- the step ---------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        self._drop_cancelled()
        # Decode the running rows first so a newcomer's prefill never delays
        # the tokens of those already streaming by more than one step.
        if self.rows:
            self._decode()
        while self.pending:
            group = self._prefill_group()
            try:
                self._prefill(group)
            except Exception:
                # Put back whatever did not join, so fail_all answers it too.
                self.pending[:0] = [s for s in group if s not in self.rows]
                raise

    def _prefill_group(self) -> list[Sequence]:
        """Pending requests to prefill together: similar lengths, a bounded batch."""
        first = self.pending.pop(0)
        group = [first]
        for seq in list(self.pending):
            if len(group) >= MAX_PREFILL_ROWS:
                break
            # Padding costs compute: group prompts within 2x of each other.
            longest = max(len(first.prompt_ids), len(seq.prompt_ids))
            if 2 * min(len(first.prompt_ids), len(seq.prompt_ids)) >= longest:
                group.append(seq)
                self.pending.remove(seq)
        return group

    def _drop_cancelled(self) -> None:
        if any(s.cancelled for s in self.rows):
            self._keep([i for i, s in enumerate(self.rows) if not s.cancelled])

    def _keep(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        self.kv.keep_rows(keep)

    def _forward(self, input_ids: torch.Tensor, cache: Any, slots: set[int],
                 **kwargs: Any) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Last-position logits, and the hidden states captured for `slots`."""
        lm = self.loaded
        kwargs[lm.cache_kwarg] = cache
        if lm.accepts_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        self.capture.begin(slots)
        try:
            out = lm.model(input_ids=input_ids, use_cache=True, **kwargs)
        finally:
            captured = self.capture.end()
        return out.logits[:, -1, :], captured

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Run the prompts (left-padded into one batch) and join them to the batch."""
        lm = self.loaded
        length = max(len(s.prompt_ids) for s in seqs)
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (length - len(s.prompt_ids)) + s.prompt_ids for s in seqs],
                           dtype=torch.long, device=lm.device)
        mask = torch.tensor([[0] * (length - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in seqs],
                            dtype=torch.long, device=lm.device)
        slots = set().union(*(s.slots for s in seqs))
        cache = self._new_cache()
        try:
            if len(seqs) == 1:  # no padding: exactly the computation of a request alone
                logits, captured = self._forward(ids, cache, slots)
            else:
                positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
                logits, captured = self._forward(ids, cache, slots, attention_mask=mask, position_ids=positions)
                _zero_padding(cache, mask)
        except Exception as exc:  # e.g. out of memory: fail these requests, keep serving
            log.exception("prefill failed for %s", ", ".join(s.rid for s in seqs))
            for seq in seqs:
                self.emit(P.Error(rid=seq.rid, type=P.ErrorType.INTERNAL, message=f"prefill failed: {exc}"), [])
            return
        if slots:
            self._store_hidden(seqs, captured)
        tokens = choose_tokens(logits, [s.temperature for s in seqs], [s.top_p for s in seqs],
                               [s.generator for s in seqs])
        keep = [i for i, (s, t) in enumerate(zip(seqs, tokens)) if not self._advance(s, t)]
        if not keep:
            return
        if len(keep) != len(seqs):
            index = torch.tensor(keep, dtype=torch.long, device=lm.device)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
            mask = mask.index_select(0, index)
        self.rows.extend(seqs[i] for i in keep)
        self.kv.append_rows(cache, mask)

    def _decode(self) -> None:
        lm = self.loaded
        rows = self.rows
        input_ids = torch.tensor([[s.last_token] for s in rows], dtype=torch.long, device=lm.device)
        slots = set()
        for s in rows:
            slots.update(s.slots)
        mask = self.kv.next_mask()
        if self.kv.padded:
            positions = torch.tensor([[s.position] for s in rows], dtype=torch.long, device=lm.device)
            logits, captured = self._forward(input_ids, self.kv.cache, slots, attention_mask=mask,
                                             position_ids=positions)
        else:
            # Rows all aligned: positions follow from the cache length, no mask needed.
            logits, captured = self._forward(input_ids, self.kv.cache, slots)
        if slots:
            self._store_hidden(rows, captured)
        tokens = choose_tokens(logits, [s.temperature for s in rows], [s.top_p for s in rows],
                               [s.generator for s in rows])
        keep = [i for i, (s, t) in enumerate(zip(rows, tokens)) if not self._advance(s, t)]
        if len(keep) != len(rows):
            self._keep(keep)

    @staticmethod
    def _store_hidden(rows: list[Sequence], captured: dict[int, torch.Tensor]) -> None:
        # Overwrite: only the state behind the latest token is ever returned.
        for i, seq in enumerate(rows):
            for slot in seq.slots:
                seq.hidden[slot] = captured[slot][i]

    def _advance(self, seq: Sequence, token: int) -> bool:
        """Account for `token`; emit its text; True when `seq` has finished."""
        if token in self.loaded.eos_ids:
            self._finish(seq, "end_turn")
            return True
        seq.generated += 1
        seq.last_token = token
        text = seq.detok.push(token)
        if text:
            self.emit(P.Token(rid=seq.rid, text=text, index=seq.generated - 1, t_emit=time.time()), [])
        if seq.generated >= seq.max_tokens:
            self._finish(seq, "max_tokens")
            return True
        return False

    def _finish(self, seq: Sequence, stop_reason: str) -> None:
        rest = seq.detok.flush()
        if rest:
            self.emit(P.Token(rid=seq.rid, text=rest, index=seq.generated - 1, t_emit=time.time()), [])
        specs, buffers = [], []
        for slot, keys in seq.slots.items():
            vector = seq.hidden.get(slot)
            if vector is None:
                continue
            buffers.append(_raw_bytes(vector))
            layer = -1 if slot == self.loaded.num_layers + 1 else slot
            specs.append({"layer": layer, "keys": keys, "shape": [1, int(vector.shape[-1])], "dtype": self.dtype_name})
        self.emit(P.Final(
            rid=seq.rid,
            stop_reason=stop_reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=seq.generated,
            generate_s=time.perf_counter() - seq.started,
            model=self.loaded.model_id,
            dtype=self.dtype_name,
            arrays=specs,
        ), buffers)


def _zero_padding(cache: Any, mask: torch.Tensor) -> None:
    """Zero the K/V at padding positions: a fully masked pad query can yield NaN,
    and 0 * NaN would leak into every later step of that row."""
    keep = mask[:, None, :, None].bool()
    for layer in cache.layers:
        layer.keys = torch.where(keep, layer.keys, 0)
        layer.values = torch.where(keep, layer.values, 0)


def _raw_bytes(vector: torch.Tensor) -> memoryview:
    """The vector's bytes, little-endian, as they are in memory: no float lists."""
    t = vector.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)  # numpy has no bfloat16; the bits travel as they are
    return memoryview(np.ascontiguousarray(t.numpy()).data)


def _cache_factory(loaded: LoadedModel) -> Callable[[], Any]:
    from transformers import DynamicCache

    config = loaded.model.config
    try:
        DynamicCache(config=config)
        return lambda: DynamicCache(config=config)
    except TypeError:
        return DynamicCache
