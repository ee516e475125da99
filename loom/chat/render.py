"""What `loom chat` prints besides the answer: usage lines, hidden-state
previews, and errors a person can act on."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TextIO

from loom.client import HiddenState, LoomError, LoomHTTPError, MessageDelta

HIDDEN_PREVIEW = 6  # values of the hidden state shown after each answer


class Painter:
    """ANSI styling, only for terminals and only without $NO_COLOR."""

    def __init__(self, stream: TextIO, environ: Mapping[str, str]) -> None:
        isatty = getattr(stream, "isatty", lambda: False)
        self.enabled = isatty() and "NO_COLOR" not in environ and environ.get("TERM") != "dumb"

    def dim(self, text: str) -> str:
        return f"\033[2m{text}\033[0m" if self.enabled else text


def describe_usage(final: MessageDelta, elapsed: float, first_token_after: float | None) -> str:
    usage = final.usage
    rate = final.metadata.get("tokens_per_second")
    if not isinstance(rate, (int, float)):
        # Measure from the first token: the prompt's own processing time is not generation speed.
        span = elapsed - (first_token_after or 0.0)
        rate = (usage.completion_tokens - 1) / span if span > 0 and usage.completion_tokens > 1 else None
    parts = [f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens"]
    if rate is not None:
        parts.append(f"{rate:.1f} tok/s")
    parts.append(f"{elapsed:.2f} s")
    if final.stop_reason:
        parts.append(final.stop_reason)
    model = final.metadata.get("model")
    if model:
        parts.append(str(model))
    return "[" + " · ".join(parts) + "]"


def describe_hidden(state: HiddenState, label: str) -> str:
    values = state.values()
    layer = state.layer if state.layer is not None else label
    preview = ", ".join(f"{v:.4f}" for v in values[:HIDDEN_PREVIEW])
    more = ", ..." if len(values) > HIDDEN_PREVIEW else ""
    dtype = f" {state.dtype}" if state.dtype else ""
    return f"hidden state, layer {layer}: shape {list(state.shape)}{dtype} · L2 norm {state.l2_norm():.4f} · [{preview}{more}]"


def hidden_lines(final: MessageDelta) -> list[str]:
    lines = []
    if final.hidden_state is not None:
        lines.append(describe_hidden(final.hidden_state, "-1"))
    for key, state in (final.hidden_states or {}).items():
        lines.append(describe_hidden(state, key))
    return lines or ["hidden state: the server sent none"]


def explain(exc: LoomError, url: str, model: str) -> str:
    """One or two lines a person can act on."""
    text = f"error: {exc}"
    if isinstance(exc, LoomHTTPError):
        if exc.status_code == 404 and (exc.error_type == "model_not_loaded" or "not loaded" in exc.message.lower()):
            name = model or "the default model"
            text += (
                f"\n  {name} is not loaded on {url}; load it with /load NAME, or with "
                f"`curl -X POST {url}/models/load -H 'Content-Type: application/json' -d '{{\"model\": \"NAME\"}}'`"
            )
        elif exc.status_code == 401:
            text += "\n  pass the server's key with --api-key or $LOOM_API_KEY"
    return text
