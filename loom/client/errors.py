"""Exceptions raised by the Loom client.

Every message is meant to be shown to a person as is: it says what went
wrong and, where there is one, what to do about it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loom.client.models import ErrorEvent

__all__ = ["LoomError", "LoomConnectionError", "LoomHTTPError", "LoomProtocolError", "LoomStreamError"]


class LoomError(Exception):
    """Base class: catch this to handle every client failure."""


class LoomConnectionError(LoomError):
    """The server could not be reached (nothing listening, DNS, timeout)."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(
            f"cannot reach the Loom server at {url} ({reason}). "
            "Is it running? Start one with `loom serve`."
        )


class LoomHTTPError(LoomError):
    """The server answered with an error status."""

    def __init__(self, status_code: int, message: str, error_type: str | None = None) -> None:
        self.status_code = status_code
        self.message = message
        self.error_type = error_type
        super().__init__(f"{message} (HTTP {status_code})")


class LoomProtocolError(LoomError):
    """The server answered 2xx with a body the contract does not allow:
    usually the URL points at something that is not a Loom server."""


class LoomStreamError(LoomError):
    """A stream failed after it started: an `error` event, a dropped
    connection, or an end without the final `message_delta`."""

    def __init__(self, message: str, error_type: str | None = None, event: ErrorEvent | None = None) -> None:
        self.message = message
        self.error_type = error_type
        self.event = event
        super().__init__(f"{error_type}: {message}" if error_type else message)
