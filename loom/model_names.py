"""The names a loaded model answers to: its id and its aliases.

A hub model is known by its hub id. A model loaded from a directory is known
by the directory's name (its short id), by the path exactly as it was given,
and by its resolved absolute path, so a script may name it the way its
operator typed it. Two different directories with the same name never share
an id: the first keeps the name, the next gets `name-2`, then `name-3`, and so
on (ids already taken on this worker, or elsewhere as the broker reports,
count as taken).
"""
from __future__ import annotations

import os
from pathlib import Path


def is_directory(source: str) -> bool:
    return Path(source).is_dir()


def model_id_for(source: str, requested: str, taken: dict[str, str]) -> str:
    """The id for `source`; `taken` maps ids in use to their sources."""
    if not is_directory(source):
        return requested.strip()
    name = Path(source).name
    candidate, n = name, 1
    while taken.get(candidate, source) != source:
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def aliases_for(requested: str, source: str, model_id: str) -> list[str]:
    """Every name the model answers to, its id first."""
    names = [model_id, requested.strip()]
    if is_directory(source):
        names += [os.path.normpath(requested.strip()), source]
    return list(dict.fromkeys(n for n in names if n))


def answers_to(info: dict, name: str) -> bool:
    """Whether the model described by `info` (a worker's model entry) answers to `name`."""
    aliases = info.get("aliases")
    return info.get("model_id") == name or (isinstance(aliases, list) and name in aliases)
