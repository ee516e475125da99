"""A Generate message checked and turned into a Sequence, before any work starts.

Everything a request can get wrong is found here, so a bad request is
answered at once (invalid_request_error, HTTP 422 naming the field) and never
reaches, or disturbs, the running batch.
"""
from __future__ import annotations

import random

from loom import protocol as P
from workers.detokenizer import new_detokenizer
from workers.hidden import LayerHooks, LayerIndexError, slot_for
from workers.model_store import LoadedModel
from workers.sequence import Sequence
from workers.steering import parse as parse_steering

POSITIONS = ("last", "generated", "prompt", "all")
POOLINGS = ("last_token", "mean", "first_token")
MAX_TOP = 20  # top_logprobs and logit_lens.top_k


class RequestError(Exception):
    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


def _invalid(message: str) -> RequestError:
    return RequestError(P.ErrorType.INVALID_REQUEST, message)


def build_sequence(lm: LoadedModel, hooks: LayerHooks, req: P.Generate) -> Sequence:
    """Validate `req` and make its Sequence; raises RequestError for bad input."""
    ids = prompt_ids(lm, req)
    if not ids:
        raise _invalid("the prompt is empty")
    if len(ids) >= lm.max_context:
        raise RequestError(
            P.ErrorType.CONTEXT_LENGTH,
            f"the prompt has {len(ids)} tokens but {lm.model_id} has a context of {lm.max_context} "
            "tokens; shorten the messages or the prompt",
        )
    if req.positions not in POSITIONS:
        raise _invalid(f"hidden_state_positions: {req.positions!r} is not one of {', '.join(POSITIONS)}")
    if not 0 <= req.top_logprobs <= MAX_TOP:
        raise _invalid(f"top_logprobs: {req.top_logprobs} is outside 0..{MAX_TOP}")
    layers = list(req.layers)
    if req.all_layers:
        layers += [*range(lm.num_layers + 1), -1]
    try:
        slots = _slots(layers, lm.num_layers, "layer" if req.pooling is not None else "hidden_state_layers")
        lens_slots = _slots(list(req.lens_layers), lm.num_layers, "logit_lens.layers")
    except LayerIndexError as exc:
        raise _invalid(str(exc)) from None
    if lens_slots:
        if not 1 <= req.lens_top_k <= MAX_TOP:
            raise _invalid(f"logit_lens.top_k: {req.lens_top_k} is outside 1..{MAX_TOP}")
        if hooks.norm is None and set(lens_slots) != {hooks.final_slot}:
            raise _invalid(f"logit_lens: {lm.model_id}'s final norm cannot be found (no module's output is exactly "
                           "the LM head's input), so only layer -1 can be read through the LM head")
    if req.pooling is not None:
        if req.pooling not in POOLINGS:
            raise _invalid(f"pooling: {req.pooling!r} is not one of {', '.join(POOLINGS)}")
        if len(slots) != 1:
            raise _invalid("layer: an embedding is pooled from exactly one layer")
    wants_block = req.pooling is not None or req.positions in ("prompt", "all")
    if wants_block and hooks.norm is None and hooks.final_slot in slots:
        raise _invalid(f"hidden_state_positions: {lm.model_id}'s final norm cannot be found, so the final state "
                       "(-1) is available at the last position only; ask for another layer")
    try:
        steering = parse_steering(list(req.steering), lm.num_layers, lm.hidden_size, lm.model_id, lm.device)
    except ValueError as exc:
        raise _invalid(str(exc)) from None
    # A Python generator per sampled row: a draw costs ~0.2 us, a torch.Generator's ~2 us
    # (workers/sampling.py). Unseeded, it seeds itself from the OS.
    generator = None
    if req.temperature > 0:
        generator = random.Random(int(req.seed)) if req.seed is not None else random.Random()
    return Sequence(
        rid=req.rid,
        prompt_ids=ids,
        max_tokens=max(1, min(req.max_tokens, lm.max_context - len(ids))),
        temperature=float(req.temperature),
        top_p=float(req.top_p),
        generator=generator,
        slots=slots,
        detok=new_detokenizer(lm.tokenizer, lm.byte_table, ids[-4:]),
        positions=req.positions,
        lens_slots=lens_slots,
        lens_top_k=req.lens_top_k if lens_slots else 0,
        top_logprobs=req.top_logprobs if (req.logprobs or req.top_logprobs) else -1,
        pooling=req.pooling,
        normalize=bool(req.normalize),
        steering=steering,
    )


def _slots(layers: list[int], num_layers: int, what: str) -> dict[int, list[int]]:
    """slot -> the indices asked that name it (-1 and N+1 are one slot, reported under both)."""
    slots: dict[int, list[int]] = {}
    for layer in layers:
        keys = slots.setdefault(slot_for(layer, num_layers, what), [])
        if layer not in keys:
            keys.append(layer)
    return slots


def prompt_ids(lm: LoadedModel, req: P.Generate) -> list[int]:
    tok = lm.tokenizer
    if req.messages is not None:
        if not getattr(tok, "chat_template", None):
            raise _invalid(f"{lm.model_id} has no chat template; use /generate with a raw prompt")
        try:
            text = tok.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # templates raise their own errors (e.g. role order)
            raise _invalid(f"chat template rejected the messages: {exc}") from None
        return list(tok(text, add_special_tokens=False)["input_ids"])
    return list(tok(req.prompt or "", add_special_tokens=True)["input_ids"])
