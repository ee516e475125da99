"""API process settings, from `loom api` flags or the environment."""
from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path

from loom.config import DEFAULT_FRONTEND, env


@dataclass
class Settings:
    broker: str = DEFAULT_FRONTEND
    default_model: str | None = None
    api_key: str | None = None
    curve: Namespace | None = None  # CURVE client settings for the broker connection
    required_models: list[str] = field(default_factory=list)  # /health is 503 until these are loaded
    drain_timeout: float = 30.0  # seconds running requests get to finish after SIGTERM
    broker_wait_s: float = 0.0  # at start, how long to wait for the broker before serving
    direct_replies: bool = True  # workers on this host send generations' frames straight here (api/reply_socket.py)

    @classmethod
    def from_env(cls) -> "Settings":
        keys = env("LOOM_CURVE_KEYS")
        return cls(
            broker=env("LOOM_BROKER_FRONTEND", DEFAULT_FRONTEND) or DEFAULT_FRONTEND,
            default_model=env("LOOM_DEFAULT_MODEL"),
            api_key=read_api_key(env("LOOM_API_KEY"), env("LOOM_API_KEY_FILE")),
            curve=Namespace(curve_keys=Path(keys), curve_name=env("LOOM_CURVE_NAME", "client")) if keys else None,
            required_models=required_models_from_env(),
            drain_timeout=float(env("LOOM_DRAIN_TIMEOUT", "30") or 30),
            direct_replies=env("LOOM_DIRECT_REPLIES", "1") != "0",
        )


def required_models_from_env() -> list[str]:
    """LOOM_REQUIRE_MODELS: model names separated by commas."""
    return [m.strip() for m in (env("LOOM_REQUIRE_MODELS", "") or "").split(",") if m.strip()]


def read_api_key(key: str | None, key_file: str | None) -> str | None:
    if key:
        return key.strip()
    if key_file:
        text = Path(key_file).read_text().strip()
        if not text:
            raise SystemExit(f"API key file {key_file} is empty")
        return text
    return None
