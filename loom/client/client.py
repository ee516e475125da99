"""`LoomClient` and `AsyncLoomClient`: the HTTP contract as Python calls.

    with LoomClient("http://127.0.0.1:8080") as loom:
        print(loom.chat([{"role": "user", "content": "Hi"}]).text)
        with loom.stream_chat([{"role": "user", "content": "Count to 5."}]) as stream:
            for event in stream:
                if isinstance(event, TextDelta):
                    print(event.text, end="", flush=True)

Both clients share everything except the I/O: request bodies and error
decoding live in module functions below.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from loom.client.analysis import AnalysisMethods, AsyncAnalysisMethods
from loom.client.errors import LoomConnectionError, LoomHTTPError, LoomProtocolError, LoomStreamError
from loom.client.models import ChatResult, GenerateResult, Health, LoadResult, ModelsList
from loom.client.patching import AsyncPatchMixin, PatchMixin
from loom.client.research import AsyncResearchMethods, ResearchMethods, research_fields
from loom.client.streams import AsyncEventStream, EventStream

__all__ = ["DEFAULT_URL", "LoomClient", "AsyncLoomClient"]

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_CONNECT_TIMEOUT = 5.0
# A health probe should answer fast even when the client waits forever for tokens.
HEALTH_TIMEOUT = 10.0

T = TypeVar("T", bound=BaseModel)
Messages = Sequence[Mapping[str, str]]
Layers = str | int | Sequence[int] | None


# --- request bodies ----------------------------------------------------------


def _generation_fields(
    model: str,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    return_hidden_states: bool,
    hidden_state_layers: Layers,
    device: str | None,
    stream: bool,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    # Fields left as None are left out so that the server's defaults apply;
    # return_hidden_states is left out when false, as Weaver does.
    if isinstance(hidden_state_layers, Sequence) and not isinstance(hidden_state_layers, str):
        hidden_state_layers = list(hidden_state_layers)  # a tuple or range must travel as a JSON list
    body: dict[str, Any] = {"model": model}
    optional = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "hidden_state_layers": hidden_state_layers,
        "device": device,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if return_hidden_states:
        body["return_hidden_states"] = True
    if stream:
        body["stream"] = True
    body.update(research_fields(extra))  # hidden_state_positions, logprobs, logit_lens, steering, ...
    return body


def _model_path(model_id: str) -> str:
    # The contract lets "/" in an id travel as "--", which keeps it one path segment.
    return "/models/" + quote(model_id.replace("/", "--"), safe="")


def _http_error(response: httpx.Response) -> LoomHTTPError:
    """The server's own words for a failed request, from whichever error
    shape it used: ours ({"error": {"type", "message"}}) or FastAPI's
    ({"detail": ...})."""
    message: str | None = None
    error_type: str | None = None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = error.get("message") or None
            error_type = error.get("type") or None
        elif isinstance(error, str):
            message = error
        elif "detail" in body:
            message = _format_detail(body["detail"])
        elif isinstance(body.get("message"), str):
            message = body["message"]
    if not message:
        text = response.text.strip()
        message = text[:300] if text else (response.reason_phrase or "request failed")
    return LoomHTTPError(response.status_code, message, error_type)


def _format_detail(detail: Any) -> str:
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):  # FastAPI validation errors
        parts = []
        for item in detail:
            if isinstance(item, dict) and "msg" in item:
                where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                parts.append(f"{where}: {item['msg']}" if where else str(item["msg"]))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    if isinstance(detail, dict) and isinstance(detail.get("message"), str):
        return detail["message"]
    return json.dumps(detail)


def _reason(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    text = str(exc)
    if "refused" in text.lower():
        return "connection refused"
    return text or type(exc).__name__


def _is_event_stream(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")


def _not_a_stream(response: httpx.Response) -> LoomStreamError:
    """For a 200 that is not an event stream (the body must have been read)."""
    content_type = response.headers.get("content-type") or "no content type"
    return LoomStreamError(
        f"expected an event stream, got {content_type}: {response.text[:200]!r}",
        error_type="protocol_error",
    )


def _parse(model: type[T], response: httpx.Response) -> T:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise _unexpected(response) from exc


def _parse_json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise _unexpected(response) from exc


def _unexpected(response: httpx.Response) -> LoomProtocolError:
    return LoomProtocolError(
        f"unexpected answer from {response.request.method} {response.request.url} "
        f"(is this a Loom server?): {response.text[:200]!r}"
    )


def _health(response: httpx.Response) -> Health:
    if response.status_code != 503:
        return _parse(Health, response)
    # 503 means no worker is alive; keep whatever the body says about why.
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text}
    if not isinstance(body, dict):
        body = {"detail": body}
    try:
        return Health.model_validate({"status": "unhealthy", **body})
    except ValidationError:
        return Health(status="unhealthy", detail=body)


def _headers(api_key: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(headers or {})
    if api_key:
        merged["Authorization"] = f"Bearer {api_key}"
    return merged


def _timeout(connect_timeout: float | None, read_timeout: float | None) -> httpx.Timeout:
    # No read timeout by default: a token may take a long time to come, and a
    # model load can take minutes.
    return httpx.Timeout(read_timeout, connect=connect_timeout)


# --- the sync client ---------------------------------------------------------


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
            headers=_headers(api_key, headers),
            timeout=_timeout(connect_timeout, read_timeout),
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
        return _health(response)

    def models(self) -> ModelsList:
        return _parse(ModelsList, self._call("GET", "/models"))

    def load_model(self, model: str, dtype: str = "auto", device: str | None = None) -> LoadResult:
        body: dict[str, Any] = {"model": model, "dtype": dtype}
        if device is not None:
            body["device"] = device
        return _parse(LoadResult, self._call("POST", "/models/load", body))

    def unload_model(self, model_id: str) -> Any:
        return _parse_json(self._call("DELETE", _model_path(model_id)))

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
        body = _generation_fields(model, max_tokens, temperature, top_p, return_hidden_states, hidden_state_layers, device, False, extra)
        body["messages"] = [dict(m) for m in messages]
        return _parse(ChatResult, self._call("POST", "/v1/chat/completions", body))

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
        body = _generation_fields(model, max_tokens, temperature, top_p, return_hidden_states, hidden_state_layers, device, True, extra)
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
        body = _generation_fields(model, max_tokens, temperature, top_p, return_hidden_states, hidden_state_layers, device, False, extra)
        body["prompt"] = prompt
        return _parse(GenerateResult, self._call("POST", "/generate", body))

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
        body = _generation_fields(model, max_tokens, temperature, top_p, return_hidden_states, hidden_state_layers, device, True, extra)
        body["prompt"] = prompt
        return self._stream("/generate", body, raise_on_error)

    # plumbing

    def _call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return self._send(self._http.build_request(method, path, json=body))

    def _send(self, request: httpx.Request, *, stream: bool = False, ok: tuple[int, ...] = ()) -> httpx.Response:
        try:
            response = self._http.send(request, stream=stream)
        except httpx.TransportError as exc:
            raise LoomConnectionError(self.base_url, _reason(exc)) from exc
        if response.status_code >= 400 and response.status_code not in ok:
            try:
                response.read()
            finally:
                response.close()
            raise _http_error(response)
        return response

    def _stream(self, path: str, body: dict[str, Any], raise_on_error: bool) -> EventStream:
        request = self._http.build_request("POST", path, json=body, headers={"Accept": "text/event-stream"})

        def open_response() -> httpx.Response:
            response = self._send(request, stream=True)
            if not _is_event_stream(response):
                try:
                    response.read()
                finally:
                    response.close()
                raise _not_a_stream(response)
            return response

        return EventStream(open_response, raise_on_error=raise_on_error)


# --- the async client --------------------------------------------------------


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
            headers=_headers(api_key, headers),
            timeout=_timeout(connect_timeout, read_timeout),
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
        return _health(response)

    async def models(self) -> ModelsList:
        return _parse(ModelsList, await self._call("GET", "/models"))

    async def load_model(self, model: str, dtype: str = "auto", device: str | None = None) -> LoadResult:
        body: dict[str, Any] = {"model": model, "dtype": dtype}
        if device is not None:
            body["device"] = device
        return _parse(LoadResult, await self._call("POST", "/models/load", body))

    async def unload_model(self, model_id: str) -> Any:
        return _parse_json(await self._call("DELETE", _model_path(model_id)))

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
        body = _generation_fields(model, max_tokens, temperature, top_p, return_hidden_states, hidden_state_layers, device, False, extra)
        body["messages"] = [dict(m) for m in messages]
        return _parse(ChatResult, await self._call("POST", "/v1/chat/completions", body))

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
        body = _generation_fields(model, max_tokens, temperature, top_p, return_hidden_states, hidden_state_layers, device, True, extra)
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
        body = _generation_fields(model, max_tokens, temperature, top_p, return_hidden_states, hidden_state_layers, device, False, extra)
        body["prompt"] = prompt
        return _parse(GenerateResult, await self._call("POST", "/generate", body))

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
        body = _generation_fields(model, max_tokens, temperature, top_p, return_hidden_states, hidden_state_layers, device, True, extra)
        body["prompt"] = prompt
        return self._stream("/generate", body, raise_on_error)

    async def _call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return await self._send(self._http.build_request(method, path, json=body))

    async def _send(self, request: httpx.Request, *, stream: bool = False, ok: tuple[int, ...] = ()) -> httpx.Response:
        try:
            response = await self._http.send(request, stream=stream)
        except httpx.TransportError as exc:
            raise LoomConnectionError(self.base_url, _reason(exc)) from exc
        if response.status_code >= 400 and response.status_code not in ok:
            try:
                await response.aread()
            finally:
                await response.aclose()
            raise _http_error(response)
        return response

    def _stream(self, path: str, body: dict[str, Any], raise_on_error: bool) -> AsyncEventStream:
        request = self._http.build_request("POST", path, json=body, headers={"Accept": "text/event-stream"})

        async def open_response() -> httpx.Response:
            response = await self._send(request, stream=True)
            if not _is_event_stream(response):
                try:
                    await response.aread()
                finally:
                    await response.aclose()
                raise _not_a_stream(response)
            return response

        return AsyncEventStream(open_response, raise_on_error=raise_on_error)
