"""`loom serve` as a process group on free loopback ports, and a /health poller in its own process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import ENTRY, REPO, free_port, pct, rnd

# --- /health poller, in its own process so the client's event loop does not skew it ---

def health_poll_main(url: str, interval: float) -> None:
    import httpx

    stop = threading.Event()

    def wait_stdin() -> None:
        sys.stdin.read()  # EOF: the parent is done
        stop.set()

    threading.Thread(target=wait_stdin, daemon=True).start()
    lat: list[float] = []
    errors = 0
    with httpx.Client(timeout=5) as c:
        c.get(f"{url}/health")  # connect
        print("ready", flush=True)
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = c.get(f"{url}/health")
                r.raise_for_status()
                lat.append(time.perf_counter() - t0)
            except Exception:
                errors += 1
            rest = interval - (time.perf_counter() - t0)
            if rest > 0:
                stop.wait(rest)
    print(json.dumps({"latencies_s": lat, "errors": errors}), flush=True)


class HealthPoller:
    def __init__(self, url: str, interval: float = 0.02):
        self.proc = subprocess.Popen([sys.executable, str(ENTRY), "--_health-poll", url,
                                      "--_interval", str(interval)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=REPO)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"health poller did not start: {line!r}")

    def finish(self) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=30)
        data = json.loads(out.strip().splitlines()[-1])
        lat = data["latencies_s"]
        return {"n": len(lat), "errors": data["errors"], "p50_ms": rnd(pct(lat, 50) * 1e3 if lat else None),
                "p99_ms": rnd(pct(lat, 99) * 1e3 if lat else None), "max_ms": rnd(max(lat) * 1e3 if lat else None)}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# --- the stack ----------------------------------------------------------------------------

class Stack:
    def __init__(self, models: list[str], log_dir: Path, workers: int = 1, threads: int | None = None):
        import psutil

        self.port = free_port()
        self.frontend = f"tcp://127.0.0.1:{free_port()}"
        self.url = f"http://127.0.0.1:{self.port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"serve-{self.port}.log"
        # One model preloaded; the others are loaded over HTTP after it (see wait_ready).
        argv = [sys.executable, "-m", "loom", "serve", "--port", str(self.port), "--broker-frontend", self.frontend,
                "--workers", str(workers), "--model", models[0]]
        if threads:
            argv += ["--threads", str(threads)]  # the baseline's count, so both compute alike
        for d in sorted({str(Path(m).parent) for m in models}):
            argv += ["--model-dir", d]
        self.model_ids = [Path(m).name for m in models]
        self.n_workers = workers
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "LOOM_LOG_LEVEL": "INFO"})
        self.psutil = psutil
        self.children: dict[str, Any] = {}
        self.workers: list[Any] = []

    def wait_ready(self, timeout: float = 240) -> dict[str, Any]:
        import httpx

        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"loom serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                h = httpx.get(f"{self.url}/health", timeout=2).json()
                ready = [w for w in h.get("workers", []) if any(m["model_id"] == self.model_ids[0]
                                                                 for m in w.get("models", []))]
                if len(ready) >= self.n_workers:
                    break
                last = h
            except Exception as exc:
                last = exc
            time.sleep(0.25)
        else:
            raise TimeoutError(f"stack not ready after {timeout}s (last: {last}):\n{self.log_tail()}")
        # Loaded one at a time: two preloads at once race in the worker (see README, "findings").
        for model_id in self.model_ids[1:]:
            r = httpx.post(f"{self.url}/models/load", json={"model": model_id}, timeout=max(10.0, deadline - time.monotonic()))
            if r.status_code != 200:
                raise RuntimeError(f"loading {model_id} failed: HTTP {r.status_code} {r.text[:500]}")
        self._find_children()
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def _find_children(self) -> None:
        root = self.psutil.Process(self.proc.pid)
        for child in root.children(recursive=True):
            try:
                cmd = child.cmdline()
            except self.psutil.Error:
                continue
            if "-m" in cmd and "loom" in cmd:
                role = cmd[cmd.index("loom") + 1] if cmd.index("loom") + 1 < len(cmd) else "?"
                if role == "worker":
                    self.workers.append(child)
                self.children.setdefault(role, child)

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def workers_rss(self) -> int:
        return sum(w.memory_info().rss for w in self.workers)

    def rss_mb(self, role: str) -> float:
        return self.children[role].memory_info().rss / 2**20

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left: no orphans."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for child in [*self.children.values(), *self.workers]:  # belt and braces: anything that left the group
            try:
                if child.is_running():
                    child.kill()
            except self.psutil.Error:
                pass
        self._log.close()
