"""Hidden-state vectors as JSON: each float in the shortest form that
round-trips in the model's dtype, so a 4096-wide float16 vector stays near
30 KB and the whole event line well under the 64 KiB some clients allow.
"""
from __future__ import annotations

import base64

import numpy as np

_NUMPY = {"float16": np.float16, "float32": np.float32}
_MAX_DIGITS = {"float16": 5, "bfloat16": 4, "float32": 9}


def to_array(buffer: bytes | memoryview, dtype: str) -> np.ndarray:
    """The vector as float32 (exact for all three dtypes)."""
    if dtype == "bfloat16":
        bits = np.frombuffer(buffer, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32)
    return np.frombuffer(buffer, dtype=np.dtype(_NUMPY[dtype]).newbyteorder("<")).astype(np.float32)


def _round_trip(values: np.ndarray, dtype: str) -> np.ndarray:
    """`values` (float64) rounded to `dtype`, as float32 for comparison."""
    if dtype == "bfloat16":
        bits = values.astype(np.float32).view(np.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round to nearest even
        return rounded.astype(np.uint32).view(np.float32)
    return values.astype(_NUMPY[dtype]).astype(np.float32)


def shortest_strings(values: np.ndarray, dtype: str) -> list[str]:
    """Shortest decimal strings that read back to the same `dtype` values."""
    out = np.empty(values.shape, dtype=object)
    todo = np.isfinite(values)
    out[~todo] = "null"  # JSON has no NaN or infinity
    target = values.astype(np.float32)
    for digits in range(1, _MAX_DIGITS[dtype] + 1):
        if not todo.any():
            break
        candidates = np.char.mod(f"%.{digits}g", values[todo].astype(np.float64))
        back = _round_trip(candidates.astype(np.float64), dtype)
        ok = back == target[todo]
        idx = np.flatnonzero(todo)
        out[idx[ok]] = candidates[ok]
        todo[idx[ok]] = False
    if todo.any():  # cannot happen for these dtypes; keep the exact value anyway
        out[todo] = [repr(float(v)) for v in values[todo]]
    return out.tolist()


def json_list(buffer: bytes | memoryview, dtype: str) -> bytes:
    """A JSON array of the vector's floats, ready to embed (orjson.Fragment)."""
    return ("[" + ",".join(shortest_strings(to_array(buffer, dtype), dtype)) + "]").encode()


def base64_bytes(buffer: bytes | memoryview) -> str:
    # Straight from the frame's buffer: no copy, and never through Python floats.
    return base64.b64encode(buffer).decode("ascii")


def json_rows(buffer: bytes | memoryview, dtype: str, rows: int) -> bytes:
    """A `[rows, H]` array as JSON: a list of `rows` lists (one flat list when rows is 1)."""
    if rows <= 1:
        return json_list(buffer, dtype)
    strings = shortest_strings(to_array(buffer, dtype), dtype)
    width = len(strings) // rows
    lines = ("[" + ",".join(strings[r * width:(r + 1) * width]) + "]" for r in range(rows))
    return ("[" + ",".join(lines) + "]").encode()
