"""Turning a request's parsed JSON into a checked float64 matrix.

Checked with numpy on the whole array, not a validator per float: a request
may carry 10,000 x 16,384 numbers.
"""
from __future__ import annotations

from typing import Any

import numpy as np

MIN_VECTORS = 3
MAX_VECTORS = 10_000
MAX_DIMS = 16_384
# Larger numbers would overflow float64 in the sums of squares the analysis
# takes (over up to 16,384 dims x 10,000 vectors): infinity in all but name.
MAX_ABS = 1e100


class InputError(ValueError):
    """Bad input, naming the request field it is about (pickles across processes)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def check_vectors(field: str, value: Any) -> np.ndarray:
    """`value` (a list of equally long lists of finite numbers) as an n x d float64 array."""
    if hasattr(value, "tolist") and not isinstance(value, list):
        value = value.tolist()  # an array handed in by a Python caller
    if not isinstance(value, list):
        raise InputError(field, f"must be a list of vectors (lists of numbers), got {type(value).__name__}")
    if len(value) < MIN_VECTORS:
        raise InputError(field, f"Need at least {MIN_VECTORS} vectors for analysis, got {len(value)}")
    if len(value) > MAX_VECTORS:
        raise InputError(field, f"at most {MAX_VECTORS} vectors, got {len(value)}")
    for i, row in enumerate(value):
        if not isinstance(row, list):
            raise InputError(field, f"vector {i} is not a list of numbers")
    first = len(value[0])
    for i, row in enumerate(value):
        if len(row) != first:
            raise InputError(field, f"all vectors must have the same length: vector 0 has {first} numbers, "
                                    f"vector {i} has {len(row)}")
    if first == 0:
        raise InputError(field, "the vectors are empty (0 dimensions)")
    if first > MAX_DIMS:
        raise InputError(field, f"at most {MAX_DIMS} dimensions, got {first}")
    try:
        array = np.array(value)
    except (ValueError, TypeError):
        array = None  # a number nested deeper in one row than in another
    # Without a dtype numpy keeps what JSON gave: numbers become int or float,
    # anything else (strings, null, booleans, objects) another kind.
    if array is None or array.ndim != 2 or array.dtype.kind not in "iuf":
        raise InputError(field, "every vector must be a list of numbers (no strings, booleans, nested lists, or null, "
                                "which is how some encoders write NaN)")
    array = array.astype(np.float64, copy=False)
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        raise InputError(field, f"vector {int(np.argmin(finite))} holds NaN or infinity")
    in_range = (np.abs(array) <= MAX_ABS).all(axis=1)
    if not in_range.all():
        raise InputError(field, f"vector {int(np.argmin(in_range))} holds a number beyond ±{MAX_ABS:g}")
    return array


def check_same_dims(first: str, a: np.ndarray, second: str, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise InputError(second, f"{first} and {second} must have the same dimension: "
                                 f"{first} has {a.shape[1]}, {second} has {b.shape[1]}")
