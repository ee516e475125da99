"""The wire protocol between API processes, the broker and workers.

Defined once here and imported by all three. A message is a ZeroMQ multipart
message: the first part is a msgpack map (the header), and any further parts
are raw array buffers (hidden states) described by the header's `arrays`
list. Nothing is pickled; an array never becomes a list of Python floats on
the worker side.

Topology: API processes (DEALER) -> broker frontend (ROUTER); workers
(DEALER) -> broker backend (ROUTER). The broker sees the sender identity as
the first part of every message and prepends the destination identity when
it sends. A worker on the API's host may send a generation's frames straight
to that API process (Generate.reply_to, workers/direct_replies.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from loom.error_types import HTTP_STATUS, ErrorType  # noqa: F401 (re-exported: P.ErrorType, P.HTTP_STATUS)
from loom.protocol_checks import (MAX_ARRAY_BYTES, ProtocolError, check_arrays, check_tokens,  # noqa: F401 (re-exported)
                                  check_types)

PROTOCOL_VERSION = 1

# Largest header accepted: a header is a small map (array parts are bounded separately).
MAX_HEADER_BYTES = 1 << 20

# Each beat wakes threads in every process (~0.3 ms of CPU on a 2-core VM): once a second.
HEARTBEAT_INTERVAL_S = 1.0
# A peer silent this long is gone; one whose TCP connection closed is noticed at
# the broker's next heartbeat to it (EHOSTUNREACH, ROUTER_MANDATORY).
HEARTBEAT_TIMEOUT_S = 4.0


# --- messages ------------------------------------------------------------------

_REGISTRY: dict[str, type["Message"]] = {}


@dataclass
class Message:
    """Base of every message: a `kind` tag and msgpack-friendly fields."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _REGISTRY[cls.kind] = cls

    def header(self) -> dict[str, Any]:
        h = {name: getattr(self, name) for name in _fields(type(self))}
        h["v"] = PROTOCOL_VERSION
        h["kind"] = self.kind
        return h


# Decoding runs once per token in every process: each class's fields are
# worked out once, not per message.
_FIELDS: dict[type, tuple[str, ...]] = {}


def _fields(cls: type) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


# An ArraySpec (each dict of an `arrays` field) describes one raw buffer part: "layer", "shape",
# "dtype" ("float16" | "bfloat16" | "float32"; bfloat16 travels as its raw 2-byte words) and "keys"
# (every layer index the client asked for that names this array: -2 and N are one).


# Requests (API -> broker -> worker) -------------------------------------------

@dataclass
class Generate(Message):
    kind: ClassVar[str] = "generate"
    rid: str
    model: str
    # Exactly one of `messages` (chat template applied by the worker) or `prompt`.
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int | None = None
    # Layers to capture; [] captures nothing. -1 is the final (post-norm) state.
    layers: list[int] = field(default_factory=list)
    all_layers: bool = False  # every layer 0..N plus -1 (the worker knows N)
    # Research surface (CONTRACT.md). Which positions' states leave the worker:
    # "last" (kept, sent in Final), "generated", "prompt" or "all" (sent as made).
    positions: str = "last"
    logprobs: bool = False
    top_logprobs: int = 0  # 0..20 alternatives per token
    lens_layers: list[int] = field(default_factory=list)  # logit lens at these layers
    lens_top_k: int = 0
    # An embedding: prefill only, the layer `layers[0]` pooled ("last_token",
    # "mean", "first_token") and sent in Final; nothing is generated.
    pooling: str | None = None
    normalize: bool = False
    # Interventions on this request's residual stream, in order: {"layer", "vector"
    # (little-endian float32 bytes), "scale", "op" ("add" | "ablate"), "positions"}.
    steering: list[dict[str, Any]] = field(default_factory=list)
    device: str | None = None
    request_id: str = ""  # the HTTP request's X-Request-Id, for log lines in every process
    # The asking API process's identity, stamped by the broker (whatever the API
    # sent): the worker groups each step's tokens by it into one Tokens message.
    api: bytes = b""
    # The API process's own socket for this request's frames (workers/direct_replies.py); "" = via the broker.
    reply_to: str = ""


@dataclass
class Load(Message):
    kind: ClassVar[str] = "load"
    rid: str
    model: str
    dtype: str = "auto"
    device: str | None = None
    request_id: str = ""
    # Model ids loaded elsewhere (id -> source), filled by the broker: a
    # directory with a taken name gets another id, never another's weights.
    reserved: dict[str, str] = field(default_factory=dict)


@dataclass
class Unload(Message):
    kind: ClassVar[str] = "unload"
    rid: str
    model: str
    request_id: str = ""


@dataclass
class Cancel(Message):
    kind: ClassVar[str] = "cancel"
    rid: str


@dataclass
class Ended(Message):
    """Worker -> broker: a request answered on the API's own socket is over (its route can go)."""

    kind: ClassVar[str] = "ended"
    rid: str


@dataclass
class StatusRequest(Message):
    """API -> broker: the worker table, for /health and /models."""

    kind: ClassVar[str] = "status"
    rid: str


MAX_PATCH_RUNS = 512  # (layer, component) pairs in one /patch request


@dataclass
class Patch(Message):
    """Activation patching (POST /patch): routed like a Generate, answered by one PatchResult."""

    kind: ClassVar[str] = "patch"
    rid: str
    model: str
    clean: str
    corrupted: str
    layers: list[int] | None = None  # decoder layers 1..N, negative from the end; None: all
    components: list[str] = field(default_factory=lambda: ["resid_post"])
    positions: str = "all"  # "all", "last", or "list" (then `position_list`)
    position_list: list[int] = field(default_factory=list)
    answer: str | None = None  # one token each; None: the clean / corrupted run's top token
    wrong_answer: str | None = None
    max_tokens: int = 0
    device: str | None = None
    request_id: str = ""


# Replies (worker -> API: directly, or through the broker) ----------------------

@dataclass
class Token(Message):
    kind: ClassVar[str] = "token"
    rid: str
    text: str
    index: int  # 0-based position of this token in the completion
    t_emit: float = 0.0  # worker's time.time() at emit, for relay-latency measurement
    # Only for requests that asked (empty otherwise): the states that predicted
    # this step's token ([1, H] per layer, ArraySpec dicts with "position" and
    # "prompt_tokens"), logprobs of the tokens whose text this message carries,
    # and the logit lens of this step's token ({"token_index", "layers"}).
    arrays: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None
    lens: dict[str, Any] | None = None


@dataclass
class Tokens(Message):
    """One step's tokens for the requests of one API process, instead of a Token each.

    Entry i is request `rids[i]`'s token: `texts[i]` at `indexes[i]`. `extras`
    is empty when no entry has any, else one map per entry ({} for none) with
    a Token's "arrays", "logprobs" and "lens"; the buffers of every entry's
    arrays follow the header in entry order. The broker relays it whole to
    `api`; the API splits it into per-request Token messages (`tokens()`).
    """

    kind: ClassVar[str] = "tokens"
    api: bytes
    rids: list[str]
    texts: list[str]
    indexes: list[int]
    t_emit: float = 0.0  # the worker's time.time() when the step's tokens left
    extras: list[dict[str, Any]] = field(default_factory=list)

    def tokens(self, buffers: list[Any]) -> list[tuple[Token, list[Any]]]:
        """The entries as Token messages, each with its own buffers."""
        t_emit = self.t_emit
        if not self.extras:
            return [(Token(rid, text, index, t_emit), []) for rid, text, index in zip(self.rids, self.texts, self.indexes)]
        out: list[tuple[Token, list[Any]]] = []
        at = 0
        for rid, text, index, extra in zip(self.rids, self.texts, self.indexes, self.extras):
            arrays = extra.get("arrays") or []
            out.append((Token(rid, text, index, t_emit, arrays, extra.get("logprobs"), extra.get("lens")),
                        buffers[at:at + len(arrays)]))
            at += len(arrays)
        return out


@dataclass
class States(Message):
    """Per-position hidden states outside a Token: the prompt's block ([P, H]
    per layer, right after prefill) or the state that chose the end of turn."""

    kind: ClassVar[str] = "states"
    rid: str
    arrays: list[dict[str, Any]] = field(default_factory=list)  # as Token.arrays, [n, H] rows from "position"


@dataclass
class Final(Message):
    kind: ClassVar[str] = "final"
    rid: str
    stop_reason: str  # "end_turn" | "max_tokens"
    prompt_tokens: int
    completion_tokens: int
    generate_s: float  # prefill to last token, measured in the worker
    model: str
    dtype: str
    arrays: list[dict[str, Any]] = field(default_factory=list)  # ArraySpec as dicts


@dataclass
class Error(Message):
    kind: ClassVar[str] = "error"
    rid: str
    type: str
    message: str
    retry_after: float | None = None


@dataclass
class Loaded(Message):
    kind: ClassVar[str] = "loaded"
    rid: str
    info: dict[str, Any]  # model_id, device, dtype, hidden_size, num_layers, load_time_seconds, loader_type


@dataclass
class Unloaded(Message):
    kind: ClassVar[str] = "unloaded"
    rid: str
    model: str


@dataclass
class Status(Message):
    kind: ClassVar[str] = "status_reply"
    rid: str
    broker_id: str
    workers: list[dict[str, Any]]


@dataclass
class PatchResult(Message):
    kind: ClassVar[str] = "patch_result"
    rid: str
    result: dict[str, Any]  # the /patch answer body: clean, corrupted, results, answer, metadata


# Liveness -----------------------------------------------------------------------

@dataclass
class Register(Message):
    """Worker -> broker on connect (and again whenever the broker asks)."""

    kind: ClassVar[str] = "register"
    worker_id: str
    device: str
    host: str
    pid: int
    capacity: int
    models: list[dict[str, Any]]
    active: int = 0


@dataclass
class Heartbeat(Message):
    """Both ways. From a worker it carries its load; from the broker, its identity."""

    kind: ClassVar[str] = "heartbeat"
    sender: str
    active: int = 0
    models: list[dict[str, Any]] | None = None
    # A worker's figures for /metrics: rows in the running batch, requests
    # waiting for their prefill, bytes held by KV caches.
    running: int = 0
    waiting: int = 0
    kv_cache_bytes: int = 0


@dataclass
class Reregister(Message):
    """Broker -> worker that it does not know (e.g. after a broker restart)."""

    kind: ClassVar[str] = "reregister"
    broker_id: str


@dataclass
class Ping(Message):
    """API -> broker; the broker answers with Pong so the API notices a restart."""

    kind: ClassVar[str] = "ping"
    sender: str


@dataclass
class Pong(Message):
    kind: ClassVar[str] = "pong"
    broker_id: str


# --- encoding -------------------------------------------------------------------

def encode(msg: Message, buffers: list[Any] | tuple[Any, ...] = ()) -> list[Any]:
    """Multipart frames for `msg`: the msgpack header, then raw buffers."""
    return [msgpack.packb(msg.header(), use_bin_type=True), *buffers]


def decode(frames: list[Any]) -> tuple[Message, list[Any]]:
    """Parse a multipart message into a typed message and its raw buffers.

    Raises ProtocolError for anything malformed: callers drop and log it.
    """
    if not frames:
        raise ProtocolError("empty message")
    raw = frames[0]
    raw_bytes = raw.bytes if hasattr(raw, "bytes") else raw
    if len(raw_bytes) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw_bytes)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(raw_bytes, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable header: {exc.__class__.__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a map")
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {header.get('v')!r}, expected {PROTOCOL_VERSION}")
    kind = header.get("kind")
    cls = _REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message kind {header.get('kind')!r}")
    names = _fields(cls)
    try:
        msg = cls(**{k: v for k, v in header.items() if k in names})
    except TypeError as exc:
        raise ProtocolError(f"bad {cls.kind} message: {exc}") from None
    check_types(msg)
    buffers = list(frames[1:])
    if isinstance(msg, (Final, Token, States)):
        check_arrays(msg.kind, msg.arrays, buffers)
    elif isinstance(msg, Tokens):
        check_tokens(msg, buffers)
    return msg, buffers


def decode_each(frames: list[Any]) -> list[tuple[Message, list[Any]]]:
    """decode(), with a Tokens message split into its Token messages (for a client that reads frames one by one)."""
    msg, buffers = decode(frames)
    if type(msg) is Tokens:
        return msg.tokens(buffers)  # type: ignore[return-value]
    return [(msg, buffers)]
