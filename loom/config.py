"""Defaults shared by every process: addresses, logging, environment names."""
from __future__ import annotations

import os

DEFAULT_FRONTEND = "tcp://127.0.0.1:5555"  # API processes connect here
DEFAULT_BACKEND = "tcp://127.0.0.1:5556"  # workers connect here
DEFAULT_MODEL = "loom-tiny"


def env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def setup_logging(process: str, level: str | None = None, fmt: str | None = None) -> None:
    """One line per event, naming the process (and the request), so interleaved logs stay readable."""
    from loom.logs import configure

    level = (level or env("LOOM_LOG_LEVEL", "INFO") or "INFO").upper()
    configure(process, level, fmt or env("LOOM_LOG_FORMAT", "text") or "text")


def add_common_arguments(parser) -> None:
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR (env LOOM_LOG_LEVEL; default INFO)")
    parser.add_argument("--log-format", default=None, choices=["text", "json"],
                        help="text lines, or one JSON object per line (env LOOM_LOG_FORMAT; default text)")
