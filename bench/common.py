"""Shared pieces of the bench scripts: paths, the test prompt and models, small statistics, process CPU time.

Scripts under bench/ import these as `bench.common` (each script puts the
repository root on sys.path first, so `python bench/<script>.py` works).
"""
from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BENCH = REPO / "bench"
DEFAULT_CACHE = BENCH / ".cache"
DEFAULT_OUT = BENCH / "results" / "latest.json"
# The entry point that re-runs itself for the baseline, model making and /health polling.
ENTRY = BENCH / "throughput.py"

MESSAGES = [{"role": "user", "content": "Hello! How are you today? The capital of France is Paris. "
                                        "Count from 1 to 5, then tell me a long story."}]

# name -> make_llama arguments. vocab is the BPE size asked for; "corpus": "big"
# trains the tokenizer on a synthetic corpus large enough to reach it (the stock
# make_tokenizer corpus stops at ~450 tokens whatever vocab_size says).
MODELS: dict[str, dict[str, Any]] = {
    "llama-90m": dict(hidden_size=768, layers=12, heads=12, intermediate=2048, vocab_size=8192,
                      max_positions=4096, corpus="big"),
    "llama-4m": dict(hidden_size=256, layers=4, heads=4, intermediate=1024, vocab_size=512,
                     max_positions=4096, corpus="stock"),
}
BIG, SMALL = "llama-90m", "llama-4m"


# --- small helpers ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float | None:
    """Percentile (nearest-rank with linear interpolation); None for no data."""
    if not values:
        return None
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    k = (len(v) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def rnd(x: Any, nd: int = 3) -> Any:
    return round(x, nd) if isinstance(x, float) else x


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    model_name = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        import psutil

        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        pass
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
    except Exception:
        pass
    return {"cpu_count": os.cpu_count(), "cpu_model": model_name, "memory_gib": mem, "python": platform.python_version(),
            "platform": platform.platform(), "git_commit": commit}


def run_json_subprocess(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run the bench entry point in one of its internal modes; its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, str(ENTRY), *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_models(names: list[str], cache: Path) -> dict[str, Any] | None:
    """{"models": {name: info}, "torch": version} from the entry point's model-making mode; None (logged) on failure."""
    log(f"making models {names} under {cache} (cached after the first run)")
    try:
        return run_json_subprocess(["--_make-models", *names, "--cache-dir", str(cache)], timeout=900)
    except Exception as exc:
        log(f"could not make the models: {exc}")
        return None


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))


# --- worker CPU activity (for "when did the worker stop computing") --------------------

def proc_cpu_ns(pids: list[int]) -> int:
    """On-CPU time of every thread of `pids` in ns, from /proc/PID/task/*/schedstat (ns resolution)."""
    total = 0
    for pid in pids:
        total += _one_cpu_ns(pid)
    return total


def _one_cpu_ns(pid: int) -> int:
    total = 0
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def watch_cpu(pid: list[int], since: float, duration: float, idle_window: float, interval: float = 0.001) -> dict[str, Any]:
    """Sample the worker's CPU time after `since`; find when it went idle for good.

    The stop time is the start of the first stretch of at least `idle_window`
    seconds in which every ~1 ms sample shows the worker under 25% of a core
    (short blips such as a heartbeat do not count as computing, but they do end
    an idle stretch, so the window is kept a few decode steps long).
    """
    samples = []
    end = time.time() + duration
    prev_t, prev_c = since, proc_cpu_ns(pid)
    while time.time() < end:
        time.sleep(interval)
        t, c = time.time(), proc_cpu_ns(pid)
        samples.append((prev_t, t, (c - prev_c) / 1e9 / max(1e-6, t - prev_t)))
        prev_t, prev_c = t, c
    stop = None
    i = 0
    while i < len(samples):
        if samples[i][2] >= 0.25:
            i += 1
            continue
        j = i
        while j < len(samples) and samples[j][2] < 0.25:
            j += 1
        if samples[j - 1][1] - samples[i][0] >= idle_window:
            stop = samples[i][0]
            break
        i = j
    return {"stopped_after_s": None if stop is None else stop - since, "samples": len(samples),
            "sample_interval_ms": rnd(statistics.mean([b - a for a, b, _ in samples]) * 1e3 if samples else None),
            "busy_fraction_before_stop": rnd(statistics.mean([u for a, b, u in samples if stop is None or b <= stop] or [0]))}
