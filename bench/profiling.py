"""CPU accounting for a running stack: CPU time per process role, and py-spy profiles summarized by where the time goes."""
from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import REPO

# Where a sample's time goes: the first frame, from the leaf up, whose file
# matches one of these (substring of the full path) names it.
CATEGORIES = [
    ("loom/protocol.py", "protocol encode/decode"),
    ("workers/sampling.py", "sampling"),
    ("workers/detokenizer.py", "detokenizer"),
    ("workers/kv_cache.py", "kv cache bookkeeping"),
    ("workers/outbox.py", "worker outbox"),
    ("/transformers/", "transformers (outside a module call)"),
    ("/torch/", "torch (other)"),
    ("/zmq/", "zmq (pyzmq)"),
    ("/msgpack/", "msgpack"),
    ("/json/", "json"),
    ("/uvicorn/", "uvicorn/h11 (HTTP server)"),
    ("/h11/", "uvicorn/h11 (HTTP server)"),
    ("/httptools/", "uvicorn/h11 (HTTP server)"),
    ("/sse_starlette/", "starlette/fastapi"),
    ("/starlette/", "starlette/fastapi"),
    ("/fastapi/", "starlette/fastapi"),
    ("/pydantic", "pydantic"),
    ("/anyio/", "anyio"),
    ("/asyncio/", "asyncio event loop"),
    ("/logging/", "logging"),
    ("/prometheus_client/", "prometheus_client"),
    ("/api/", "api code"),
    ("/broker/", "broker code"),
    ("/workers/", "worker code (other)"),
    ("/loom/", "loom code (other)"),
]


def roles(stack: Any) -> dict[str, list[Any]]:
    """The stack's processes by role (api, broker, worker, ...), from their command lines."""
    import psutil

    out: dict[str, list[Any]] = collections.defaultdict(list)
    for child in psutil.Process(stack.proc.pid).children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "-m" in cmd and "loom" in cmd and cmd.index("loom") + 1 < len(cmd):
            out[cmd[cmd.index("loom") + 1]].append(child)
    return dict(out)


def cpu_seconds(procs: dict[str, list[Any]]) -> dict[str, float]:
    """CPU seconds of every thread of each role's processes.

    From the kernel's nanosecond run time of each thread (/proc/PID/task/*/schedstat) where
    readable: psutil's user + system times tick every 10 ms, ±1 µs a token on a 10k-token run.
    """
    out = {}
    for role, ps in procs.items():
        total = 0.0
        for p in ps:
            threads = thread_cpu_seconds([p])
            if threads:
                total += sum(threads.values())
                continue
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:
                pass
        out[role] = total
    return out


def thread_cpu_seconds(procs: list[Any]) -> dict[int, float]:
    """CPU seconds by thread id (nanosecond run times where readable), for per-thread deltas
    (the busiest is a worker's engine thread). A thread that ends between two readings drops out."""
    out: dict[int, float] = {}
    for p in procs:
        try:
            tids = os.listdir(f"/proc/{p.pid}/task")
        except OSError:  # no /proc: psutil's 10 ms ticks
            try:
                for t in p.threads():
                    out[t.id] = t.user_time + t.system_time
            except Exception:
                pass
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p.pid}/task/{tid}/schedstat") as f:
                    out[int(tid)] = int(f.read().split()[0]) / 1e9
            except (OSError, ValueError, IndexError):
                pass  # the thread ended meanwhile
    return out


def py_spy() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    return str(exe) if exe.exists() else shutil.which("py-spy")


class Profiler:
    """py-spy record (raw collapsed stacks, 100 Hz, non-blocking) on some processes until stop()."""

    def __init__(self, procs: dict[str, list[Any]], out_dir: Path, rate: int = 100):
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed (.venv/bin/pip install py-spy)")
        out_dir.mkdir(parents=True, exist_ok=True)
        self.runs = []
        for role, ps in procs.items():
            for i, p in enumerate(ps):
                path = out_dir / f"{role}-{i}.txt"
                spy = subprocess.Popen([exe, "record", "-p", str(p.pid), "-r", str(rate), "-f", "raw", "-o", str(path),
                                        "--nonblocking", "--nolineno", "--full-filenames"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                self.runs.append((role, path, spy))

    def stop(self) -> dict[str, Path]:
        out = {}
        for role, path, spy in self.runs:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on ^C
        for role, path, spy in self.runs:
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
            if path.exists():
                out.setdefault(role, path)
        return out


def _frames(stack: str) -> list[tuple[str, str]]:
    """(function, file) pairs, root first, of one collapsed stack."""
    out = []
    for frame in stack.split(";"):
        name, _, rest = frame.partition(" (")
        out.append((name, rest.rstrip(")")))
    return out


FORWARD = "model forward"


def _under_forward(frames: list[tuple[str, str]]) -> bool:
    """Inside an nn.Module call: the model's forward pass and everything it runs."""
    return any(path.endswith("torch/nn/modules/module.py") for _, path in frames)


def _category(frames: list[tuple[str, str]]) -> str:
    if _under_forward(frames):
        return FORWARD
    for _, path in reversed(frames):
        for needle, category in CATEGORIES:
            if needle in path:
                return category
    return Path(frames[-1][1]).name if frames else "?"


def summarize(path: Path, top: int = 12) -> dict[str, Any]:
    """Samples by category and by leaf function, with the share under the model's forward."""
    by_category: collections.Counter = collections.Counter()
    by_leaf: collections.Counter = collections.Counter()
    by_thread: collections.Counter = collections.Counter()
    forward = total = 0
    thread_forward: collections.Counter = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = _frames(stack)
        total += n
        by_category[_category(frames)] += n
        thread = _thread(frames)
        by_thread[thread] += n
        leaf = frames[-1] if frames else ("?", "?")
        by_leaf[f"{leaf[0]} ({_short(leaf[1])})"] += n
        if _under_forward(frames):
            forward += n
            thread_forward[thread] += n
    share = lambda c: [(k, round(v / total, 3)) for k, v in c.most_common(top)] if total else []  # noqa: E731
    return {"samples": total, "categories": share(by_category), "leaves": share(by_leaf), "threads": share(by_thread),
            "forward_share": round(forward / total, 3) if total else None,
            "forward_share_by_thread": {t: round(thread_forward[t] / c, 3) for t, c in by_thread.items()}}


def _thread(frames: list[tuple[str, str]]) -> str:
    """A thread's entry: the first frame past threading's bootstrap (the main thread's is the module)."""
    for name, path in frames:
        if not path.endswith("threading.py"):
            return name
    return "?"


def _short(path: str) -> str:
    if path.startswith(str(REPO) + "/"):
        return path[len(str(REPO)) + 1:]
    return re.sub(r".*/(site-packages|lib/python3\.\d+)/", "", path)
