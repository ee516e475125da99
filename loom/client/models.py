"""Typed results for the shapes of the HTTP contract (see CONTRACT.md).

Every model accepts fields it does not name, so a newer server that adds
fields never breaks an older client; the extras stay readable as attributes.
"""
from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from loom.client.errors import LoomStreamError
from loom.client.sse import ServerSentEvent

__all__ = [
    "Usage",
    "HiddenState",
    "Health",
    "LoadedModel",
    "ModelsList",
    "LoadResult",
    "ChatResult",
    "GenerateResult",
    "TextDelta",
    "TokenLogprob",
    "TopLogprob",
    "HiddenStates",
    "LogitLens",
    "MessageDelta",
    "ErrorEvent",
    "StreamEvent",
    "parse_stream_event",
]


class _Shape(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Shape):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class HiddenState(_Shape):
    """One hidden-state vector.

    The contract names the numbers differently by place: `final` in
    `hidden_state`, `vector` in chat's `hidden_states`, `data` (a list or
    base64 bytes) in /generate. `values()` reads whichever is present.
    """

    final: list[float] | str | None = None
    vector: list[float] | list[list[float]] | str | None = None
    data: list[float] | list[list[float]] | str | None = None
    shape: list[int] = []
    layer: int | None = None
    dtype: str | None = None
    encoding: str | None = None

    def values(self) -> list[float]:
        """Every number, row after row for an [n, H] array."""
        for numbers in (self.final, self.vector, self.data):
            if isinstance(numbers, str):
                return _decode_base64(numbers, self.dtype or "float32")
            if numbers:
                return [v for row in numbers for v in row] if isinstance(numbers[0], list) else numbers
        return []

    def array(self) -> Any:
        """The array as numpy float32 in its `shape` ([1, H] or [n, H]); base64 is read with np.frombuffer."""
        from loom.client.research import decode_array

        return decode_array(self)

    def l2_norm(self) -> float:
        return math.sqrt(math.fsum(v * v for v in self.values()))


def _decode_base64(text: str, dtype: str) -> list[float]:
    """Little-endian raw bytes of the array, as /generate's base64 format sends them."""
    raw = base64.b64decode(text)
    if dtype == "bfloat16":
        # bfloat16 is the top half of a float32: widen each value by 16 zero bits.
        halves = struct.unpack(f"<{len(raw) // 2}H", raw)
        return list(struct.unpack(f"<{len(halves)}f", struct.pack(f"<{len(halves)}I", *(h << 16 for h in halves))))
    codes = {"float16": ("e", 2), "float32": ("f", 4), "float64": ("d", 8)}
    if dtype not in codes:
        raise ValueError(f"cannot decode hidden state of dtype {dtype!r}")
    code, size = codes[dtype]
    return list(struct.unpack(f"<{len(raw) // size}{code}", raw))


# --- plain endpoints -------------------------------------------------------


class Health(_Shape):
    status: str = "unknown"


class LoadedModel(_Shape):
    model_id: str
    device: str | None = None
    dtype: str | None = None
    hidden_size: int | None = None
    num_layers: int | None = None


class ModelsList(_Shape):
    loaded_models: list[LoadedModel] = []


class LoadResult(LoadedModel):
    load_time_seconds: float | None = None
    loader_type: str | None = None


class _Arrays(_Shape):
    hidden_states: dict[str, HiddenState] | None = None

    def arrays(self) -> dict[int, Any]:
        """layer -> numpy float32 array ([n, H]) of `hidden_states`."""
        return {int(k): v.array() for k, v in (self.hidden_states or {}).items()}


class ChatResult(_Arrays):
    text: str
    usage: Usage = Usage()
    hidden_state: HiddenState | None = None
    metadata: dict[str, Any] = {}
    logprobs: list["TokenLogprob"] | None = None
    logit_lens: list[dict[str, list["TopLogprob"]]] | None = None


class GenerateResult(_Arrays):
    text: str
    token_count: int | None = None
    metadata: dict[str, Any] = {}
    logprobs: list["TokenLogprob"] | None = None
    logit_lens: list[dict[str, list["TopLogprob"]]] | None = None


# --- stream events -----------------------------------------------------------


class _TextDeltaBody(_Shape):
    type: str = "text_delta"
    text: str = ""


class TopLogprob(_Shape):
    token_id: int
    token: str = ""
    logprob: float


class TokenLogprob(TopLogprob):
    """A generated token's log-probability (raw logits, float32) and its most likely alternatives."""

    top_logprobs: list[TopLogprob] = []


class TextDelta(_Shape):
    """`content_block_delta`: one generated token's text (and, when asked, the
    logprobs of the tokens whose text it carries)."""

    type: Literal["content_block_delta"] = "content_block_delta"
    delta: _TextDeltaBody
    logprobs: list[TokenLogprob] | None = None

    @property
    def text(self) -> str:
        return self.delta.text


class _MessageDeltaBody(_Shape):
    stop_reason: str | None = None


class MessageDelta(_Shape):
    """`message_delta`: the final event of a successful stream."""

    type: Literal["message_delta"] = "message_delta"
    delta: _MessageDeltaBody = _MessageDeltaBody()
    usage: Usage = Usage()
    metadata: dict[str, Any] = {}
    hidden_state: HiddenState | None = None
    hidden_states: dict[str, HiddenState] | None = None

    @property
    def stop_reason(self) -> str | None:
        return self.delta.stop_reason


class _ErrorBody(_Shape):
    type: str = "error"
    message: str = ""


class ErrorEvent(_Shape):
    """`error`: the final event of a failed stream."""

    type: Literal["error"] = "error"
    error: _ErrorBody = _ErrorBody()

    @property
    def error_type(self) -> str:
        return self.error.type

    @property
    def message(self) -> str:
        return self.error.message


class HiddenStates(_Shape):
    """`hidden_states`: the states at one position, every asked layer ([1, H] each)."""

    type: Literal["hidden_states"] = "hidden_states"
    position: int
    token_index: int | None = None  # the generated token this state predicted (None: a prompt position)
    hidden_states: dict[str, HiddenState] = {}

    def arrays(self) -> dict[int, Any]:
        """layer -> numpy float32 vector [H]."""
        return {int(k): v.array().reshape(-1) for k, v in self.hidden_states.items()}


class LogitLens(_Shape):
    """`logit_lens`: for generated token `token_index`, each layer's top tokens."""

    type: Literal["logit_lens"] = "logit_lens"
    token_index: int
    layers: dict[str, list[TopLogprob]] = {}


StreamEvent = Union[TextDelta, MessageDelta, ErrorEvent, HiddenStates, LogitLens]

_EVENT_TYPES: dict[str, type[BaseModel]] = {
    "content_block_delta": TextDelta,
    "message_delta": MessageDelta,
    "error": ErrorEvent,
    "hidden_states": HiddenStates,
    "logit_lens": LogitLens,
}


def parse_stream_event(sse: ServerSentEvent) -> StreamEvent | None:
    """The typed event for an SSE event, or None for one the contract does
    not name (a future event type, a keep-alive), which callers skip."""
    # The `event:` line names the type; fall back to the JSON's "type" for
    # servers that send bare `data:` lines.
    name = sse.event
    if name not in _EVENT_TYPES:
        if name != "message":
            return None
        try:
            name = json.loads(sse.data).get("type", "")
        except (ValueError, AttributeError):
            return None
        if name not in _EVENT_TYPES:
            return None
    try:
        return _EVENT_TYPES[name].model_validate_json(sse.data)  # type: ignore[return-value]
    except ValidationError as exc:
        raise LoomStreamError(
            f"the server sent a malformed {name} event: {sse.data[:200]!r}",
            error_type="protocol_error",
        ) from exc


# Results name the logprob models defined after them.
ChatResult.model_rebuild()
GenerateResult.model_rebuild()
