"""A broker, workers and API processes started one by one, as supervisord runs them (for the operations tests)."""
from __future__ import annotations

import json
import os
import signal
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


class WorkerZygote:
    """Starts `loom worker` processes by fork from a parent that has imported torch (tests/worker_zygote.py)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.worker_zygote"], cwd=REPO, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
        self.live: set[int] = set()

    def _ask(self, command: dict) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the worker zygote exited with {self.proc.poll()}"
        return json.loads(line)

    def worker(self, backend: str, models: list[str], cwd: Path, log: Path) -> int:
        argv = ["worker", "--broker", backend, "--device", "cpu", "--threads", "1"]
        for m in models:
            argv += ["--model", m]
        pid = self._ask({"fork": argv, "cwd": str(cwd), "log": str(log)})["pid"]
        self.live.add(pid)
        return pid

    def alive(self, pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except OSError:
            return False

    def stop(self, pid: int) -> int:
        """SIGTERM the worker; its exit code."""
        os.kill(pid, signal.SIGTERM)
        self.live.discard(pid)
        return self._ask({"wait": pid})["code"]

    def close(self) -> None:
        for pid in self.live:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.live.clear()
        stop_group(self.proc)
