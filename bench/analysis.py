"""How long /analyze/geometry and /analyze/bilateral take on 1,000 x 4,096
vectors: in-process (loom.analysis) and through HTTP (LoomClient against a
real `loom serve` on the bundled loom-tiny), and how fast /health answers
while analyses run. Prints the numbers; asserts nothing.

    .venv/bin/python bench/analysis.py                # 1000 x 4096, 3 repetitions
    .venv/bin/python bench/analysis.py --n 2000 --d 8192 --reps 1
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import free_port  # noqa: E402
from bench.stack import HealthPoller  # noqa: E402
from loom.analysis import analyze_bilateral, analyze_geometry  # noqa: E402
from loom.client import LoomClient  # noqa: E402


def vectors(n: int, d: int, seed: int) -> np.ndarray:
    """Hidden-state-like: a few directions the vectors crowd around, plus noise."""
    rng = np.random.RandomState(seed)
    centers = rng.randn(8, d)
    return centers[rng.randint(0, 8, n)] + 0.7 * rng.randn(n, d)


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def start_server(port: int, log_path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "loom", "serve", "--port", str(port)], cwd=REPO,
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"loom serve exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"loom serve did not become healthy; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="vectors per set (default %(default)s)")
    parser.add_argument("--d", type=int, default=4096, help="dimensions (default %(default)s)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions; the median is printed (default %(default)s)")
    parser.add_argument("--no-http", action="store_true", help="only the in-process figures")
    args = parser.parse_args()
    a, b = vectors(args.n, args.d, 1), vectors(args.n, args.d, 2)
    blas = threadpool_info()[0]["num_threads"] if threadpool_info() else "?"
    print(f"{args.n} x {args.d} float64 per set, median of {args.reps}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")

    for label, limit in (("in-process, 1 BLAS thread (as the server runs it)", 1),
                         (f"in-process, {blas} BLAS threads", None)):
        with threadpool_limits(limit):
            g = timed(lambda: analyze_geometry(a), args.reps)
            bi = timed(lambda: analyze_bilateral(a, b), args.reps)
        print(f"{label:55s} geometry {g:6.2f} s   bilateral {bi:6.2f} s")
    if args.no_http:
        return 0

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(f"/tmp/loom-bench-analysis-{port}.log")
    proc = start_server(port, log_path)
    try:
        with LoomClient(url) as loom:
            started = time.perf_counter()
            loom.analyze_geometry(a[:10])
            print(f"{'first HTTP call (starts the analysis process)':55s} {time.perf_counter() - started:6.2f} s")
            server = {}
            g = timed(lambda: server.update(g=loom.analyze_geometry(a).analysis_time_ms), args.reps)
            bi = timed(lambda: server.update(b=loom.analyze_bilateral(a, b).analysis_time_ms), args.reps)
            print(f"{'HTTP via LoomClient (wall, client side)':55s} geometry {g:6.2f} s   bilateral {bi:6.2f} s")
            print(f"{'  of which the analysis itself (analysis_time_ms)':55s} geometry {server['g'] / 1000:6.2f} s"
                  f"   bilateral {server['b'] / 1000:6.2f} s")

            # /health from its own process (this one's GIL is busy encoding bodies),
            # first idle as the baseline, then while three analyses run.
            poller = HealthPoller(url)
            time.sleep(3)
            idle = poller.finish()
            poller = HealthPoller(url)
            started = time.perf_counter()
            threads = [threading.Thread(target=loom.analyze_bilateral, args=(a, b)) for _ in range(2)]
            threads.append(threading.Thread(target=loom.analyze_geometry, args=(a,)))
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            busy = poller.finish()
            print(f"{'/health idle (baseline)':55s} {idle['n']} answers, p50 {idle['p50_ms']} ms, "
                  f"p99 {idle['p99_ms']} ms, max {idle['max_ms']} ms")
            print(f"{'/health during 3 concurrent analyses':55s} {busy['n']} answers in "
                  f"{time.perf_counter() - started:.1f} s, p50 {busy['p50_ms']} ms, p99 {busy['p99_ms']} ms, "
                  f"max {busy['max_ms']} ms, errors {busy['errors']}")
    finally:
        stop_server(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
