"""Launching the stack: supervisord with the repo's supervisord.conf, and loom serve's process discipline."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers import REPO, free_port, stop_group, user, wait_until



def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _worker_pids(url: str) -> list[int]:
    return [w["pid"] for w in httpx.get(f"{url}/health", timeout=5).json().get("workers", [])
            if any(m["model_id"] == "loom-tiny" for m in w["models"])]


def test_supervisord_brings_up_a_working_server(tmp_path):
    # supervisor is a test dependency: it sits beside this Python, on PATH or not.
    venv_bin = Path(sys.executable).parent
    supervisord = shutil.which("supervisord", path=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    assert supervisord, "supervisord is not installed (pip install -e '.[test]')"
    conf = tmp_path / "supervisord.conf"
    shutil.copy(REPO / "supervisord.conf", conf)
    port = free_port()
    env = {**os.environ, "LOOM_PORT": str(port), "HF_HUB_OFFLINE": "1",
           "LOOM_BROKER_FRONTEND": f"tcp://127.0.0.1:{free_port()}",
           "LOOM_BROKER_BACKEND": f"tcp://127.0.0.1:{free_port()}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(tmp_path / "supervisord.log", "wb")
    proc = subprocess.Popen([supervisord, "-c", str(conf)], env=env, cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        pids = wait_until(lambda: _worker_pids(url), 90, 0.3, "supervisord's worker to load loom-tiny")
        r = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                       json={"model": "loom-tiny", "messages": user("Count from 1 to 5."), "max_tokens": 20,
                             "temperature": 0})
        assert r.status_code == 200, r.text
        # A killed worker is restarted by supervisord and registers again.
        os.kill(pids[0], signal.SIGKILL)
        new = wait_until(lambda: [p for p in _worker_pids(url) if p != pids[0]], 60, 0.3, "a restarted worker")
        assert new and not _alive(pids[0])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        stop_group(proc)
    log_text = (tmp_path / "supervisord.log").read_text(errors="replace")
    assert "joined" in log_text
    assert not any(_alive(p) for p in new)


def test_loom_serve_stops_every_child_on_sigterm(tmp_path, model_dir):
    from tests.conftest import TOY

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loom", "serve", "--port", str(port), "--model",
                             str(model_dir / TOY)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, 90, 0.3, "loom serve")
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                   text=True).stdout.split()]
        assert len(children) == 3  # broker, worker, api
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        wait_until(lambda: not any(_alive(p) for p in children), 10, 0.1, "children to exit")
    finally:
        stop_group(proc)


def test_children_die_with_a_killed_launcher(tmp_path, model_dir):
    from tests.conftest import TOY

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loom", "serve", "--port", str(port), "--model",
                             str(model_dir / TOY)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200, 90, 0.3)
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                   text=True).stdout.split()]
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: the kernel's PDEATHSIG must do it
        proc.wait()
        wait_until(lambda: not any(_alive(p) for p in children), 15, 0.1, "orphaned children to exit")
    finally:
        stop_group(proc)


def test_every_command_has_help():
    for command in (["--help"], ["serve", "--help"], ["broker", "--help"], ["worker", "--help"], ["api", "--help"],
                    ["keys", "--help"], ["chat", "--help"]):
        r = subprocess.run([sys.executable, "-m", "loom", *command], capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, (command, r.stderr)
        assert "usage:" in r.stdout
    time.sleep(0)
