"""Words for numbers: the first label whose limit the value is under."""
from __future__ import annotations


def grade(value: float, steps: tuple[tuple[float, str], ...], above: str) -> str:
    for limit, label in steps:
        if value < limit:
            return label
    return above
