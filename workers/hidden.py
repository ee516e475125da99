"""Forward hooks on the residual stream, attached only while some row needs them.

Slots: 0 is the embedding output, 1..N the decoder layers' outputs, N+1 the
final hidden state (the LM head's input, after the final norm). A request's
layer index maps onto that list Python-style: -1 is the final state, -2
decoder layer N, and so on.

Each forward pass gets a `ForwardPlan`: per slot, which rows of the batch
to copy (only the last position, or every position for a prefill whose rows
asked for the prompt) and, from `workers.steering`, which rows to change
first. Rows that asked for nothing are never copied, and a batch in which
nobody asks runs with no hook attached at all.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

log = logging.getLogger("loom.worker")


class LayerIndexError(ValueError):
    pass


def slot_for(layer: int, num_layers: int, what: str = "hidden_state_layers") -> int:
    """Map a contract layer index to a slot (see module docstring); `what` names the field in errors."""
    total = num_layers + 2
    if -total <= layer < 0:
        return total + layer
    if 0 <= layer <= num_layers:
        return layer
    raise LayerIndexError(
        f"{what}: layer {layer} is out of range for a model with {num_layers} layers "
        f"(use 0..{num_layers}, or -1 for the final state, -{total} .. -1 counting from the end)"
    )


def layer_label(slot: int, num_layers: int) -> int:
    """The index a slot is reported under: -1 for the final state, else the slot."""
    return -1 if slot == num_layers + 1 else slot


def _decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    # Llama/Mistral/Qwen: model.model.layers; GPT-2: transformer.h; NeoX: gpt_neox.layers.
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise LayerIndexError("cannot find the decoder layers of this model to capture hidden states")


_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm")


def _final_norm(model: nn.Module) -> nn.Module | None:
    """The module whose output the LM head reads, checked by running one token.

    Llama-style models keep it at `model.model.norm`; others use other names.
    A candidate counts only if its output is exactly what enters the LM head,
    so a model that does something else between them (a scale, a projection)
    gets no final norm, and the logit lens says so instead of lying.
    """
    owners = [model, getattr(model, "base_model", None), getattr(model, "model", None),
              getattr(model, "transformer", None)]
    candidates = []
    for owner in owners:
        for name in _NORM_NAMES:
            module = getattr(owner, name, None) if owner is not None else None
            if isinstance(module, nn.Module) and module not in candidates:
                candidates.append(module)
    head = model.get_output_embeddings()
    if not candidates or head is None:
        return None
    seen: dict[str, torch.Tensor] = {}
    handles = [head.register_forward_pre_hook(lambda m, args: seen.__setitem__("head", args[0][:, -1].clone()))]
    for i, module in enumerate(candidates):
        handles.append(module.register_forward_hook(
            lambda m, args, out, i=i: seen.__setitem__(i, (out[0] if isinstance(out, tuple) else out)[:, -1].clone())))
    try:
        device = next(model.parameters()).device
        with torch.inference_mode():
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)
    except Exception:  # a model that cannot run one token has bigger problems; no lens here
        log.warning("could not check the final norm of this model", exc_info=True)
        return None
    finally:
        for handle in handles:
            handle.remove()
    for i, module in enumerate(candidates):
        if i in seen and "head" in seen and torch.equal(seen[i], seen["head"]):
            return module
    return None


@dataclass
class Take:
    """Which rows of a slot to copy: `index` (None: every row), every position or the last."""

    index: torch.Tensor | None
    full: bool


class Steer(Protocol):
    def apply(self, hidden: torch.Tensor) -> torch.Tensor: ...


@dataclass
class ForwardPlan:
    take: dict[int, Take] = field(default_factory=dict)
    steer: dict[int, Steer] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.take or self.steer)


NO_PLAN = ForwardPlan()  # nothing captured or steered (never mutated: plans are built whole)


class LayerHooks:
    def __init__(self, model: nn.Module, num_layers: int):
        self.num_layers = num_layers
        self.model = model
        self.layers = _decoder_layers(model, num_layers)
        self.norm = _final_norm(model)
        if self.norm is None:
            log.warning("no final norm found whose output is the LM head's input: the logit lens is off, and "
                        "the final state (-1) is available at the last position only")
        self.plan = NO_PLAN
        self.captured: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    @property
    def final_slot(self) -> int:
        return self.num_layers + 1

    def _attach(self) -> None:
        model = self.model
        self._handles.append(model.get_input_embeddings().register_forward_hook(self._output_hook(0)))
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._output_hook(i + 1)))
        if self.norm is not None:
            # Every position's final state, not only those the LM head keeps.
            self._handles.append(self.norm.register_forward_hook(self._output_hook(self.final_slot)))
        else:
            self._handles.append(model.get_output_embeddings().register_forward_pre_hook(
                self._input_hook(self.final_slot)))

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _run(self, slot: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Steer, then capture (so captured states are the steered ones); the new tensor if steered."""
        steer = self.plan.steer.get(slot)
        if steer is not None:
            hidden = steer.apply(hidden)
        take = self.plan.take.get(slot)
        if take is not None:
            src = hidden if take.full else hidden[:, -1, :]
            self.captured[slot] = src.detach().clone() if take.index is None else src.index_select(0, take.index)
        return hidden if steer is not None else None

    def _output_hook(self, slot: int):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if slot not in self.plan.take and slot not in self.plan.steer:
                return None
            is_tuple = isinstance(output, (tuple, list))
            changed = self._run(slot, output[0] if is_tuple else output)
            if changed is None:
                return None
            return (changed, *output[1:]) if is_tuple else changed
        return hook

    def _input_hook(self, slot: int):
        def hook(module: nn.Module, args: Any) -> Any:
            if slot not in self.plan.take and slot not in self.plan.steer:
                return None
            changed = self._run(slot, args[0])
            return None if changed is None else (changed, *args[1:])
        return hook

    def begin(self, plan: ForwardPlan) -> None:
        # Hooks stay attached only while some running request needs them,
        # so a batch that asks for nothing pays nothing per layer.
        if plan and not self._handles:
            self._attach()
        elif not plan and self._handles:
            self._detach()
        self.plan = plan
        self.captured = {}

    def end(self) -> dict[int, torch.Tensor]:
        captured, self.captured, self.plan = self.captured, {}, NO_PLAN
        return captured
