"""`client.patch(...)`: activation patching (POST /patch) for LoomClient and AsyncLoomClient.

    result = loom.patch("... 2 + 3 =", "... 2 + 4 =", layers=[1, 2], components=["resid_pre", "mlp_out"])
    for row in result.rows():
        print(row["layer"], row["component"], row["recovered"])

The methods live in mixins that the client classes inherit, so the request
body is written once for both.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loom.client.models import _Shape
from loom.client.responses import parse

__all__ = ["PatchRun", "PatchedRun", "PatchToken", "PatchResult", "PatchMixin", "AsyncPatchMixin"]


class PatchRun(_Shape):
    """The clean or the corrupted run."""

    logit_diff: float
    top_token: str = ""
    top_token_id: int | None = None
    text: str | None = None


class PatchedRun(PatchRun):
    layer: int
    component: str
    recovered: float | None = None  # null when clean and corrupted have the same logit difference


class PatchToken(_Shape):
    token: str
    token_id: int


class PatchResult(_Shape):
    clean: PatchRun
    corrupted: PatchRun
    results: list[PatchedRun]
    answer: PatchToken | None = None
    wrong_answer: PatchToken | None = None
    positions: list[int] = []
    metadata: dict[str, Any] = {}

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per patched run (layer, component, logit_diff, recovered, top_token, text):
        a table for `pandas.DataFrame(result.rows())`, or for printing without pandas."""
        return [{"layer": r.layer, "component": r.component, "logit_diff": r.logit_diff, "recovered": r.recovered,
                 "top_token": r.top_token, "text": r.text} for r in self.results]


def _patch_body(clean: str, corrupted: str, model: str, layers: Sequence[int] | None,
                components: Sequence[str] | None, positions: str | Sequence[int] | None, answer: str | None,
                wrong_answer: str | None, max_tokens: int | None, device: str | None,
                extra: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "clean": clean, "corrupted": corrupted}
    if positions is not None and not isinstance(positions, str):
        positions = list(positions)  # a tuple or range must travel as a JSON list
    optional = {"layers": None if layers is None else list(layers),
                "components": None if components is None else list(components), "positions": positions,
                "answer": answer, "wrong_answer": wrong_answer, "max_tokens": max_tokens, "device": device}
    body.update({k: v for k, v in optional.items() if v is not None})
    body.update(extra)
    return body


class PatchMixin:
    def patch(self, clean: str, corrupted: str, model: str = "", *, layers: Sequence[int] | None = None,
              components: Sequence[str] | None = None, positions: str | Sequence[int] | None = None,
              answer: str | None = None, wrong_answer: str | None = None, max_tokens: int | None = None,
              device: str | None = None, **extra: Any) -> PatchResult:
        """Patch the clean run's activations into the corrupted run, for each (layer, component).

        Fields left as None take the server's defaults: every layer,
        ["resid_post"], all positions, the runs' own top tokens as answers.
        """
        body = _patch_body(clean, corrupted, model, layers, components, positions, answer, wrong_answer,
                           max_tokens, device, extra)
        return parse(PatchResult, self._call("POST", "/patch", body))  # type: ignore[attr-defined]


class AsyncPatchMixin:
    async def patch(self, clean: str, corrupted: str, model: str = "", *, layers: Sequence[int] | None = None,
                    components: Sequence[str] | None = None, positions: str | Sequence[int] | None = None,
                    answer: str | None = None, wrong_answer: str | None = None, max_tokens: int | None = None,
                    device: str | None = None, **extra: Any) -> PatchResult:
        """The asyncio twin of `LoomClient.patch`."""
        body = _patch_body(clean, corrupted, model, layers, components, positions, answer, wrong_answer,
                           max_tokens, device, extra)
        return parse(PatchResult, await self._call("POST", "/patch", body))  # type: ignore[attr-defined]
