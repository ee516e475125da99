"""Continuous batching for one loaded model.

Each call to `step()` runs one decode step for every running row, then
prefills the requests that arrived since (together, left-padded, when
several came at once) and merges them into the batch's KV cache. Finished and
cancelled rows leave before the next step.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import torch

from loom import protocol as P
from workers.admission import RequestError, build_sequence
from workers.hidden import NO_PLAN, ForwardPlan, LayerHooks
from workers.kv_cache import BatchCache
from workers.logprobs import TokenTexts
from workers.model_store import DTYPE_NAMES, LoadedModel
from workers.outputs import Captured, Outputs, RowOut
from workers.sampling import choose_tokens
from workers.prefill_threads import PREFILL
from workers.sequence import Sequence
from workers.staging import to_device

__all__ = ["ModelRunner", "RequestError"]

log = logging.getLogger("loom.worker")

Emit = Callable[[P.Message, list[Any]], None]
EmitTexts = Callable[[list[str], list[str], list[int]], None]  # rids, texts, indexes

# Most prompts prefilled in one forward pass: new arrivals join together, but
# a burst does not become one huge allocation.
MAX_PREFILL_ROWS = 16


class ModelRunner:
    def __init__(self, loaded: LoadedModel, emit: Emit, flush: Callable[[], None] = lambda: None,
                 emit_texts: EmitTexts | None = None):
        self.loaded = loaded
        self.emit = emit
        # Tokens with only their text (most of them): the engine's step batch takes a step's
        # fields in one call, without a Token object per token.
        self.emit_texts = emit_texts or self._emit_each
        self.flush = flush  # sends what emit holds back (the engine batches a step's tokens)
        self.hooks = LayerHooks(loaded.model, loaded.num_layers)
        self.kv = BatchCache()
        self.rows: list[Sequence] = []
        self._params: _RowParams | None = None  # of `rows`; None after they change
        self.pending: list[Sequence] = []
        self.dtype_name = DTYPE_NAMES.get(loaded.dtype, "float32")
        self.outputs = Outputs(self.hooks, TokenTexts(loaded.tokenizer), self.dtype_name, loaded.device,
                               loaded.hidden_size)
        self._new_cache = _cache_factory(loaded)

    # --- admission ------------------------------------------------------------

    @property
    def active(self) -> int:
        return len(self.rows) + len(self.pending)

    def admit(self, req: P.Generate) -> None:
        """Validate and queue a request; raises RequestError for bad input."""
        self.pending.append(build_sequence(self.loaded, self.hooks, req))

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
        self._params = None
        self.kv = BatchCache()

    # --- the step ---------------------------------------------------------------

    def step(self) -> None:
        # The engine's thread runs in inference mode already; entering it costs ~10 us a step.
        if torch.is_inference_mode_enabled():
            self._step()
        else:
            with torch.inference_mode():
                self._step()

    def _step(self) -> None:
        self._drop_cancelled()
        # Decode the running rows first so a newcomer's prefill never delays
        # the tokens of those already streaming by more than one step.
        if self.rows:
            self._decode()
        while self.pending:
            group = self._prefill_group()
            try:
                with PREFILL.around(idle=not self.rows, tokens=sum(len(s.prompt_ids) for s in group)):
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

    def _embedded(self, seq: Sequence, spec: dict[str, Any], buffer: Any) -> None:
        """An embedding request is answered right after its prefill."""
        self.emit(P.Final(rid=seq.rid, stop_reason="embedding", prompt_tokens=len(seq.prompt_ids),
                          completion_tokens=0, generate_s=time.perf_counter() - seq.started,
                          model=self.loaded.model_id, dtype=self.dtype_name, arrays=[spec]), [buffer])

    def _drop_cancelled(self) -> None:
        if any(s.cancelled for s in self.rows):
            self._keep([i for i, s in enumerate(self.rows) if not s.cancelled])

    def _keep(self, keep: list[int]) -> None:
        # The cache fills a leaver's place with a later row: the rows follow its order.
        order = self.kv.keep_rows(keep)
        self.rows = [self.rows[i] for i in order]
        self._params = None

    def _forward(self, input_ids: torch.Tensor, cache: Any, plan: ForwardPlan,
                 **kwargs: Any) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Last-position logits, and the hidden states `plan` captures."""
        lm = self.loaded
        kwargs[lm.cache_kwarg] = cache
        if lm.accepts_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        self.hooks.begin(plan)
        try:
            out = lm.model(input_ids=input_ids, use_cache=True, **kwargs)
        finally:
            captured = self.hooks.end()
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
        plan, rows_by_slot = self.outputs.plan(seqs, prefill=True)
        cache = self._new_cache()
        try:
            if len(seqs) == 1:  # no padding: exactly the computation of a request alone
                logits, captured = self._forward(ids, cache, plan)
            else:
                positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
                logits, captured = self._forward(ids, cache, plan, attention_mask=mask, position_ids=positions)
                _zero_padding(cache, mask)
        except Exception as exc:  # e.g. out of memory: fail these requests, keep serving
            log.exception("prefill failed for %s", ", ".join(s.rid for s in seqs))
            for seq in seqs:
                self.emit(P.Error(rid=seq.rid, type=P.ErrorType.INTERNAL, message=f"prefill failed: {exc}"), [])
            return
        got = Captured(captured, rows_by_slot, plan)
        done = set()
        for i, seq in enumerate(seqs):
            if seq.pooling is not None:
                self._embedded(seq, *self.outputs.embedding(seq, got, i))
                done.add(i)
            elif seq.wants_prompt_block and seq.slots:
                # Right after the prompt is processed, before its first token.
                specs, buffers = self.outputs.prompt_states(seq, got, i)
                self.emit(P.States(rid=seq.rid, arrays=specs), buffers)
        tokens = choose_tokens(logits, [s.temperature for s in seqs], [s.top_p for s in seqs],
                               [s.generator for s in seqs])
        outs = self._outputs(seqs, logits, tokens, got, prefill=True, skip=done)
        keep = [i for i, (s, t) in enumerate(zip(seqs, tokens))
                if i not in done and not self._advance(s, t, outs.get(i))]
        self.flush()  # the first tokens leave now, not after the cache merge below
        # ZeroMQ's I/O thread was just woken to write them: on a busy machine it may be queued behind
        # this thread, which would go straight on to the merge and the next step. Yield the core
        # once, so the first token is on the wire before more work starts.
        os.sched_yield()
        if not keep:
            return
        if len(keep) != len(seqs):
            index = torch.tensor(keep, dtype=torch.long, device=lm.device)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
            mask = mask.index_select(0, index)
        self.rows.extend(seqs[i] for i in keep)
        self._params = None
        self.kv.append_rows(cache, mask, room=len(self.pending))  # the waiting join next: room for them too

    def _decode(self) -> None:
        lm = self.loaded
        rows = self.rows
        input_ids = to_device([s.last_token for s in rows], torch.long, lm.device)[:, None]  # no wait on a GPU
        params = self._params
        if params is None:
            params = self._params = _RowParams(rows)
        plain = params.plain
        plan, rows_by_slot = (NO_PLAN, {}) if plain else self.outputs.plan(rows, prefill=False)
        mask = self.kv.next_mask()
        if mask is not None:
            positions = to_device([s.position for s in rows], torch.long, lm.device)[:, None]
            logits, captured = self._forward(input_ids, self.kv.cache, plan, attention_mask=mask,
                                             position_ids=positions)
        else:
            # Rows all aligned: positions follow from the cache length, no mask needed.
            logits, captured = self._forward(input_ids, self.kv.cache, plan)
        tokens = choose_tokens(logits, params.temperatures, params.top_ps, params.generators)
        if plain:
            keep = self._advance_plain(rows, tokens)
        else:
            outs = self._outputs(rows, logits, tokens, Captured(captured, rows_by_slot, plan), prefill=False)
            advance = self._advance
            keep = [i for i, (s, t) in enumerate(zip(rows, tokens)) if not advance(s, t, outs.get(i))]
        if len(keep) != len(rows):
            self._keep(keep)

    def _outputs(self, seqs: list[Sequence], logits: torch.Tensor, tokens: list[int], got: Captured,
                 prefill: bool, skip: set[int] = frozenset()) -> dict[int, RowOut]:
        rows = [i for i, s in enumerate(seqs) if i not in skip
                and (s.slots or s.lens_slots or s.top_logprobs >= 0)]
        return self.outputs.step(seqs, rows, logits, tokens, got, prefill) if rows else {}

    def _advance(self, seq: Sequence, token: int, out: RowOut | None) -> bool:
        """Account for `token`; emit it; True when `seq` has finished."""
        if token in self.loaded.eos_ids:
            if out is not None and out.specs:
                # The state that chose the end of turn is a position the model ran.
                self.emit(P.States(rid=seq.rid, arrays=out.specs), out.buffers)
            self._finish(seq, "end_turn")
            return True
        self._emit_token(seq, seq.accept(token), out)
        if seq.generated >= seq.max_tokens:
            self._finish(seq, "max_tokens")
            return True
        return False

    def _advance_plain(self, rows: list[Sequence], tokens: list[int]) -> list[int]:
        """_advance for a step in which no row asks for extras: the indexes of the rows that go on.

        Per row it only counts the token and collects its text; the texts go to the step
        batch in one call, before the Finals of the rows that ended, which must follow them.
        """
        eos = self.loaded.eos_ids
        keep, ended = [], []
        rids, texts, indexes = [], [], []
        for i, (seq, token) in enumerate(zip(rows, tokens)):
            if token in eos:
                ended.append((seq, "end_turn"))
                continue
            text = seq.accept(token)
            if text:
                rids.append(seq.rid)
                texts.append(text)
                indexes.append(seq.generated - 1)
            if seq.generated >= seq.max_tokens:
                ended.append((seq, "max_tokens"))
            else:
                keep.append(i)
        self.emit_texts(rids, texts, indexes)
        for seq, stop_reason in ended:
            self._finish(seq, stop_reason)
        return keep

    def _emit_each(self, rids: list[str], texts: list[str], indexes: list[int]) -> None:
        now = time.time()
        for rid, text, index in zip(rids, texts, indexes):
            self.emit(P.Token(rid=rid, text=text, index=index, t_emit=now), [])

    def _emit_token(self, seq: Sequence, text: str, out: RowOut | None) -> None:
        """The one place a generated token leaves the worker, with what its request asked for.

        A token whose text the detokenizer holds back (part of a character)
        still sends its states and lens now; its logprobs wait for the message
        that carries its text, so each message's logprobs match its text.
        """
        if out is None:
            if text:
                self.emit_texts([seq.rid], [text], [seq.generated - 1])
            return
        if out.logprob is not None:
            seq.pending_logprobs.append(out.logprob)
        logprobs = None
        if text and seq.pending_logprobs:
            logprobs, seq.pending_logprobs = seq.pending_logprobs, []
        if text or out.specs or out.lens:
            self.emit(P.Token(rid=seq.rid, text=text, index=seq.generated - 1, t_emit=time.time(),
                              arrays=out.specs, logprobs=logprobs, lens=out.lens), out.buffers)

    def _finish(self, seq: Sequence, stop_reason: str) -> None:
        rest = seq.detok.flush()
        if rest or seq.pending_logprobs:
            self.emit(P.Token(rid=seq.rid, text=rest, index=seq.generated - 1, t_emit=time.time(),
                              logprobs=seq.pending_logprobs or None), [])
            seq.pending_logprobs = []
        specs, buffers = [], []
        for slot in seq.slots:
            vector = seq.hidden.get(slot)
            if vector is None:
                continue
            spec, buf = self.outputs.spec(seq, slot, vector[None], None)
            specs.append(spec)
            buffers.append(buf)
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


class _RowParams:
    """What a decode step reads of every row, gathered once while the rows stay the same."""

    __slots__ = ("temperatures", "top_ps", "generators", "plain")

    def __init__(self, rows: list[Sequence]) -> None:
        self.temperatures = [s.temperature for s in rows]
        self.top_ps = [s.top_p for s in rows]
        self.generators = [s.generator for s in rows]
        # Most steps no row asks for states, lens, logprobs or steering: no plan, no extras to gather.
        self.plain = not any(s.slots or s.lens_slots or s.steering or s.top_logprobs >= 0 for s in rows)


def _zero_padding(cache: Any, mask: torch.Tensor) -> None:
    """Zero the K/V at padding positions: a fully masked pad query can yield NaN,
    and 0 * NaN would leak into every later step of that row."""
    keep = mask[:, None, :, None].bool()
    for layer in cache.layers:
        layer.keys = torch.where(keep, layer.keys, 0)
        layer.values = torch.where(keep, layer.values, 0)


def _cache_factory(loaded: LoadedModel) -> Callable[[], Any]:
    from transformers import DynamicCache

    config = loaded.model.config
    try:
        DynamicCache(config=config)
        return lambda: DynamicCache(config=config)
    except TypeError:
        return DynamicCache
