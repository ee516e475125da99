"""A broker, workers and API processes started one by one, as supervisord runs them (for the operations tests)."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.helpers import REPO, free_port, stop_group, wait_until


def spawn(args: list[str], log_path: Path, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.Popen:
    log_file = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "loom", *args], stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=cwd,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(env or {})})


@dataclass
class Parts:
    """Processes of one Loom server, each with its own log file under `logs`."""

    logs: Path
    frontend: str = field(default_factory=lambda: f"tcp://127.0.0.1:{free_port()}")
    backend: str = field(default_factory=lambda: f"tcp://127.0.0.1:{free_port()}")
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, name: str, args: list[str], **kw) -> subprocess.Popen:
        self.procs[name] = spawn(args, self.logs / f"{name}.log", **kw)
        return self.procs[name]

    def broker(self) -> None:
        self.start("broker", ["broker", "--frontend", self.frontend, "--backend", self.backend])

    def worker(self, name: str, models: list[str], cwd: Path = REPO, extra: list[str] = ()) -> subprocess.Popen:
        args = ["worker", "--broker", self.backend, "--device", "cpu", "--threads", "1", *extra]
        for m in models:
            args += ["--model", m]
        return self.start(name, args, cwd=cwd)

    def api(self, name: str, extra: list[str] = (), env: dict[str, str] | None = None) -> str:
        port = free_port()
        self.start(name, ["api", "--port", str(port), "--broker", self.frontend, *extra], env=env)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: self._answers(name, url), 60, 0.1, f"{name} to listen")
        return url

    def _answers(self, name: str, url: str) -> bool:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)[-3000:]}")
        return httpx.get(f"{url}/health", timeout=5).status_code in (200, 503)

    def stop(self, name: str) -> int:
        proc = self.procs.pop(name)
        stop_group(proc)
        return proc.returncode

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)
