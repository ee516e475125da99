"""`AsyncLoomClient`: the asyncio twin of `LoomClient` (sync_client.py).

    async with AsyncLoomClient("http://127.0.0.1:8080") as loom:
        print((await loom.chat([{"role": "user", "content": "Hi"}])).text)
        async with loom.stream_chat([{"role": "user", "content": "Count to 5."}]) as stream:
            async for event in stream:
                ...
"""
from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

import httpx

from loom.client.analysis import AsyncAnalysisMethods
from loom.client.bodies import Layers, Messages, generation_fields, model_path
from loom.client.connection import (DEFAULT_CONNECT_TIMEOUT, DEFAULT_URL, HEALTH_TIMEOUT, client_headers,
                                    client_timeout, transport_reason)
from loom.client.errors import LoomConnectionError
from loom.client.models import ChatResult, GenerateResult, Health, LoadResult, ModelsList
from loom.client.patching import AsyncPatchMixin
from loom.client.research import AsyncResearchMethods
from loom.client.responses import health_answer, http_error, is_event_stream, not_a_stream, parse, parse_json
from loom.client.streams import AsyncEventStream

__all__ = ["AsyncLoomClient"]


class AsyncLoomClient(AsyncPatchMixin, AsyncAnalysisMethods, AsyncResearchMethods):
    """The asyncio twin of `LoomClient`; the same methods, awaited. Stream
    methods return an `AsyncEventStream` to use with `async with`."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=client_headers(api_key, headers),
            timeout=client_timeout(connect_timeout, read_timeout),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncLoomClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def health(self) -> Health:
        response = await self._send(self._http.build_request("GET", "/health", timeout=HEALTH_TIMEOUT), ok=(503,))
        return health_answer(response)

    async def models(self) -> ModelsList:
        return parse(ModelsList, await self._call("GET", "/models"))

    async def load_model(self, model: str, dtype: str = "auto", device: str | None = None) -> LoadResult:
        body: dict[str, Any] = {"model": model, "dtype": dtype}
        if device is not None:
            body["device"] = device
        return parse(LoadResult, await self._call("POST", "/models/load", body))

    async def unload_model(self, model_id: str) -> Any:
        return parse_json(await self._call("DELETE", model_path(model_id)))

    async def chat(
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
        return parse(ChatResult, await self._call("POST", "/v1/chat/completions", body))

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
    ) -> AsyncEventStream:
        body = generation_fields(model, max_tokens, temperature, top_p, return_hidden_states, hidden_state_layers, device, True, extra)
        body["messages"] = [dict(m) for m in messages]
        return self._stream("/v1/chat/completions", body, raise_on_error)

    async def generate(
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
        return parse(GenerateResult, await self._call("POST", "/generate", body))

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
    ) -> AsyncEventStream:
        body = generation_fields(model, max_tokens, temperature, top_p, return_hidden_states, hidden_state_layers, device, True, extra)
        body["prompt"] = prompt
        return self._stream("/generate", body, raise_on_error)

    async def _call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return await self._send(self._http.build_request(method, path, json=body))

    async def _send(self, request: httpx.Request, *, stream: bool = False, ok: tuple[int, ...] = ()) -> httpx.Response:
        try:
            response = await self._http.send(request, stream=stream)
        except httpx.TransportError as exc:
            raise LoomConnectionError(self.base_url, transport_reason(exc)) from exc
        if response.status_code >= 400 and response.status_code not in ok:
            try:
                await response.aread()
            finally:
                await response.aclose()
            raise http_error(response)
        return response

    def _stream(self, path: str, body: dict[str, Any], raise_on_error: bool) -> AsyncEventStream:
        request = self._http.build_request("POST", path, json=body, headers={"Accept": "text/event-stream"})

        async def open_response() -> httpx.Response:
            response = await self._send(request, stream=True)
            if not is_event_stream(response):
                try:
                    await response.aread()
                finally:
                    await response.aclose()
                raise not_a_stream(response)
            return response

        return AsyncEventStream(open_response, raise_on_error=raise_on_error)
