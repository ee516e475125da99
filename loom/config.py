"""Defaults shared by every process: addresses, logging, environment names."""
from __future__ import annotations

import logging
import os
import sys

DEFAULT_FRONTEND = "tcp://127.0.0.1:5555"  # API processes connect here
DEFAULT_BACKEND = "tcp://127.0.0.1:5556"  # workers connect here
DEFAULT_MODEL = "loom-tiny"


def env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def setup_logging(process: str, level: str | None = None) -> None:
    """One line per event, naming the process, so interleaved logs stay readable."""
    level = (level or env("LOOM_LOG_LEVEL", "INFO") or "INFO").upper()
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {process}[%(process)d] %(message)s",
        datefmt="%H:%M:%S",
    )


def add_common_arguments(parser) -> None:
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR (env LOOM_LOG_LEVEL; default INFO)")
