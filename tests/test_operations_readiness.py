"""Readiness: /health is 503 "starting" until the models named at start are loaded.

A script that waits for /health 200 and then asks for the model at once,
by any of its names, must never get an error. Twenty cold starts of a whole
stack would cost minutes, so the broker and the API start once and the
worker, whose preload is what takes time (importing torch, loading weights),
is started fresh 20 times: each cycle is a real cold start of the process
that holds the model, against an API that was told at start which model it
must wait for (`--require-model`, as `loom serve` and supervisord.conf pass).
"""
from __future__ import annotations

import os
import shutil
import time

import httpx
import pytest

from tests.conftest import TOY
from tests.helpers import wait_until
from tests.ops_processes import Parts

# The issue asks for 20; LOOM_TEST_READINESS_CYCLES may lower it for a quick local run.
CYCLES = int(os.environ.get("LOOM_TEST_READINESS_CYCLES", "20"))


@pytest.fixture(scope="module")
def parts(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("ready")
    shutil.copytree(model_dir / TOY, root / "models" / TOY)
    logs = root / "logs"
    logs.mkdir()
    p = Parts(logs)
    p.root = root  # type: ignore[attr-defined]
    p.broker()
    yield p
    p.stop_all()


def test_ready_means_every_name_answers_at_once(parts: Parts):
    typed = f"./models/{TOY}"  # as an operator would type it, relative to the worker's directory
    names = [typed, str((parts.root / "models" / TOY).resolve()), TOY]  # type: ignore[attr-defined]
    url = parts.api("api", ["--require-model", typed])
    starting_seen = 0
    with httpx.Client(base_url=url, timeout=60) as client:
        for cycle in range(CYCLES):
            health = client.get("/health")
            assert health.status_code == 503, health.text  # no worker yet: not ready
            worker = parts.worker("worker", [typed], cwd=parts.root)  # type: ignore[attr-defined]
            while True:
                health = client.get("/health")
                if health.status_code == 200:
                    break
                assert health.status_code == 503, health.text
                body = health.json()
                assert body["status"] == "starting" and body["loading"] == [typed], body
                starting_seen += 1
                assert worker.poll() is None, parts.log("worker")[-3000:]
                time.sleep(0.05)  # as a script would poll; the worker's start needs the CPU
            # At once, by each of its names: never an error.
            for name in names:
                r = client.post("/generate", json={"model": name, "prompt": "hi", "max_tokens": 1})
                assert r.status_code == 200, (cycle, name, r.text)
                assert r.json()["metadata"]["model"] == TOY
            assert parts.stop("worker") == 0
            wait_until(lambda: client.get("/health").status_code == 503, 30, 0.05, "the API to see the worker gone")
    # Each cycle begins with the model not loaded; the API said so rather than 200.
    assert starting_seen >= CYCLES

