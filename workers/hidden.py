"""Capturing hidden states with forward hooks, only where they were asked for.

Slots: 0 is the embedding output, 1..N the decoder layers' outputs, N+1 the
final hidden state (the LM head's input, after the final norm). A request's
layer index maps onto that list Python-style: -1 is the final state, -2
decoder layer N, and so on. Hooks copy only the last position of the rows in
the batch, and only for slots some running request asked for, so a long
stream keeps one [hidden] vector per asked layer, not every layer at every step.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class LayerIndexError(ValueError):
    pass


def slot_for(layer: int, num_layers: int) -> int:
    """Map a contract layer index to a capture slot (see module docstring)."""
    total = num_layers + 2
    if -total <= layer < 0:
        return total + layer
    if 0 <= layer <= num_layers:
        return layer
    raise LayerIndexError(
        f"hidden_state_layers: layer {layer} is out of range for a model with {num_layers} layers "
        f"(use 0..{num_layers}, or -1 for the final state, -{total} .. -1 counting from the end)"
    )


def _decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    # Llama/Mistral/Qwen: model.model.layers; GPT-2: transformer.h; NeoX: gpt_neox.layers.
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            best = module
            break
    if best is None:
        raise LayerIndexError("cannot find the decoder layers of this model to capture hidden states")
    return best


class HiddenCapture:
    def __init__(self, model: nn.Module, num_layers: int):
        self.num_layers = num_layers
        self.wanted: set[int] = set()
        self.captured: dict[int, torch.Tensor] = {}
        self.model = model
        self.layers = _decoder_layers(model, num_layers)
        self._handles: list[Any] = []

    def _attach(self) -> None:
        model = self.model
        self._handles.append(model.get_input_embeddings().register_forward_hook(self._output_hook(0)))
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._output_hook(i + 1)))
        # The final state is whatever enters the LM head: correct for any
        # architecture's final norm, and already sliced to the kept positions.
        self._handles.append(model.get_output_embeddings().register_forward_pre_hook(
            self._input_hook(self.num_layers + 1)))

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _output_hook(self, slot: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if slot in self.wanted:
                tensor = output[0] if isinstance(output, (tuple, list)) else output
                self.captured[slot] = tensor[:, -1, :].detach().clone()
        return hook

    def _input_hook(self, slot: int):
        def hook(module: nn.Module, args: Any) -> None:
            if slot in self.wanted:
                self.captured[slot] = args[0][:, -1, :].detach().clone()
        return hook

    def begin(self, slots: set[int]) -> None:
        # Hooks stay attached only while some running request wants states,
        # so a batch that asks for none pays nothing per layer.
        if slots and not self._handles:
            self._attach()
        elif not slots and self._handles:
            self._detach()
        self.wanted = slots
        self.captured = {}

    def end(self) -> dict[int, torch.Tensor]:
        captured, self.captured, self.wanted = self.captured, {}, set()
        return captured
