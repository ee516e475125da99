"""How both clients reach a server: the default address, timeouts, auth
headers, and a person-readable reason when the connection fails."""
from __future__ import annotations

from collections.abc import Mapping

import httpx

__all__ = ["DEFAULT_URL", "DEFAULT_CONNECT_TIMEOUT", "HEALTH_TIMEOUT", "client_headers", "client_timeout",
           "transport_reason"]

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_CONNECT_TIMEOUT = 5.0
# A health probe should answer fast even when the client waits forever for tokens.
HEALTH_TIMEOUT = 10.0


def client_headers(api_key: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(headers or {})
    if api_key:
        merged["Authorization"] = f"Bearer {api_key}"
    return merged


def client_timeout(connect_timeout: float | None, read_timeout: float | None) -> httpx.Timeout:
    # No read timeout by default: a token may take a long time to come, and a
    # model load can take minutes.
    return httpx.Timeout(read_timeout, connect=connect_timeout)


def transport_reason(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    text = str(exc)
    if "refused" in text.lower():
        return "connection refused"
    return text or type(exc).__name__
