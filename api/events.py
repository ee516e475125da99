"""Frames from workers turned into the contract's JSON shapes and SSE events."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from api.floats import base64_bytes, json_rows
from loom import protocol as P
from loom.logs import current_request_id

_DELTA_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"type":"text_delta","text":'


def sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def delta_event(text: str) -> bytes:
    # The hot path: one of these per token, so no dict is built.
    return _DELTA_HEAD + orjson.dumps(text) + b"}}\n\n"


_CHUNKED_DELTA_SIZE = len(_DELTA_HEAD) + len(b"}}\n\n")


def delta_chunk(text: str) -> bytes:
    """delta_event(text) framed as an HTTP/1.1 chunk, as uvicorn's `send` would write it, in one step."""
    quoted = orjson.dumps(text)
    return b"%x\r\n%s%s}}\n\n\r\n" % (_CHUNKED_DELTA_SIZE + len(quoted), _DELTA_HEAD, quoted)


def error_body(error_type: str, message: str) -> dict[str, Any]:
    error = {"type": error_type, "message": message}
    request_id = current_request_id()
    if request_id:  # set for every HTTP request (api/request_ids.py)
        error["request_id"] = request_id
    return {"type": "error", "error": error}


def error_event(msg: P.Error) -> bytes:
    return sse("error", error_body(msg.type, msg.message))


@dataclass
class Want:
    """What hidden states the client asked for, and in which shape."""

    final: bool  # chat's `hidden_state`
    keys: list[int] | None  # explicit layers (None: none asked)
    all_layers: bool = False
    style: str = "chat"  # "chat": {"vector": ...}; "generate": {"data": ...}
    encoding: str = "list"  # "list" | "base64" (chat's base64 arrays are {"data": ..., "encoding": "base64"})
    positions: str = "last"  # hidden_state_positions
    logprobs: bool = False  # a top-level `logprobs` list in a non-streaming answer
    lens: bool = False  # a top-level `logit_lens` list in a non-streaming answer

    def layers(self) -> list[int]:
        layers = list(self.keys or [])
        if self.final and -1 not in layers:
            layers.append(-1)
        return layers


@dataclass
class Completion:
    """Accumulates one request's frames into the final answer."""

    model: str
    started: float
    text_parts: list[str] = field(default_factory=list)

    def add(self, token: P.Token) -> None:
        self.text_parts.append(token.text)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


def usage(final: P.Final) -> dict[str, int]:
    return {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens,
            "total_tokens": final.prompt_tokens + final.completion_tokens}


def metadata(final: P.Final, latency_s: float) -> dict[str, Any]:
    tps = final.completion_tokens / final.generate_s if final.generate_s > 0 else 0.0
    return {"model": final.model, "latency_ms": round(latency_s * 1000, 2),
            "tokens_per_second": round(tps, 2), "dtype": final.dtype}


def hidden_fields(final: P.Final, buffers: list[Any], want: Want) -> dict[str, Any]:
    """`hidden_state` and/or `hidden_states`, vectors embedded as raw JSON."""
    out: dict[str, Any] = {}
    layers_map: dict[str, Any] = {}
    for spec, buf in zip(final.arrays, buffers):
        raw = buf.buffer if hasattr(buf, "buffer") else buf
        shape, dtype = spec["shape"], spec["dtype"]
        if want.style == "generate":
            entry = array_entry(raw, shape, dtype, want)
            for key in spec["keys"]:
                layers_map[str(key)] = entry
            continue
        keys = spec["keys"]
        if want.final and -1 in keys:
            out["hidden_state"] = array_entry(raw, shape, dtype, want, "final", -1)
        for key in keys:
            if (want.keys and key in want.keys) or want.all_layers:
                layers_map[str(key)] = array_entry(raw, shape, dtype, want, "vector", key)
    if layers_map:
        out["hidden_states"] = dict(sorted(layers_map.items(), key=lambda kv: _order(int(kv[0]))))
    return out


def array_entry(raw: Any, shape: list[int], dtype: str, want: Want, name: str = "data",
                layer: int | None = None) -> dict[str, Any]:
    """One array as the contract writes it: floats under `name` (chat's "final"/"vector",
    /generate's "data"), or base64 under "data"; chat entries also say their layer."""
    if want.encoding == "base64":
        entry: dict[str, Any] = {"data": base64_bytes(raw), "shape": shape}
    else:
        entry = {name: orjson.Fragment(json_rows(raw, dtype, shape[0] if shape else 1)), "shape": shape}
    if layer is not None:
        entry["layer"] = layer
    entry["dtype"] = dtype
    if want.encoding == "base64":
        entry["encoding"] = "base64"
    return entry


def _order(layer: int) -> tuple[int, int]:
    return (1, layer) if layer < 0 else (0, layer)


def message_delta(final: P.Final, buffers: list[Any], want: Want, latency_s: float) -> bytes:
    data: dict[str, Any] = {"type": "message_delta", "delta": {"stop_reason": final.stop_reason},
                            "usage": usage(final), "metadata": metadata(final, latency_s)}
    data.update(hidden_fields(final, buffers, want))
    return sse("message_delta", data)
