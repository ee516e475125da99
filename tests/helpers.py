"""Starting and stopping real Loom stacks, and reading their streams, for tests."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "loom-tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    """A `loom serve` process group on free loopback ports."""

    url: str
    default_model: str
    proc: subprocess.Popen
    log_path: Path
    args: list[str] = field(default_factory=list)

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=httpx.Timeout(60, connect=5), **kw)

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def workers(self) -> list[dict[str, Any]]:
        return self.health().get("workers", [])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_group(self.proc)


def stop_group(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the process group, then SIGKILL what is left: no orphans."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the group, if any
    except ProcessLookupError:
        pass
    proc.wait()


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the server may not be up yet
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc})")


def start_stack(tmp: Path, model: str | None, model_dirs: list[Path] = (), extra: list[str] = (),
                env: dict[str, str] | None = None, ready_timeout: float = 90) -> Stack:
    """Start `loom serve`; `model` None means its default (the bundled loom-tiny)."""
    port = free_port()
    log_path = tmp / f"serve-{port}.log"
    args = [sys.executable, "-m", "loom", "serve", "--port", str(port), *extra]
    if model is not None:
        args += ["--model", model]
    model = model or "loom-tiny"
    for d in model_dirs:
        args += ["--model-dir", str(d)]
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, cwd=REPO)
    model_id = Path(model).name if Path(model).is_dir() else model
    stack = Stack(url=f"http://127.0.0.1:{port}", default_model=model_id, proc=proc, log_path=log_path, args=args)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"loom serve exited with {proc.returncode}:\n{stack.log()[-3000:]}")
        workers = stack.workers()
        want = int(next((a.split("=")[-1] for a in extra if a.startswith("--workers=")), 1))
        loaded = [w for w in workers if any(m["model_id"] == model_id for m in w["models"])]
        return len(loaded) >= want

    try:
        wait_until(ready, ready_timeout, 0.2, "the stack to load its model")
    except Exception:
        stack.stop()
        raise
    return stack


@dataclass
class Event:
    name: str
    data: dict[str, Any]
    at: float  # time.perf_counter() when the client received it


def sse_events(response: httpx.Response) -> Iterator[Event]:
    """Events as they arrive on a live response (a minimal, strict reader)."""
    name, data = None, []
    buffer = b""
    for chunk in response.iter_raw():
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            line = line.rstrip(b"\r")
            if not line:
                if name is not None:
                    yield Event(name, json.loads(b"\n".join(data)), time.perf_counter())
                name, data = None, []
            elif line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data.append(line[5:].lstrip(b" "))


def stream_chat(client: httpx.Client, body: dict[str, Any]) -> list[Event]:
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(r))


def text_of(events: list[Event]) -> str:
    return "".join(e.data["delta"]["text"] for e in events if e.name == "content_block_delta")


def user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]
