"""`LoomClient`: the HTTP contract as blocking Python calls.

    with LoomClient("http://127.0.0.1:8080") as loom:
        print(loom.chat([{"role": "user", "content": "Hi"}]).text)
        with loom.stream_chat([{"role": "user", "content": "Count to 5."}]) as stream:
            for event in stream:
                if isinstance(event, TextDelta):
                    print(event.text, end="", flush=True)

It shares everything but the I/O with `AsyncLoomClient` (async_client.py):
request bodies live in bodies.py, answer decoding in responses.py.
"""
from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

import httpx

from loom.client.analysis import AnalysisMethods
from loom.client.bodies import Layers, Messages, generation_fields, model_path
from loom.client.connection import (DEFAULT_CONNECT_TIMEOUT, DEFAULT_URL, HEALTH_TIMEOUT, client_headers,
                                    client_timeout, transport_reason)
from loom.client.errors import LoomConnectionError
from loom.client.models import ChatResult, GenerateResult, Health, LoadResult, ModelsList
from loom.client.patching import PatchMixin
from loom.client.research import ResearchMethods
from loom.client.responses import health_answer, http_error, is_event_stream, not_a_stream, parse, parse_json
from loom.client.streams import EventStream

__all__ = ["LoomClient"]


class LoomClient(PatchMixin, AnalysisMethods, ResearchMethods):
    """A blocking client for one Loom server."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=client_headers(api_key, headers),
            timeout=client_timeout(connect_timeout, read_timeout),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LoomClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # plain endpoints

    def health(self) -> Health:
        """The server's health. A 503 (no worker alive) is returned, not raised:
        its body says why."""
        response = self._send(self._http.build_request("GET", "/health", timeout=HEALTH_TIMEOUT), ok=(503,))
        return health_answer(response)

    def models(self) -> ModelsList:
        return parse(ModelsList, self._call("GET", "/models"))

    def load_model(self, model: str, dtype: str = "auto", device: str | None = None) -> LoadResult:
        body: dict[str, Any] = {"model": model, "dtype": dtype}
        if device is not None:
            body["device"] = device
        return parse(LoadResult, self._call("POST", "/models/load", body))

    def unload_model(self, model_id: str) -> Any:
        return parse_json(self._call("DELETE", model_path(model_id)))

    # generation

    def chat(
        self,
        messages: Messages,
        model: str = "",
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        return_hidden_states: bool = False,
        hidden_state_layers: Layers = None,
        device: str | None = None,
        **extra: Any,
    ) -> ChatResult:
        body = generation_fields(model, max_tokens, temperature, top_p, return_hidden_states, hidden_state_layers, device, False, extra)
        body["messages"] = [dict(m) for m in messages]
        return parse(ChatResult, self._call("POST", "/v1/chat/completions", body))

    def stream_chat(
        self,
        messages: Messages,
        model: str = "",
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        return_hidden_states: bool = False,
        hidden_state_layers: Layers = None,
        device: str | None = None,
        raise_on_error: bool = True,
        **extra: Any,
    ) -> EventStream:
        body = generation_fields(model, max_tokens, temperature, top_p, return_hidden_states, hidden_state_layers, device, True, extra)
        body["messages"] = [dict(m) for m in messages]
        return self._stream("/v1/chat/completions", body, raise_on_error)

    def generate(
        self,
        prompt: str,
        model: str = "",
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        return_hidden_states: bool = False,
        hidden_state_layers: Layers = None,
        hidden_state_format: str | None = None,
        device: str | None = None,
        **extra: Any,
    ) -> GenerateResult:
        if hidden_state_format is not None:
            extra["hidden_state_format"] = hidden_state_format
        body = generation_fields(model, max_tokens, temperature, top_p, return_hidden_states, hidden_state_layers, device, False, extra)
        body["prompt"] = prompt
        return parse(GenerateResult, self._call("POST", "/generate", body))

    def stream_generate(
        self,
        prompt: str,
        model: str = "",
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        return_hidden_states: bool = False,
        hidden_state_layers: Layers = None,
        device: str | None = None,
        raise_on_error: bool = True,
        **extra: Any,
    ) -> EventStream:
        body = generation_fields(model, max_tokens, temperature, top_p, return_hidden_states, hidden_state_layers, device, True, extra)
        body["prompt"] = prompt
        return self._stream("/generate", body, raise_on_error)

    # plumbing

    def _call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return self._send(self._http.build_request(method, path, json=body))

    def _send(self, request: httpx.Request, *, stream: bool = False, ok: tuple[int, ...] = ()) -> httpx.Response:
        try:
            response = self._http.send(request, stream=stream)
        except httpx.TransportError as exc:
            raise LoomConnectionError(self.base_url, transport_reason(exc)) from exc
        if response.status_code >= 400 and response.status_code not in ok:
            try:
                response.read()
            finally:
                response.close()
            raise http_error(response)
        return response

    def _stream(self, path: str, body: dict[str, Any], raise_on_error: bool) -> EventStream:
        request = self._http.build_request("POST", path, json=body, headers={"Accept": "text/event-stream"})

        def open_response() -> httpx.Response:
            response = self._send(request, stream=True)
            if not is_event_stream(response):
                try:
                    response.read()
                finally:
                    response.close()
                raise not_a_stream(response)
            return response

        return EventStream(open_response, raise_on_error=raise_on_error)
