"""Reading the server's answers, for both clients: typed bodies, and the
server's own words for a failure whichever error shape it used."""
from __future__ import annotations

import json
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from loom.client.errors import LoomHTTPError, LoomProtocolError, LoomStreamError
from loom.client.models import Health

__all__ = ["parse", "parse_json", "health_answer", "http_error", "is_event_stream", "not_a_stream"]

T = TypeVar("T", bound=BaseModel)


def parse(model: type[T], response: httpx.Response) -> T:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise _unexpected(response) from exc


def parse_json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise _unexpected(response) from exc


def _unexpected(response: httpx.Response) -> LoomProtocolError:
    return LoomProtocolError(
        f"unexpected answer from {response.request.method} {response.request.url} "
        f"(is this a Loom server?): {response.text[:200]!r}"
    )


def health_answer(response: httpx.Response) -> Health:
    if response.status_code != 503:
        return parse(Health, response)
    # 503: no worker is alive, or the required models are still loading
    # ("starting"); keep whatever the body says about why.
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


def http_error(response: httpx.Response) -> LoomHTTPError:
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


def is_event_stream(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")


def not_a_stream(response: httpx.Response) -> LoomStreamError:
    """For a 200 that is not an event stream (the body must have been read)."""
    content_type = response.headers.get("content-type") or "no content type"
    return LoomStreamError(
        f"expected an event stream, got {content_type}: {response.text[:200]!r}",
        error_type="protocol_error",
    )
