"""`loom chat` settings, first to last: flags, a --backend chosen from the
Weaver backends file, $LOOM_URL / $LOOM_API_KEY, the file's first backend,
defaults."""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loom.client import DEFAULT_URL

DEFAULT_CONFIG = Path("~/.config/loom/chat.yaml")
DEFAULT_MAX_TOKENS = 1024  # what Weaver sends; the server's own default (256) cuts answers short


class UsageError(Exception):
    """A problem with the flags or the config file: exit 2."""


@dataclass
class Settings:
    url: str
    model: str
    api_key: str | None
    max_tokens: int
    temperature: float | None
    system: str | None
    hidden: bool


def resolve_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    backend, chosen = _load_backend(args.config, args.backend)
    # A backend named with --backend beats the environment; one picked only
    # because it comes first in the file does not.
    explicit = backend if chosen else {}
    implicit = {} if chosen else backend

    def pick(flag: Any, key: str, env: str | None, default: Any) -> Any:
        for value in (flag, explicit.get(key), environ.get(env) if env else None, implicit.get(key)):
            if value is not None:
                return value
        return default

    return Settings(
        url=str(pick(args.url, "url", "LOOM_URL", DEFAULT_URL)),
        model=str(pick(args.model, "model", None, "")),
        api_key=pick(args.api_key, "api_key", "LOOM_API_KEY", None),
        max_tokens=args.max_tokens if args.max_tokens is not None else DEFAULT_MAX_TOKENS,
        temperature=args.temperature,
        system=args.system,
        hidden=args.hidden,
    )


def _load_backend(path: Path | None, name: str | None) -> tuple[dict[str, Any], bool]:
    """The chosen backend's settings, and whether --backend chose it."""
    if path is None:
        default = DEFAULT_CONFIG.expanduser()
        if not default.is_file():
            if name:
                raise UsageError(f"--backend {name} needs a config file, and there is none at {default}")
            return {}, False
        path = default

    import yaml  # only when there is a config to read

    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"config {path} is not valid YAML: {exc}") from exc

    backends = document.get("backends") if isinstance(document, dict) else None
    if not isinstance(backends, list) or not all(isinstance(b, dict) for b in backends):
        raise UsageError(f"config {path} needs a `backends:` list of {{name, type, url, model}} entries")
    if not backends:
        raise UsageError(f"config {path} lists no backends")
    if name:
        matches = [b for b in backends if b.get("name") == name]
        if not matches:
            names = ", ".join(str(b.get("name")) for b in backends)
            raise UsageError(f"no backend named {name!r} in {path} (it has: {names})")
        backend = matches[0]
    else:
        backend = backends[0]
    kind = backend.get("type", "loom")
    if kind != "loom":
        raise UsageError(f"backend {backend.get('name')!r} in {path} has type {kind!r}; loom chat only talks to type: loom")
    return backend, bool(name)
