"""The research surface as client calls: embeddings, batches, and numpy arrays for every array.

    with LoomClient() as loom:
        v = loom.embed("The capital of France is Paris.", pooling="mean")        # numpy [H]
        m = loom.embed_batch(["first text", "second text"], layer=2)              # numpy [2, H]
        batch = loom.generate_batch(["Hello", "Count to 3"], max_tokens=8)        # one GenerateResult each
        r = loom.generate("Hello", return_hidden_states=True, hidden_state_layers=[0, -1],
                          hidden_state_positions="all", hidden_state_format="base64", logprobs=True)
        r.arrays()[-1]                                                            # numpy [P + G - 1, H]

Arrays travel as base64 and are read with np.frombuffer, never as float lists.
The methods live in mixins that LoomClient and AsyncLoomClient inherit.
"""
from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from loom.client.models import GenerateResult, _Shape
from loom.client.responses import parse, parse_json

__all__ = ["ResearchMethods", "AsyncResearchMethods", "GenerateBatchResult", "BatchError", "decode_array",
           "research_fields"]


class BatchError(_Shape):
    """One /generate/batch entry that failed: `error` has `type` and `message`."""

    error: dict[str, Any]

    @property
    def message(self) -> str:
        return str(self.error.get("message", ""))


class GenerateBatchResult(_Shape):
    results: list[GenerateResult | BatchError]
    total_tokens: int = 0
    total_time_ms: float = 0.0
    prompts_processed: int = 0


_DTYPES = {"float32": "<f4", "float16": "<f2", "float64": "<f8"}


def decode_array(entry: Any) -> Any:
    """A contract array (HiddenState, or a dict with data/vector/final and shape) as numpy float32."""
    import numpy as np

    get = entry.get if isinstance(entry, Mapping) else lambda k, d=None: getattr(entry, k, d)
    dtype = get("dtype") or "float32"
    numbers = next((v for v in (get("data"), get("vector"), get("final")) if v is not None), [])
    if isinstance(numbers, str):
        raw = base64.b64decode(numbers)
        if dtype == "bfloat16":  # the top half of a float32
            array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, dtype=_DTYPES[dtype]).astype(np.float32)
    else:
        array = np.asarray(numbers, dtype=np.float32)
    shape = get("shape") or []
    return array.reshape(shape) if shape and int(np.prod(shape)) == array.size else array


def _vector_text(vector: Any) -> Any:
    """A steering vector (numpy, torch or a list) as base64 float32, or as given when it is a plain list."""
    if hasattr(vector, "detach"):  # a torch tensor
        vector = vector.detach().cpu().float().numpy()
    if hasattr(vector, "astype"):
        import numpy as np

        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").reshape(-1).tobytes()).decode("ascii")
    return vector


def research_fields(extra: Mapping[str, Any]) -> dict[str, Any]:
    """Request fields ready for JSON: steering vectors given as arrays travel as base64 float32."""
    out = dict(extra)
    steering = out.get("steering")
    if steering is not None:
        items = []
        for item in steering:
            item = dict(item)
            encoded = _vector_text(item.get("vector"))
            if isinstance(encoded, str) and not isinstance(item.get("vector"), str):
                item["dtype"] = "float32"
            item["vector"] = encoded
            items.append(item)
        out["steering"] = items
    return out


def _embed_body(model: str, pooling: str, normalize: bool, layer: int, device: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "pooling": pooling, "normalize": normalize, "layer": layer,
                            "hidden_state_format": "base64"}
    if device is not None:
        body["device"] = device
    return body


def _embedding(response: httpx.Response) -> Any:
    answer = parse_json(response)
    return decode_array({"data": answer["embedding"], "dtype": answer.get("dtype")}).reshape(-1)


def _embeddings(response: httpx.Response) -> Any:
    import numpy as np

    answer = parse_json(response)
    rows = [decode_array({"data": e, "dtype": answer.get("dtype")}).reshape(-1) for e in answer["embeddings"]]
    return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)


def _batch_body(prompts: Sequence[str], model: str, fields: dict[str, Any]) -> dict[str, Any]:
    from loom.client.bodies import generation_fields  # bodies.py imports this module

    body = generation_fields(model, fields.pop("max_tokens", None), fields.pop("temperature", None),
                              fields.pop("top_p", None), fields.pop("return_hidden_states", False),
                              fields.pop("hidden_state_layers", None), fields.pop("device", None), False, fields)
    body["prompts"] = list(prompts)
    return body


def _batch(response: httpx.Response) -> GenerateBatchResult:
    return parse(GenerateBatchResult, response)


class ResearchMethods:
    """LoomClient's embedding and batch calls (a mixin: uses the client's `_call`)."""

    def embed(self, text: str, model: str = "", *, pooling: str = "last_token", normalize: bool = False,
              layer: int = -1, device: str | None = None) -> Any:
        """One text's embedding: numpy float32 [H]."""
        body = {**_embed_body(model, pooling, normalize, layer, device), "text": text}
        return _embedding(self._call("POST", "/embed", body))  # type: ignore[attr-defined]

    def embed_batch(self, texts: Sequence[str], model: str = "", *, pooling: str = "last_token",
                    normalize: bool = False, layer: int = -1, device: str | None = None) -> Any:
        """Many texts' embeddings, prefilled together: numpy float32 [len(texts), H]."""
        body = {**_embed_body(model, pooling, normalize, layer, device), "texts": list(texts)}
        return _embeddings(self._call("POST", "/embed/batch", body))  # type: ignore[attr-defined]

    def generate_batch(self, prompts: Sequence[str], model: str = "", **fields: Any) -> GenerateBatchResult:
        """Every prompt through the server's batch at once; `fields` as for `generate`.
        A bad prompt's entry is a BatchError; the others are GenerateResults."""
        body = _batch_body(prompts, model, fields)
        return _batch(self._call("POST", "/generate/batch", body))  # type: ignore[attr-defined]


class AsyncResearchMethods:
    """AsyncLoomClient's embedding and batch calls, awaited."""

    async def embed(self, text: str, model: str = "", *, pooling: str = "last_token", normalize: bool = False,
                    layer: int = -1, device: str | None = None) -> Any:
        body = {**_embed_body(model, pooling, normalize, layer, device), "text": text}
        return _embedding(await self._call("POST", "/embed", body))  # type: ignore[attr-defined]

    async def embed_batch(self, texts: Sequence[str], model: str = "", *, pooling: str = "last_token",
                          normalize: bool = False, layer: int = -1, device: str | None = None) -> Any:
        body = {**_embed_body(model, pooling, normalize, layer, device), "texts": list(texts)}
        return _embeddings(await self._call("POST", "/embed/batch", body))  # type: ignore[attr-defined]

    async def generate_batch(self, prompts: Sequence[str], model: str = "", **fields: Any) -> GenerateBatchResult:
        body = _batch_body(prompts, model, fields)
        return _batch(await self._call("POST", "/generate/batch", body))  # type: ignore[attr-defined]
