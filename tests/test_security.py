"""Secure by default: API keys, loopback binds, no remote code, CURVE between hosts.

Real processes throughout: `loom serve` stacks, and a broker, workers and an
API started one by one for CURVE.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import TOY
from tests.helpers import REPO, Stack, free_port, start_stack, stop_group, user, wait_until

CHAT = "/v1/chat/completions"
KEY = "secret"


def spawn(args: list[str], log_path: Path) -> subprocess.Popen:
    log_file = open(log_path, "wb")
    return subprocess.Popen([sys.executable, "-m", "loom", *args], stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})


# --- (a) API key ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_stack(tmp_path_factory, model_dir):
    s = start_stack(tmp_path_factory.mktemp("keyed"), str(model_dir / TOY), [model_dir], env={"LOOM_API_KEY": KEY})
    yield s
    s.stop()


WRONG_AUTH = [
    None,
    "Bearer",
    "Bearer wrong",
    f"Bearer {KEY}x",
    f"Bearer {KEY[:-1]}",
    f"Bearer {KEY.upper()}",
    KEY,  # no scheme
    f"Basic {KEY}",
    f"Token {KEY}",
]


@pytest.mark.parametrize("auth", WRONG_AUTH, ids=lambda a: repr(a))
def test_api_key_required_everywhere_but_health(keyed_stack: Stack, auth):
    headers = {"Authorization": auth} if auth is not None else {}
    with keyed_stack.client(headers=headers) as client:
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "healthy", health.text
        requests = [
            ("GET", "/models", None),
            ("POST", "/models/load", {"model": TOY}),
            ("DELETE", f"/models/{TOY}", None),
            ("POST", CHAT, {"model": TOY, "messages": user("hi"), "max_tokens": 2}),
            ("POST", CHAT, {"model": TOY, "messages": user("hi"), "max_tokens": 2, "stream": True}),
            ("POST", "/generate", {"model": TOY, "prompt": "hi", "max_tokens": 2}),
            ("POST", "/analyze/geometry", {"vectors": [[1.0], [2.0], [4.0]]}),
            ("POST", "/analyze/bilateral", {"sender_vectors": [[1.0], [2.0], [4.0]],
                                            "receiver_vectors": [[1.0], [3.0], [4.0]]}),
        ]
        for method, path, body in requests:
            r = client.request(method, path, json=body)
            assert r.status_code == 401, (method, path, auth, r.status_code, r.text)
            assert r.headers.get("www-authenticate", "").lower().startswith("bearer")
            assert r.headers["content-type"].startswith("application/json")  # not an SSE stream
            assert "API key" in r.text
    # Nothing was unloaded by the refused DELETE.
    ok = httpx.get(f"{keyed_stack.url}/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert TOY in [m["model_id"] for m in ok.json()["loaded_models"]]


def test_api_key_accepted(keyed_stack: Stack):
    with keyed_stack.client(headers={"Authorization": f"Bearer {KEY}"}) as client:
        assert client.get("/health").status_code == 200
        models = client.get("/models")
        assert models.status_code == 200 and TOY in [m["model_id"] for m in models.json()["loaded_models"]]
        r = client.post(CHAT, json={"model": TOY, "messages": user("hi"), "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2
        r = client.post("/generate", json={"model": TOY, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
        r = client.post("/analyze/geometry", json={"vectors": [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]})
        assert r.status_code == 200 and r.json()["num_vectors"] == 3, r.text
        with client.stream("POST", CHAT, json={"model": TOY, "messages": user("hi"), "max_tokens": 2,
                                               "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert "event: message_delta" in r.read().decode()
    # The scheme is case-insensitive (RFC 7235), the key is not.
    r = httpx.get(f"{keyed_stack.url}/models", headers={"Authorization": f"bearer {KEY}"}, timeout=10)
    assert r.status_code == 200
    assert not re.search(rf"\b{KEY}\b", keyed_stack.log()), "the API key was written to the log"


def test_no_key_configured_means_open(stack: Stack):
    """Without LOOM_API_KEY (the default for a loopback-only server) nothing asks for one."""
    with stack.client() as client:
        assert client.get("/models").status_code == 200


# --- (b) loopback binds ------------------------------------------------------------------------


def listening(proc: subprocess.Popen) -> list[tuple[str, int, str]]:
    """(ip, port, process name) of every listening TCP socket of `proc` and its children."""
    root = psutil.Process(proc.pid)
    found = []
    for p in [root, *root.children(recursive=True)]:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.append((c.laddr.ip, c.laddr.port, " ".join(p.cmdline()[2:4])))
        except psutil.NoSuchProcess:
            pass
    return found


def non_loopback_addresses() -> list[str]:
    addresses = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                addresses.append(a.address)
    return addresses


def test_default_stack_listens_on_loopback_only(stack: Stack):
    port = int(stack.url.rsplit(":", 1)[1])
    sockets = wait_until(lambda: [s for s in listening(stack.proc)] if len(listening(stack.proc)) >= 3 else None,
                         10, 0.2, "the stack's listening sockets")
    # The API's HTTP port and the broker's two ZeroMQ ports, all on loopback.
    assert port in [p for _, p, _ in sockets], sockets
    assert len({p for _, p, _ in sockets}) >= 3, sockets
    for ip, p, who in sockets:
        assert ip in ("127.0.0.1", "::1"), f"{who} listens on {ip}:{p}"
    # And from another interface of this machine, the API cannot be reached.
    for address in non_loopback_addresses():
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=2).close()


def test_cli_defaults_are_loopback():
    for command, flag in (("serve", "--host"), ("api", "--host")):
        out = subprocess.run([sys.executable, "-m", "loom", command, "--help"], capture_output=True, text=True,
                             cwd=REPO, env={k: v for k, v in os.environ.items() if not k.startswith("LOOM_")},
                             timeout=60).stdout
        assert re.search(rf"{flag} HOST\s+.*default 127\.0\.0\.1", " ".join(out.split())), out
    out = subprocess.run([sys.executable, "-m", "loom", "broker", "--help"], capture_output=True, text=True,
                         cwd=REPO, env={k: v for k, v in os.environ.items() if not k.startswith("LOOM_")},
                         timeout=60).stdout
    flat = " ".join(out.split())
    assert "default tcp://127.0.0.1:5555" in flat and "default tcp://127.0.0.1:5556" in flat, out


# --- (c) no remote code ---------------------------------------------------------------------------


def test_remote_code_is_not_run_by_default(stack: Stack, model_dir: Path, tmp_path: Path):
    """A model that ships its own Python (config.json auto_map) is refused with a clear 4xx,
    and its code never runs."""
    evil = model_dir / "remote-code-model"
    marker = tmp_path / "remote-code-ran"
    if evil.exists():
        shutil.rmtree(evil)
    shutil.copytree(model_dir / TOY, evil)
    config = json.loads((evil / "config.json").read_text())
    config["model_type"] = "loom-evil"
    config["architectures"] = ["EvilForCausalLM"]
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (evil / "config.json").write_text(json.dumps(config))
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    (evil / "configuration_evil.py").write_text(
        payload + "from transformers import LlamaConfig\n\nclass EvilConfig(LlamaConfig):\n    model_type = 'loom-evil'\n")
    (evil / "modeling_evil.py").write_text(
        payload + "from transformers import LlamaForCausalLM\n\nclass EvilForCausalLM(LlamaForCausalLM):\n    pass\n")
    tok_config = evil / "tokenizer_config.json"
    if tok_config.exists():  # make the tokenizer point at the custom code too
        tc = json.loads(tok_config.read_text())
        tc["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
        tok_config.write_text(json.dumps(tc))
        (evil / "tokenization_evil.py").write_text(
            payload + "from transformers import PreTrainedTokenizerFast\n\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    try:
        with stack.client() as client:
            r = client.post("/models/load", json={"model": "remote-code-model"})
            assert 400 <= r.status_code < 500, r.text
            error = r.json()["error"]
            assert error["type"] == "model_load_error", error
            assert "remote-code-model" in error["message"]
            assert re.search(r"trust_remote_code|custom code|loom-evil", error["message"]), error["message"]
            assert "Traceback" not in r.text
            # A chat naming it is refused the same way, and the server keeps serving.
            r = client.post(CHAT, json={"model": "remote-code-model", "messages": user("hi"), "max_tokens": 2})
            assert 400 <= r.status_code < 500, r.text
            assert "remote-code-model" not in [m["model_id"] for m in client.get("/models").json()["loaded_models"]]
            assert client.post(CHAT, json={"model": TOY, "messages": user("hi"), "max_tokens": 2}).status_code == 200
        assert not marker.exists(), "the model's own Python code was executed"
    finally:
        shutil.rmtree(evil, ignore_errors=True)


# --- (d) CURVE ------------------------------------------------------------------------------------


def make_keys(directory: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "loom", "keys", str(directory)], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (directory / "broker.key").is_file() and (directory / "client.key_secret").is_file()


def test_curve_admits_only_authorized_workers(tmp_path: Path, model_dir: Path):
    keys, other = tmp_path / "keys", tmp_path / "other-keys"
    make_keys(keys)
    make_keys(other)
    for secret in keys.glob("*.key_secret"):
        assert secret.stat().st_mode & 0o077 == 0, f"{secret} is readable by others"
    assert (keys / "authorized" / "client.key").is_file()
    # The right broker public key, but a client key pair the broker never authorized.
    stranger = tmp_path / "stranger-keys"
    stranger.mkdir()
    shutil.copy(keys / "broker.key", stranger / "broker.key")
    shutil.copy(other / "client.key", stranger / "client.key")
    shutil.copy(other / "client.key_secret", stranger / "client.key_secret")

    frontend = f"tcp://127.0.0.1:{free_port()}"
    backend = f"tcp://127.0.0.1:{free_port()}"
    port = free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["broker"] = spawn(["broker", "--frontend", frontend, "--backend", backend, "--curve-keys", str(keys)],
                                logs / "broker.log")
        worker = ["worker", "--broker", backend, "--device", "cpu", "--threads", "1"]
        procs["good"] = spawn([*worker, "--model", str(model_dir / TOY), "--curve-keys", str(keys)],
                              logs / "good.log")
        procs["other-keys"] = spawn([*worker, "--curve-keys", str(other)], logs / "other-keys.log")
        procs["stranger"] = spawn([*worker, "--curve-keys", str(stranger)], logs / "stranger.log")
        procs["no-keys"] = spawn(worker, logs / "no-keys.log")
        procs["api"] = spawn(["api", "--port", str(port), "--broker", frontend, "--curve-keys", str(keys),
                              "--default-model", TOY], logs / "api.log")
        url = f"http://127.0.0.1:{port}"

        def log(name: str) -> str:
            return (logs / f"{name}.log").read_text(errors="replace")

        def alive() -> None:
            for name, p in procs.items():
                assert p.poll() is None, f"{name} exited with {p.returncode}:\n{log(name)[-3000:]}"

        def good_worker_serving() -> bool:
            alive()
            r = httpx.get(f"{url}/health", timeout=5)
            return r.status_code == 200 and any(
                m["model_id"] == TOY for w in r.json()["workers"] for m in w["models"])

        wait_until(good_worker_serving, 120, 0.3, "the worker with authorized keys to join over CURVE")
        # The rejected workers are up and trying (they log their start) for several heartbeat timeouts.
        for name in ("other-keys", "stranger", "no-keys"):
            wait_until(lambda: "broker tcp://" in log(name), 60, 0.2, f"the {name} worker to start")
        time.sleep(3)
        alive()
        health = httpx.get(f"{url}/health", timeout=5).json()
        pids = {w["pid"] for w in health["workers"]}
        assert pids == {procs["good"].pid}, health["workers"]
        broker_log = log("broker")
        assert broker_log.count(" joined: ") == 1, broker_log
        assert "CURVE on" in broker_log
        # A real request travels the encrypted path.
        r = httpx.post(f"{url}{CHAT}", json={"model": TOY, "messages": user("hi"), "max_tokens": 3, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text

        # An API process without the keys cannot talk to the broker either.
        port2 = free_port()
        procs["api-no-keys"] = spawn(["api", "--port", str(port2), "--broker", frontend], logs / "api-no-keys.log")
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port2}/health", timeout=5).status_code in (200, 503),
                   60, 0.3, "the keyless API to start")
        time.sleep(2)
        r = httpx.get(f"http://127.0.0.1:{port2}/health", timeout=5)
        assert r.status_code == 503 and r.json()["workers"] == [], r.text
        # Refused at once, not held until the client gives up.
        started = time.monotonic()
        for stream in (False, True):
            r = httpx.post(f"http://127.0.0.1:{port2}{CHAT}", json={"model": TOY, "messages": user("hi"),
                                                                    "max_tokens": 2, "stream": stream}, timeout=30)
            if stream:
                assert r.status_code == 200 and "event: error" in r.text and "broker_lost" in r.text, r.text
            else:
                assert r.status_code == 503 and r.json()["error"]["type"] == "broker_lost", r.text
        assert time.monotonic() - started < 10
        assert "connected to broker" not in log("api-no-keys")
        alive()
    finally:
        for p in procs.values():
            stop_group(p)
