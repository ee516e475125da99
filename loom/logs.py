"""Log lines for every process: text or JSON, each naming the request it is about.

The request id lives in a context variable. The API sets it for the life of
an HTTP request, the broker while it handles one message, the worker's
engine while it handles one request; a logging filter copies it onto every
record, so no log call has to pass it along.
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import sys
from typing import Iterator

FORMATS = ("text", "json")

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("loom_request_id", default="")


def current_request_id() -> str:
    return _request_id.get()


def set_request_id(request_id: str) -> contextvars.Token:
    return _request_id.set(request_id)


def reset_request_id(token: contextvars.Token) -> None:
    _request_id.reset(token)


@contextlib.contextmanager
def request_context(request_id: str) -> Iterator[None]:
    """Log lines inside this block name `request_id` (none when it is empty)."""
    token = _request_id.set(request_id or "")
    try:
        yield
    finally:
        _request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Puts the current request id on each record (a record given one with `extra` keeps it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = _request_id.get()
        return True


class TextFormatter(logging.Formatter):
    """`12:00:01 INFO api[123] [req-id] message`: the request part only when there is one."""

    def __init__(self, process: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {process}[%(process)d] %(request_tag)s%(message)s",
                         datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", "")
        record.request_tag = f"[{rid}] " if rid else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, process, pid, request_id, logger, message."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process_name = process

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
                            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "process": self.process_name,
            "pid": record.process,
            "request_id": getattr(record, "request_id", "") or None,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(process: str, level: str, fmt: str = "text") -> None:
    """Replace the root logger's handlers with one stderr handler in `fmt`."""
    if fmt not in FORMATS:
        raise SystemExit(f"--log-format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process) if fmt == "json" else TextFormatter(process))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
