"""`loom serve --api-processes 2`: two HTTP processes on one port, each with its own broker connection.

Which process holds a connection is read from the kernel's socket table
(psutil), not guessed from timings. A killed API process is restarted by
`loom serve`, and the connections that arrive while it is down wait in its
socket's backlog (the launcher holds the sockets): none is refused or lost,
and a stream on the other process goes on untouched.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
from typing import Any

import psutil
import pytest

from tests.conftest import TOY
from tests.helpers import REPO, start_stack, wait_until


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_dir):
    stack = start_stack(tmp_path_factory.mktemp("api-processes"), str(model_dir / TOY),
                        extra=["--api-processes", "2"])
    yield stack
    stack.stop()


def role_pids(stack, role: str) -> list[int]:
    out = []
    for child in psutil.Process(stack.proc.pid).children():
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "loom" in cmd and cmd[cmd.index("loom") + 1:cmd.index("loom") + 2] == [role] and child.is_running():
            out.append(child.pid)
    return out


def holder(pids: list[int], local_port: int) -> int | None:
    """The API process whose end of our connection from `local_port` it is (once it has accepted it)."""
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.raddr and c.raddr.port == local_port and c.status == psutil.CONN_ESTABLISHED for c in conns):
            return pid
    return None


def connect(stack) -> http.client.HTTPConnection:
    host, port = stack.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.connect()
    return conn


def post(conn: http.client.HTTPConnection, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def generate(stack, max_tokens: int = 4) -> dict[str, Any]:
    conn = connect(stack)
    try:
        status, raw = post(conn, "/generate", {"model": TOY, "prompt": "hi", "max_tokens": max_tokens,
                                               "temperature": 0})
    finally:
        conn.close()
    assert status == 200, raw
    return json.loads(raw)


def test_connections_spread_over_the_processes_each_with_its_own_broker_connection(served):
    apis = role_pids(served, "api")
    assert len(apis) == 2, apis
    conns = [connect(served) for _ in range(24)]
    try:
        ports = [c.sock.getsockname()[1] for c in conns]
        held = wait_until(lambda: (h := [holder(apis, p) for p in ports]) and all(h) and h, 30, 0.1,
                          "every connection to be accepted")
        # The kernel hashes each connection to one process's socket: 24 all on one would be 1 in 2^23.
        assert set(held) == set(apis), held
        for conn in conns:  # each process answers on the connections it holds
            status, raw = post(conn, "/generate", {"model": TOY, "prompt": "hi", "max_tokens": 3, "temperature": 0})
            assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 3, raw
    finally:
        for conn in conns:
            conn.close()
    # Each has its own connection to the broker's frontend.
    (broker,) = role_pids(served, "broker")
    listening = {c.laddr.port for c in psutil.Process(broker).net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN}
    for pid in apis:
        assert any(c.raddr and c.raddr.port in listening for c in psutil.Process(pid).net_connections(kind="tcp")), pid


def test_a_killed_process_is_restarted_and_no_request_is_lost(served):
    apis = role_pids(served, "api")
    assert len(apis) == 2, apis
    # A stream held by the process that stays.
    spare = []
    while True:
        conn = connect(served)
        pid = wait_until(lambda: holder(apis, conn.sock.getsockname()[1]), 30, 0.05, "the connection to be accepted")
        if pid == apis[1]:
            break
        spare.append(conn)
    victim, survivor = apis
    conn.request("POST", "/generate", body=json.dumps({"model": TOY, "prompt": "hi", "max_tokens": 300,
                                                       "temperature": 0, "stream": True}),
                 headers={"Content-Type": "application/json"})
    stream = conn.getresponse()
    assert stream.status == 200
    first = b""
    while b"content_block_delta" not in first:
        first += stream.readline()

    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE,
               30, 0.05, "the killed process to be gone")
    # Requests sent while it is down (some of them hashed to its socket) and while it restarts.
    answers: list[Any] = [None] * 16

    def send(i: int) -> None:
        try:
            answers[i] = generate(served)
        except BaseException as exc:  # noqa: BLE001 - recorded and asserted below
            answers[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(answers))]
    for t in threads:
        t.start()
    rest = stream.read()
    for t in threads:
        t.join(timeout=120)
    assert all(isinstance(a, dict) and a["usage"]["completion_tokens"] == 4 for a in answers), answers
    # The stream on the other process ran to its end.
    assert b'"stop_reason":"max_tokens"' in rest and b"event: error" not in rest, rest[-500:]
    restarted = wait_until(lambda: (now := role_pids(served, "api")) and len(now) == 2 and victim not in now and now,
                           60, 0.2, "loom serve to restart the killed API process")
    assert survivor in restarted
    assert "exited with code -9; restarting" in served.log()
    for conn in [conn, *spare]:
        conn.close()


def test_a_second_server_cannot_share_the_port(served):
    """SO_REUSEPORT would let another `loom serve` take half of this one's connections: it must fail instead."""
    port = served.url.rsplit(":", 1)[1]
    second = subprocess.run([sys.executable, "-m", "loom", "serve", "--port", port, "--api-processes", "2"],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert second.returncode == 1 and "cannot listen" in second.stderr + second.stdout, second
    assert generate(served)["usage"]["completion_tokens"] == 4  # the first one still serves
