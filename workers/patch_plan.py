"""Checking a /patch request against the loaded model, before any work starts.

Everything a request can get wrong is found here, on the worker (which alone
knows the tokenizer and the layer count), and answered as an
invalid_request_error naming the field, so the API turns it into a 422.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from loom import protocol as P
from workers.hidden import LayerIndexError, _decoder_layers
from workers.model_store import LoadedModel
from workers.runner import RequestError

COMPONENTS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
# Components that live inside a block rather than on its boundary.
_SUBMODULE = {"attn_out": "self_attn", "mlp_out": "mlp"}
MAX_RUNS = P.MAX_PATCH_RUNS
# The whole answer travels in one message header (at most 1 MiB): generated
# text over all patched runs is bounded in tokens.
MAX_TEXT_TOKENS = 16384
# The clean activations are held for the length of the request.
MAX_CLEAN_CACHE_BYTES = 2 << 30


@dataclass
class PatchPlan:
    rid: str
    clean_ids: list[int]
    corrupted_ids: list[int]
    runs: list[tuple[int, str]]  # (0-based decoder layer, component), in answer order
    positions: list[int]  # sorted, 0-based
    answer_id: int | None  # None: the clean run's top token
    wrong_id: int | None  # None: the corrupted run's top token
    max_tokens: int


def _invalid(message: str) -> RequestError:
    return RequestError(P.ErrorType.INVALID_REQUEST, message)


def decoder_blocks(lm: LoadedModel) -> nn.ModuleList:
    try:
        return _decoder_layers(lm.model, lm.num_layers)
    except LayerIndexError:
        raise _invalid(f"{lm.model_id} ({type(lm.model).__name__}): Loom cannot reach this model's decoder "
                       "layers, so it cannot patch them (it patches Llama-style decoder blocks)") from None


def plan_patch(lm: LoadedModel, req: P.Patch) -> PatchPlan:
    """The request as token ids and 0-based indices; raises RequestError naming the field."""
    blocks = decoder_blocks(lm)
    clean, corrupted = _prompt(lm, req.clean, "clean"), _prompt(lm, req.corrupted, "corrupted")
    if len(clean) != len(corrupted):
        raise _invalid(f"clean and corrupted must tokenize to the same length: clean has {len(clean)} tokens, "
                       f"corrupted has {len(corrupted)}")
    layers = _layers(req.layers, lm.num_layers)
    components = _components(req.components, blocks, lm)
    runs = [(layer, c) for layer in layers for c in components]
    if len(runs) > MAX_RUNS:
        raise _invalid(f"layers × components: {len(layers)} layers × {len(components)} components is {len(runs)} "
                       f"patched runs; at most {MAX_RUNS} per request")
    positions = _positions(req, len(clean))
    if not 0 <= req.max_tokens:
        raise _invalid("max_tokens: must be 0 or more")
    if len(runs) * req.max_tokens > MAX_TEXT_TOKENS:
        raise _invalid(f"max_tokens: {req.max_tokens} tokens of text for each of {len(runs)} patched runs is more "
                       f"than {MAX_TEXT_TOKENS} in all; ask for fewer tokens or fewer runs")
    if len(clean) + req.max_tokens > lm.max_context:
        raise RequestError(P.ErrorType.CONTEXT_LENGTH,
                           f"the prompts have {len(clean)} tokens and max_tokens is {req.max_tokens}, but "
                           f"{lm.model_id} has a context of {lm.max_context} tokens")
    held = len(runs) * len(positions) * lm.hidden_size * _itemsize(lm)
    if held > MAX_CLEAN_CACHE_BYTES:
        raise _invalid(f"positions: the clean activations for {len(runs)} runs × {len(positions)} positions would "
                       f"take {held / 2**30:.1f} GiB (at most {MAX_CLEAN_CACHE_BYTES / 2**30:.0f}); patch fewer "
                       "positions, layers or components")
    return PatchPlan(rid=req.rid, clean_ids=clean, corrupted_ids=corrupted, runs=runs, positions=positions,
                     answer_id=_one_token(lm, req.answer, "answer"),
                     wrong_id=_one_token(lm, req.wrong_answer, "wrong_answer"), max_tokens=req.max_tokens)


def _prompt(lm: LoadedModel, text: str, name: str) -> list[int]:
    if not text:
        raise _invalid(f"{name}: the prompt is empty")
    # As /generate tokenizes a raw prompt: with the model's special tokens (BOS).
    return list(lm.tokenizer(text, add_special_tokens=True)["input_ids"])


def _layers(layers: list[int] | None, n: int) -> list[int]:
    if layers is None:
        return list(range(n))
    if not layers:
        raise _invalid("layers: give at least one layer, or leave layers out for all of them")
    out = []
    for layer in layers:
        if not (1 <= layer <= n or -n <= layer <= -1):
            raise _invalid(f"layers: layer {layer} is out of range for a model with {n} decoder layers "
                           f"(use 1..{n}, or -{n}..-1 counting from the end)")
        index = layer - 1 if layer > 0 else n + layer
        if index not in out:
            out.append(index)
    return out


def _components(components: list[str], blocks: nn.ModuleList, lm: LoadedModel) -> list[str]:
    if not components:
        raise _invalid(f"components: give at least one of {', '.join(COMPONENTS)}")
    out = []
    for c in components:
        if c not in COMPONENTS:
            raise _invalid(f"components: unknown component {c!r} (use {', '.join(COMPONENTS)})")
        child = _SUBMODULE.get(c)
        if child is not None and not all(isinstance(getattr(b, child, None), nn.Module) for b in blocks):
            raise _invalid(f"components: {c} needs a `{child}` block inside each decoder layer, which "
                           f"{lm.model_id} ({type(blocks[0]).__name__}) does not have; Loom reaches Llama-style "
                           "blocks (resid_pre and resid_post work on any decoder layer)")
        if c not in out:
            out.append(c)
    return out


def _positions(req: P.Patch, length: int) -> list[int]:
    if req.positions == "all":
        return list(range(length))
    if req.positions == "last":
        return [length - 1]
    if req.positions != "list":
        raise _invalid(f'positions: must be "all", "last" or a list of positions, not {req.positions!r}')
    if not req.position_list:
        raise _invalid('positions: give at least one position, or "all" or "last"')
    out = set()
    for p in req.position_list:
        if not -length <= p < length:
            raise _invalid(f"positions: position {p} is out of range for prompts of {length} tokens "
                           f"(use 0..{length - 1}, or -{length}..-1 counting from the end)")
        out.add(p % length)
    return sorted(out)


def _one_token(lm: LoadedModel, text: str | None, name: str) -> int | None:
    if text is None:
        return None
    ids = list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) != 1:
        raise _invalid(f"{name}: {text!r} is {len(ids)} tokens ({ids}) for {lm.model_id}; it must be exactly one "
                       "token (mind the leading space)")
    return ids[0]


def _itemsize(lm: LoadedModel) -> int:
    return next(lm.model.parameters()).element_size()


def describe_token(lm: LoadedModel, token_id: int) -> dict[str, Any]:
    return {"token": lm.tokenizer.decode([token_id]), "token_id": token_id}
