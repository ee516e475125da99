"""Per-position hidden states, logprobs and the logit lens, as the contract writes them.

Streaming: a Token or States frame becomes its `hidden_states` events (one
per position, all asked layers in each), its `logit_lens` event, then its
`content_block_delta` (with `logprobs` when asked). Not streaming: the rows
are collected into one `[n, H]` array per layer, and the logprobs and lens
entries into top-level lists. Arrays go from the frame's raw buffer straight
to base64 (or to the shortest-float writer for `list`); nothing here turns a
whole array into Python floats.
"""
from __future__ import annotations

from typing import Any, Iterator

from api.events import Want, _order, array_entry, delta_event, sse
from loom import protocol as P


def _raw(buf: Any) -> Any:
    return buf.buffer if hasattr(buf, "buffer") else buf


def token_index(position: int, prompt_tokens: int) -> int | None:
    """The generated token a state predicted: the last prompt position predicted token 0."""
    first = prompt_tokens - 1
    return position - first if position >= first else None


def states_events(arrays: list[dict[str, Any]], buffers: list[Any], want: Want) -> Iterator[bytes]:
    """One `hidden_states` event per position, all layers in each, made one at a time: a long
    prompt's block becomes its events without all of them ever being in memory at once."""
    rows = []  # (first position, rows, bytes per row, spec, raw buffer) per array
    for spec, buf in zip(arrays, buffers):
        raw = _raw(buf)
        n = (spec["shape"] or [1])[0]
        rows.append((spec.get("position", 0), n, len(raw) // n if n else 0, spec, raw))
    positions = sorted({start + r for start, n, _, _, _ in rows for r in range(n)})
    for position in positions:
        layers: dict[str, Any] = {}
        prompt_tokens = 0
        for start, n, size, spec, raw in rows:
            r = position - start
            if not 0 <= r < n:
                continue
            prompt_tokens = spec.get("prompt_tokens", 0)
            entry = array_entry(raw[r * size:(r + 1) * size], [1, spec["shape"][-1]], spec["dtype"], want)
            for key in spec["keys"]:
                layers[str(key)] = entry
        yield sse("hidden_states", {
            "type": "hidden_states", "position": position, "token_index": token_index(position, prompt_tokens),
            "hidden_states": dict(sorted(layers.items(), key=lambda kv: _order(int(kv[0])))),
        })


def lens_event(lens: dict[str, Any]) -> bytes:
    return sse("logit_lens", {"type": "logit_lens", "token_index": lens.get("token_index"),
                              "layers": lens.get("layers", {})})


def delta_with_logprobs(text: str, logprobs: list[dict[str, Any]]) -> bytes:
    return sse("content_block_delta", {"type": "content_block_delta", "delta": {"type": "text_delta", "text": text},
                                       "logprobs": logprobs})


def has_extras(msg: P.Token) -> bool:
    return bool(msg.arrays) or msg.lens is not None or msg.logprobs is not None


def token_events(msg: P.Token, buffers: list[Any], want: Want) -> bytes:
    """A token's events in contract order: its states, its lens, then its text.

    A token whose text is still held back (the middle of a character) sends
    no delta; its logprobs come with the delta that carries its text, or, at
    the very end, with a delta of empty text.
    """
    events = list(states_events(msg.arrays, buffers, want)) if msg.arrays else []
    if msg.lens is not None:
        events.append(lens_event(msg.lens))
    if msg.logprobs is not None:
        events.append(delta_with_logprobs(msg.text, msg.logprobs))
    elif msg.text:
        events.append(delta_event(msg.text))
    return b"".join(events)


class Collected:
    """A non-streaming request's per-position rows, logprobs and lens entries."""

    def __init__(self) -> None:
        self.rows: dict[str, list[tuple[Any, str, int]]] = {}  # layer key -> [(raw rows, dtype, width)]
        self.logprobs: list[dict[str, Any]] = []
        self.lens: list[dict[str, Any]] = []

    def add(self, msg: P.Token | P.States, buffers: list[Any]) -> None:
        for spec, buf in zip(msg.arrays, buffers):
            width = spec["shape"][-1] if spec["shape"] else 0
            for key in spec["keys"]:
                self.rows.setdefault(str(key), []).append((_raw(buf), spec["dtype"], width))
        if isinstance(msg, P.Token):
            if msg.logprobs:
                self.logprobs.extend(msg.logprobs)
            if msg.lens is not None:
                self.lens.append(msg.lens.get("layers", {}))

    def fields(self, want: Want) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if want.positions != "last" and self.rows:  # no layers asked: no hidden_states at all
            states = {}
            for key, parts in sorted(self.rows.items(), key=lambda kv: _order(int(kv[0]))):
                raw = b"".join(bytes(p[0]) for p in parts)
                dtype, width = parts[0][1], parts[0][2]
                rows = len(raw) // (width * (2 if dtype != "float32" else 4)) if width else 0
                if want.style == "generate":
                    states[key] = array_entry(raw, [rows, width], dtype, want)
                else:
                    states[key] = array_entry(raw, [rows, width], dtype, want, "vector", int(key))
            out["hidden_states"] = states
        if want.logprobs:
            out["logprobs"] = self.logprobs
        if want.lens:
            out["logit_lens"] = self.lens
        return out
