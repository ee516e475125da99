"""Readiness: /health is 503 "starting" until the models named at start are loaded.

`loom serve` passes every `--model` to the API as `--require-model`; under
supervisord, supervisord.conf does. A required model counts as loaded when a
live worker holds a model that answers to that name (its id, the path given,
or its absolute path). Unloading it with DELETE through this API process
takes it off the list: the operator asked for that.
"""
from __future__ import annotations

from typing import Any

from loom.model_names import answers_to


class Readiness:
    def __init__(self, required: list[str]) -> None:
        self.required = list(dict.fromkeys(name.strip() for name in required if name.strip()))
        self._names: dict[str, set[str]] = {}  # required name -> every name of the model that satisfied it

    def loading(self, workers: list[dict[str, Any]]) -> list[str]:
        """The required models no live worker holds yet."""
        missing = []
        for name in self.required:
            entry = next((m for w in workers for m in w.get("models", []) if answers_to(m, name)), None)
            if entry is None:
                missing.append(name)
            else:
                self._names[name] = {entry["model_id"], *(entry.get("aliases") or [])}
        return missing

    def unloaded(self, name: str) -> None:
        self.required = [r for r in self.required if r != name and name not in self._names.get(r, ())]
