"""Finding and loading Hugging Face causal LMs.

Every model, the bundled one included, loads through the same
`AutoModelForCausalLM.from_pretrained` path. Where a model may come from is a
security decision: a request may name a hub id or a model inside one of the
configured model directories, never an arbitrary filesystem path.
"""
from __future__ import annotations

import inspect
import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
# Imported here, once, not in the loader threads: two threads importing
# transformers at the same time can see a half-initialised module.
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.byte_detokenizer import byte_table

log = logging.getLogger("loom.worker")

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# The models bundled with Loom live in the repository's models/ directory.
BUNDLED_MODEL_DIR = Path(__file__).resolve().parents[1] / "models"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelLoadError(Exception):
    """A model that cannot be loaded; `error_type` is a protocol ErrorType."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


@dataclass
class LoadedModel:
    model_id: str
    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    hidden_size: int
    num_layers: int
    max_context: int
    eos_ids: set[int]
    load_time_s: float
    source: str
    # Keyword the model's forward takes for the KV cache ("cache" in
    # transformers >= 5.2x, "past_key_values" before).
    cache_kwarg: str = "past_key_values"
    accepts_logits_to_keep: bool = False
    aliases: list[str] = field(default_factory=list)  # every name it answers to (loom/model_names.py)
    # Each token's bytes when the tokenizer is plainly byte-level (workers/byte_detokenizer.py), else None.
    byte_table: list[bytes] | None = None

    def info(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "device": str(self.device),
            "dtype": DTYPE_NAMES.get(self.dtype, str(self.dtype)),
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "max_context": self.max_context,
            "load_time_seconds": round(self.load_time_s, 3),
            "loader_type": "transformers",
            "source": self.source,
            "aliases": self.aliases or [self.model_id],
        }


def resolve_source(model: str, model_dirs: list[Path], allow_any_path: bool = False) -> str:
    """Where to load `model` from: a directory path, or a hub id.

    A bare name found in a model directory wins over the hub. Paths
    (absolute, or relative to this worker's directory) are accepted only
    inside a model directory (or anywhere when the operator named the model
    on the command line: `allow_any_path`).
    """
    model = model.strip()
    if not model:
        raise ModelLoadError("invalid_request_error", "model must not be empty")
    if allow_any_path and Path(model).expanduser().is_dir():
        return str(Path(model).expanduser().resolve())
    for root in model_dirs:
        root = root.resolve()
        # `..` or a symlink could escape the directory: only what resolves inside it counts.
        for candidate in ((root / model).resolve(), Path(model).resolve()):
            if candidate != root and root in candidate.parents and (candidate / "config.json").is_file():
                return str(candidate)
    if os.sep in model.replace("/", "", 1) or model.startswith((".", "/", "~")) or ".." in model:
        raise ModelLoadError(
            "model_not_found",
            f"model {model!r} is not a hub id and not a model in the configured model "
            f"directories ({', '.join(str(d) for d in model_dirs) or 'none'}); put it in one "
            "of them (--model-dir) and load it by its directory name",
        )
    if not _HUB_ID.match(model):
        raise ModelLoadError("model_not_found", f"model {model!r} is not a valid hub id")
    return model


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face Hub answers at all, so offline fails in seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = re.sub(r"^https?://", "", endpoint).split("/")[0]
    port = 443 if endpoint.startswith("https") else 80
    if ":" in host:
        host, port_s = host.rsplit(":", 1)
        port = int(port_s)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _from_pretrained(cls: Any, source: str, local_only: bool, **kwargs: Any) -> Any:
    return cls.from_pretrained(source, local_files_only=local_only, **kwargs)


def load_model(model_id: str, source: str, dtype: str, device: str, trust_remote_code: bool = False) -> LoadedModel:
    if dtype not in ("auto", *DTYPES):
        raise ModelLoadError("invalid_request_error", f"dtype must be auto, float16, bfloat16 or float32, not {dtype!r}")
    is_local = Path(source).is_dir()
    t0 = time.perf_counter()
    local_only = is_local
    if not is_local:
        # Prefer the local cache; only go to the Hub when it is reachable, so a
        # machine without internet gets a clear answer within seconds.
        try:
            AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=trust_remote_code)
            local_only = True
        except Exception:
            if not hub_reachable():
                raise ModelLoadError(
                    "model_not_found",
                    f"model {source!r} is not available offline: it is not in the Hugging Face cache "
                    "and the Hub cannot be reached. Download it on a connected machine "
                    f"(`huggingface-cli download {source}`) and copy the cache (HF_HOME), or save it "
                    "into a model directory (--model-dir) and load it by its directory name.",
                ) from None
    torch_dtype = _pick_dtype(dtype, device)
    try:
        tokenizer = _from_pretrained(AutoTokenizer, source, local_only, trust_remote_code=trust_remote_code)
        model = _load_weights(AutoModelForCausalLM, source, local_only, torch_dtype, trust_remote_code)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError("model_load_error", f"could not load {model_id!r}: {_first_line(exc)}") from None
    model.to(device)
    model.eval()
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    eos_ids = _eos_ids(model, tokenizer)
    forward_params = inspect.signature(model.forward).parameters
    loaded = LoadedModel(
        model_id=model_id,
        model=model,
        tokenizer=tokenizer,
        device=torch.device(device),
        dtype=next(model.parameters()).dtype,
        hidden_size=int(text_config.hidden_size),
        num_layers=int(text_config.num_hidden_layers),
        max_context=int(getattr(text_config, "max_position_embeddings", 0) or 2048),
        eos_ids=eos_ids,
        load_time_s=time.perf_counter() - t0,
        source=source,
        cache_kwarg="cache" if "cache" in forward_params else "past_key_values",
        accepts_logits_to_keep="logits_to_keep" in forward_params,
        byte_table=byte_table(tokenizer),
    )
    return loaded


def _load_weights(cls: Any, source: str, local_only: bool, torch_dtype: torch.dtype, trust: bool) -> Any:
    # transformers 5 calls the argument `dtype`; 4.x called it `torch_dtype`.
    try:
        return _from_pretrained(cls, source, local_only, dtype=torch_dtype, trust_remote_code=trust)
    except TypeError:
        return _from_pretrained(cls, source, local_only, torch_dtype=torch_dtype, trust_remote_code=trust)


def _pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # Half precision on CPU is slow and often unsupported: compute in float32.
    return torch.float32


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
