"""The checks every decoded message passes before any handler sees it.

A message from the network is untrusted: each field must have the type its
class declares, and array parts must match their specs, so no handler trips
on a hostile or broken peer. Split from loom/protocol.py, which calls these
from `decode`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

MAX_ARRAY_BYTES = 1 << 30  # array parts are bounded here; headers in loom/protocol.py


class ProtocolError(ValueError):
    """A message that does not follow this protocol; it is dropped and logged."""


# Checks run once per message in every process: each class's are worked out once.
_CHECKS: dict[type, list[tuple[str, str, bool]]] = {}


def _checks(cls: type) -> list[tuple[str, str, bool]]:
    """(field, base type as written, whether None is allowed) for each field."""
    checks = _CHECKS.get(cls)
    if checks is None:
        checks = []
        for f in dataclasses.fields(cls):
            annotation = str(f.type)
            allows_none = "None" in annotation or f.default is None
            checks.append((f.name, annotation.split("|")[0].strip(), allows_none))
        _CHECKS[cls] = checks
    return checks


_SIMPLE_TYPES = {"str": str, "int": int, "float": (int, float), "bool": bool, "bytes": bytes}


_FAST_CHECKS: dict[type, list[tuple[str, Any, Any]]] = {}
_INT_TYPES, _DICT_TYPES = frozenset({int, bool}), frozenset({dict})


def _all_str(values: list[Any]) -> bool:
    try:
        "".join(values)  # the per-element check in C
        return True
    except TypeError:
        return False


def _fast_checks(cls: type) -> list[tuple[str, Any, Any]]:
    """(field, exact types allowed, a check of the element types or None) per field, from `_checks`."""
    fast = _FAST_CHECKS.get(cls)
    if fast is None:
        fast = []
        for name, base, allows_none in _checks(cls):
            simple = _SIMPLE_TYPES.get(base)
            types = {*(simple if isinstance(simple, tuple) else (simple,))} if simple else None
            if base.startswith("list"):
                types = {list}
            elif base.startswith("dict"):
                types = {dict}
            elems = next((check for p, check in (("list[int]", _INT_TYPES.issuperset), ("list[str]", _all_str),
                                                 ("list[dict", _DICT_TYPES.issuperset)) if base.startswith(p)), None)
            if types is not None and allows_none:
                types.add(type(None))
            fast.append((name, frozenset(types) if types is not None else None, elems))
        _FAST_CHECKS[cls] = fast
    return fast


def check_types(msg: Any) -> None:
    """Reject fields whose type is plainly wrong, so no handler trips on them."""
    # Decoded msgpack holds exact builtin types: checking those by set lookups
    # (elements in C) spares a per-element isinstance loop on every token
    # batch. Anything the fast pass does not vouch for gets the full checks.
    for name, types, elems in _fast_checks(type(msg)):
        value = getattr(msg, name)
        if value is None:
            if types is None or type(None) not in types:
                break
        elif types is not None and type(value) not in types or elems is not None and not elems(
                value if elems is _all_str else map(type, value)):
            break
    else:
        return
    for name, base, allows_none in _checks(type(msg)):
        value = getattr(msg, name)
        if value is None:
            if not allows_none:
                raise ProtocolError(f"{msg.kind}.{name} is required")
            continue
        if base in _SIMPLE_TYPES and not isinstance(value, _SIMPLE_TYPES[base]):
            raise ProtocolError(f"{msg.kind}.{name} must be {base}")
        if base.startswith("list") and not isinstance(value, list):
            raise ProtocolError(f"{msg.kind}.{name} must be a list")
        # Elements too: a handler indexing a model entry or comparing a layer must not trip.
        if base.startswith("list[int]") and not all(isinstance(v, int) for v in value):
            raise ProtocolError(f"{msg.kind}.{name} must be a list of ints")
        if base.startswith("list[str]") and not all(isinstance(v, str) for v in value):
            raise ProtocolError(f"{msg.kind}.{name} must be a list of strings")
        if base.startswith("list[dict") and not all(isinstance(v, dict) for v in value):
            raise ProtocolError(f"{msg.kind}.{name} must be a list of maps")
        if base.startswith("dict") and not isinstance(value, dict):
            raise ProtocolError(f"{msg.kind}.{name} must be a map")


_DTYPE_SIZES = {"float16": 2, "bfloat16": 2, "float32": 4}


def check_tokens(msg: Any, buffers: list[Any]) -> None:
    """Entries line up, and each entry's extras are shaped as a Token's (its arrays as check_arrays wants)."""
    n = len(msg.rids)
    if len(msg.texts) != n or len(msg.indexes) != n or (msg.extras and len(msg.extras) != n):
        raise ProtocolError(f"tokens: {n} rids, {len(msg.texts)} texts, {len(msg.indexes)} indexes, "
                            f"{len(msg.extras)} extras")
    arrays: list[Any] = []
    for extra in msg.extras:
        entry = extra.get("arrays", [])
        logprobs, lens = extra.get("logprobs"), extra.get("lens")
        if not isinstance(entry, list) or not (logprobs is None or isinstance(logprobs, list)
                                               and all(isinstance(e, dict) for e in logprobs)) \
                or not (lens is None or isinstance(lens, dict)):
            raise ProtocolError(f"tokens: bad extras {extra!r}"[:200])
        arrays += entry
    check_arrays(msg.kind, arrays, buffers)


def check_arrays(kind: str, arrays: list[Any], buffers: list[Any]) -> None:
    if len(arrays) != len(buffers):
        raise ProtocolError(f"{kind} has {len(arrays)} array specs but {len(buffers)} buffers")
    for spec, buf in zip(arrays, buffers):
        size = _DTYPE_SIZES.get(spec.get("dtype")) if isinstance(spec, dict) else None
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if size is None or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ProtocolError(f"bad array spec {spec!r}"[:200])
        keys = spec.get("keys")
        where = [spec.get(k, 0) for k in ("position", "prompt_tokens")]
        if not isinstance(keys, list) or not all(isinstance(k, int) for k in keys) \
                or not all(isinstance(w, int) and w >= 0 for w in where):
            raise ProtocolError(f"bad array spec {spec!r}"[:200])
        n = 1
        for d in shape:
            n *= d
        if n * size != len(buf) or n * size > MAX_ARRAY_BYTES:
            raise ProtocolError(f"array of shape {spec.get('shape')} does not match {len(buf)} bytes")

