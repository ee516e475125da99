"""`loom serve`: the whole stack on one machine from one command.

Starts the broker, one worker per device and the API process(es) as child
processes, restarts any that dies, and stops every child on Ctrl-C or SIGTERM.
The HTTP port's sockets belong to this process (loom/listeners.py), so an API
process that restarts finds its connections waiting.
Children also get SIGTERM from the kernel if this process is killed outright
(PR_SET_PDEATHSIG), so no worker outlives it.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

from loom.config import DEFAULT_MODEL, add_common_arguments, env, setup_logging
from loom.listeners import open_listeners

log = logging.getLogger("loom.serve")

RESTART_BACKOFF_S = (0.5, 1, 2, 5, 10)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=env("LOOM_HOST", "127.0.0.1"),
                        help="HTTP address (default %(default)s: this machine only; 0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=int(env("LOOM_PORT", "8080") or 8080), help="HTTP port (default %(default)s)")
    parser.add_argument("--device", default=None,
                        help="comma-separated devices, one worker each: cpu or cuda:0,cuda:1 (default: every GPU, else cpu)")
    parser.add_argument("--workers", type=int, default=None,
                        help="number of worker processes (default: one per device); devices are used in turn")
    parser.add_argument("--model", action="append", default=None,
                        help=f"model to preload on every worker: hub id or local path (repeatable; default {DEFAULT_MODEL})")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    parser.add_argument("--model-dir", action="append", default=[],
                        help="directory whose models can be loaded by name over HTTP (repeatable)")
    parser.add_argument("--capacity", type=int, default=None, help="most concurrent requests per worker (default 64)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per CPU worker (default: the cores less one for the API and broker, "
                             "shared among the CPU workers)")
    parser.add_argument("--broker-frontend", default=None, help="broker address for the API (default: a free loopback port)")
    parser.add_argument("--broker-backend", default=None,
                        help="broker address for workers (default: a free loopback port); "
                             "bind tcp://0.0.0.0:PORT with --curve-keys to let other hosts' workers join")
    parser.add_argument("--curve-keys", default=env("LOOM_CURVE_KEYS"), help="key directory from `loom keys`")
    parser.add_argument("--api-key-file", default=env("LOOM_API_KEY_FILE"), help="require this bearer key over HTTP")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow models that ship their own code")
    parser.add_argument("--api-processes", type=int, default=int(env("LOOM_API_PROCESSES", "1") or 1),
                        help="HTTP processes on the one port, each with its own broker connection; the kernel "
                             "spreads connections over them (env LOOM_API_PROCESSES; default %(default)s)")
    parser.add_argument("--drain-timeout", type=float, default=float(env("LOOM_DRAIN_TIMEOUT", "30") or 30),
                        help="on SIGTERM, seconds running requests get to finish before they are ended with an "
                             "error; then every process exits (env LOOM_DRAIN_TIMEOUT; default %(default)g)")
    add_common_arguments(parser)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Linux: the kernel sends SIGTERM to the child when the launcher dies.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Child:
    name: str
    argv: list[str]
    restart: bool
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started: float = 0.0
    next_start: float = 0.0
    pass_fds: tuple[int, ...] = ()  # an API process's listening socket
    env: dict[str, str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, preexec_fn=_die_with_parent, pass_fds=self.pass_fds, env=self.env)
        self.started = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.proc.pid)


def _metrics_dir() -> tuple[str, bool]:
    """PROMETHEUS_MULTIPROC_DIR for the API processes: the operator's, emptied, or a new one (True)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return tempfile.mkdtemp(prefix="loom-metrics-"), True
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):  # counts of an earlier run are not this one's
        if name.endswith(".db"):
            os.unlink(os.path.join(path, name))
    return path, False


def pick_devices(spec: str | None, workers: int | None) -> list[str]:
    if spec:
        devices = [d.strip() for d in spec.split(",") if d.strip()]
    else:
        try:
            import torch

            n = torch.cuda.device_count()
        except Exception:
            n = 0
        devices = [f"cuda:{i}" for i in range(n)] or ["cpu"]
    count = workers or len(devices)
    return [devices[i % len(devices)] for i in range(count)]


def run(args: argparse.Namespace) -> int:
    setup_logging("serve", args.log_level, args.log_format)
    frontend = args.broker_frontend or f"tcp://127.0.0.1:{free_port()}"
    backend = args.broker_backend or f"tcp://127.0.0.1:{free_port()}"
    devices = pick_devices(args.device, args.workers)
    models = args.model or [DEFAULT_MODEL]
    py = [sys.executable, "-m", "loom"]
    common = ["--log-level", args.log_level] if args.log_level else []
    common += ["--log-format", args.log_format] if args.log_format else []
    curve = ["--curve-keys", args.curve_keys] if args.curve_keys else []
    children = [Child("broker", [*py, "broker", "--frontend", frontend, "--backend", backend, *curve, *common], True)]
    cpu_workers = sum(1 for d in devices if d == "cpu")
    # Leave a core to the API and broker: a worker whose threads take every
    # core makes them wait, and with them every stream's relay.
    threads = args.threads or max(1, ((os.cpu_count() or 1) - 1) // max(1, cpu_workers))
    for i, device in enumerate(devices):
        argv = [*py, "worker", "--broker", backend, "--device", device, "--dtype", args.dtype, *curve, *common]
        for m in models:
            argv += ["--model", m]
        for d in args.model_dir:
            argv += ["--model-dir", d]
        if device == "cpu":
            argv += ["--threads", str(threads)]
        if args.capacity:
            argv += ["--capacity", str(args.capacity)]
        if args.trust_remote_code:
            argv.append("--trust-remote-code")
        children.append(Child(f"worker {i} ({device})", argv, True))
    default_model = os.path.basename(os.path.normpath(models[0])) if os.path.isdir(models[0]) else models[0]
    try:
        listeners = open_listeners(args.host, args.port, max(1, args.api_processes))
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        return 1
    args.port = listeners[0].getsockname()[1]
    api = [*py, "api", "--host", args.host, "--port", str(args.port), "--broker", frontend,
           "--default-model", default_model, "--drain-timeout", str(args.drain_timeout),
           "--wait-for-broker", "10", *curve, *common]
    for m in models:
        api += ["--require-model", m]  # /health is 503 "starting" until each is loaded
    if args.api_key_file:
        api += ["--api-key-file", args.api_key_file]
    api_env, made_dir = None, None
    if len(listeners) > 1:
        # Prometheus counts of every API process, summed at each scrape (api/metrics.py).
        metrics_dir, made = _metrics_dir()
        api_env, made_dir = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}, metrics_dir if made else None
    for i, sock in enumerate(listeners):
        name = "api" if len(listeners) == 1 else f"api {i}"
        children.append(Child(name, [*api, "--fd", str(sock.fileno())], True, pass_fds=(sock.fileno(),),
                              env=api_env))

    stopping = False

    def stop(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, stop)
    for child in children:
        child.start()
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    announced = False
    try:
        while not stopping:
            time.sleep(0.2)
            for child in children:
                _supervise(child)
            if not announced and _ready(url):
                log.info("Loom is serving %s on %s (docs: %s/docs)", default_model, url, url)
                announced = True
    finally:
        _stop_all(children, args.drain_timeout)
        for sock in listeners:
            sock.close()
        if made_dir:
            shutil.rmtree(made_dir, ignore_errors=True)
    return 0


def _supervise(child: Child) -> None:
    proc = child.proc
    if proc is None:
        if time.monotonic() >= child.next_start:
            child.start()
        return
    code = proc.poll()
    if code is None:
        if time.monotonic() - child.started > 60:
            child.restarts = 0  # it has been healthy for a while: reset the backoff
        return
    delay = RESTART_BACKOFF_S[min(child.restarts, len(RESTART_BACKOFF_S) - 1)]
    log.warning("%s exited with code %s; restarting in %.1fs", child.name, code, delay)
    child.proc = None
    child.restarts += 1
    child.next_start = time.monotonic() + delay


def _ready(url: str) -> bool:
    """/health is 200 once every model named at start is loaded on a live worker."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as resp:
            return resp.status == 200
    except Exception:
        return False


def _stop_all(children: list[Child], drain_timeout: float) -> None:
    # The API first: it drains (new requests get 503, running ones finish)
    # while the workers and the broker still serve them; then workers, then the broker.
    api = [c for c in children if c.name.startswith("api")]
    log.info("stopping %d processes: the API drains first (up to %gs)", len(children), drain_timeout)
    _stop(api, drain_timeout + 10)
    _stop([c for c in reversed(children) if c not in api], 8)


def _stop(children: list[Child], timeout: float) -> None:
    for child in children:
        if child.proc and child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        if child.proc is None:
            continue
        try:
            code = child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop; killing it", child.name)
            child.proc.kill()
            code = child.proc.wait()
        log.info("%s exited with code %s", child.name, code)
