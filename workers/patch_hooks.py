"""Where each patching component lives on a decoder block, and hooks that read or replace it.

On a Llama-style block (transformers' LlamaDecoderLayer and its kin):

    resid_pre  = the block's input hidden_states      (forward pre-hook on the block)
    attn_out   = what self_attn adds to the residual   (forward hook on block.self_attn, output[0])
    mlp_out    = what mlp adds to the residual         (forward hook on block.mlp)
    resid_post = the block's output                    (forward hook on the block)

transformers 5.x passes hidden_states to a decoder layer positionally, older
code and other models may pass it by keyword: the pre-hook takes both. Blocks
and attention modules may return a tensor or a tuple whose first element is
the hidden states: the hooks take both.

An edit is a function of the activation tensor [rows, positions, hidden]
that returns a replacement, or None to leave it (a reader).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

Edit = Callable[[torch.Tensor], "torch.Tensor | None"]


def site(blocks: nn.ModuleList, layer: int, component: str) -> tuple[nn.Module, bool]:
    """The module to hook for (0-based layer, component), and whether it is a pre-hook."""
    block = blocks[layer]
    if component == "resid_pre":
        return block, True
    if component == "resid_post":
        return block, False
    if component == "attn_out":
        return block.self_attn, False
    if component == "mlp_out":
        return block.mlp, False
    raise ValueError(f"unknown component {component!r}")


@contextmanager
def hooked(blocks: nn.ModuleList, edits: Iterable[tuple[tuple[int, str], Edit]]) -> Iterator[None]:
    """Hooks for `edits` ((layer, component), edit) attached for the duration of the block."""
    handles = []
    try:
        for (layer, component), edit in edits:
            module, pre = site(blocks, layer, component)
            if pre:
                handles.append(module.register_forward_pre_hook(_pre_hook(edit), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(_post_hook(edit)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _pre_hook(edit: Edit):
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
        if args:
            new = edit(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = edit(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})
    return hook


def _post_hook(edit: Edit):
    def hook(module: nn.Module, args: Any, output: Any):
        if isinstance(output, (tuple, list)):
            new = edit(output[0])
            return None if new is None else type(output)((new, *output[1:]))
        new = edit(output)
        return new
    return hook


def reader(store: dict[tuple[int, str], torch.Tensor], key: tuple[int, str], row: int,
           positions: torch.Tensor) -> Edit:
    """Keeps row `row` of the activation at `positions` ([len(positions), hidden]) in `store[key]`."""
    def edit(h: torch.Tensor) -> None:
        store[key] = h[row, positions].clone()
    return edit


def writer(row: int, positions: torch.Tensor, values: torch.Tensor) -> Edit:
    """Replaces row `row` of the activation at `positions` with `values`; other rows pass unchanged.

    A copy, not an in-place write: the tensor a hook sees may be shared with
    the model's own bookkeeping (the residual it is added to, an embedding output).
    """
    def edit(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h[row, positions] = values.to(h.dtype)
        return h
    return edit


def record_outputs(blocks: nn.ModuleList, below: int, row: int, positions: torch.Tensor,
                   store: dict[int, torch.Tensor | None]) -> list[Any]:
    """Hooks keeping row `row` of blocks 0..below-1's outputs at `positions` in `store` (None for a
    block whose output is not a plain tensor: `skipped` cannot stand in for it). Returns the handles."""
    def hook_for(i: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            store[i] = output[row, positions].clone() if isinstance(output, torch.Tensor) else None
        return hook
    return [blocks[i].register_forward_hook(hook_for(i)) for i in range(below)]


@contextmanager
def skipped(blocks: nn.ModuleList, outputs: dict[int, torch.Tensor | None], below: int) -> Iterator[None]:
    """Blocks 0..below-1 answer with their recorded output (the same for every row) instead of running.

    Used when no row of a batch is patched before block `below`: those blocks
    would compute the corrupted run again, row after row. Only for forwards
    whose KV cache is not kept (a skipped block writes none).
    """
    try:
        for i in range(below):
            blocks[i].forward = _constant(outputs[i])
        yield
    finally:
        for i in range(below):
            blocks[i].__dict__.pop("forward", None)


def _constant(value: torch.Tensor | None):
    assert value is not None

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        hidden = args[0] if args else kwargs["hidden_states"]
        return value.to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
    return forward
