"""Request bodies and paths that both clients send, written once."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from loom.client.research import research_fields

__all__ = ["Messages", "Layers", "generation_fields", "model_path"]

Messages = Sequence[Mapping[str, str]]
Layers = str | int | Sequence[int] | None


def generation_fields(
    model: str,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    return_hidden_states: bool,
    hidden_state_layers: Layers,
    device: str | None,
    stream: bool,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    # Fields left as None are left out so that the server's defaults apply;
    # return_hidden_states is left out when false, as Weaver does.
    if isinstance(hidden_state_layers, Sequence) and not isinstance(hidden_state_layers, str):
        hidden_state_layers = list(hidden_state_layers)  # a tuple or range must travel as a JSON list
    body: dict[str, Any] = {"model": model}
    optional = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "hidden_state_layers": hidden_state_layers,
        "device": device,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if return_hidden_states:
        body["return_hidden_states"] = True
    if stream:
        body["stream"] = True
    body.update(research_fields(extra))  # hidden_state_positions, logprobs, logit_lens, steering, ...
    return body


def model_path(model_id: str) -> str:
    # The contract lets "/" in an id travel as "--", which keeps it one path segment.
    return "/models/" + quote(model_id.replace("/", "--"), safe="")
