"""Graceful drain on SIGTERM, and JSON logs.

Streams are long generations on the generated toy model, which never ends
its turn before max_tokens: thousands of tokens take seconds at the least,
so they are still running when the signal arrives (the test waits for each
one's first token before sending it) without any timing luck.
"""
from __future__ import annotations

import configparser
import json
import os
import re
import signal
import threading
import uuid

import httpx
import pytest

from tests.conftest import TOY
from tests.helpers import REPO, Event, Stack, sse_events, start_stack, user, wait_until
from tests.ops_processes import Parts

CHAT = "/v1/chat/completions"


class Streams:
    """`n` chat streams in threads; each records its events and flags its first token."""

    def __init__(self, url: str, n: int, max_tokens: int) -> None:
        self.events: list[list[Event]] = [[] for _ in range(n)]
        self.started = [threading.Event() for _ in range(n)]
        self.threads = [threading.Thread(target=self._run, args=(url, i, max_tokens)) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, url: str, i: int, max_tokens: int) -> None:
        body = {"model": TOY, "messages": user(f"Write a very long story, number {i}."), "max_tokens": max_tokens,
                "temperature": 0, "stream": True}
        try:
            with httpx.Client(base_url=url, timeout=httpx.Timeout(600, connect=10)) as client:
                with client.stream("POST", CHAT, json=body) as r:
                    for event in sse_events(r):
                        self.events[i].append(event)
                        self.started[i].set()
        finally:
            self.started[i].set()  # a failed stream must not leave the test waiting

    def wait_started(self) -> None:
        for flag in self.started:
            assert flag.wait(120), "a stream never started"
        assert all(e and e[0].name == "content_block_delta" for e in self.events), [e[:1] for e in self.events]

    def join(self) -> list[list[Event]]:
        for t in self.threads:
            t.join(timeout=600)
            assert not t.is_alive()
        return self.events


@pytest.fixture(scope="module")
def json_stack(tmp_path_factory, model_dir):
    s = start_stack(tmp_path_factory.mktemp("json-stack"), str(model_dir / TOY), [model_dir],
                    extra=["--log-format", "json", "--drain-timeout", "300"])
    yield s
    s.stop()


def records(log: str) -> list[dict]:
    # Libraries' progress bars also write to stderr; every log line is one JSON object.
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def test_json_logs(json_stack: Stack):
    given = f"json-{uuid.uuid4().hex[:12]}"
    with json_stack.client(headers={"X-Request-Id": given}) as client:
        r = client.post(CHAT, json={"model": TOY, "messages": user("hi"), "max_tokens": 3})
        assert r.status_code == 200, r.text

    def tagged() -> list[dict] | None:
        found = [r for r in records(json_stack.log()) if r["request_id"] == given]
        return found if {r["process"] for r in found} == {"api", "broker", "worker:cpu"} else None

    wait_until(tagged, 30, 0.1, "the request's lines from every process")
    # The launcher says it is serving once its own /health poll sees the model,
    # which may come after the fixture's: wait for that line, not a clock.
    wait_until(lambda: any(e["message"].startswith("Loom is serving") for e in records(json_stack.log())), 60, 0.1,
               "loom serve's serving line")
    entries = records(json_stack.log())
    assert {"serve", "broker", "api", "worker:cpu"} <= {e["process"] for e in entries}
    for e in entries:
        assert {"time", "level", "process", "pid", "request_id", "message"} <= set(e), e
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"]), e
    # `loom serve` says it is serving only once the model it was given has loaded.
    messages = [e["message"] for e in entries]
    loaded = next(i for i, m in enumerate(messages) if m.startswith(f"loaded {TOY} from"))
    serving = next(i for i, m in enumerate(messages) if m.startswith("Loom is serving"))
    assert loaded < serving


def test_sigterm_to_loom_serve_drains_then_every_process_exits_0(json_stack: Stack):
    streams = Streams(json_stack.url, 4, max_tokens=3000)
    streams.wait_started()
    os.kill(json_stack.proc.pid, signal.SIGTERM)  # the launcher only, as an init system would
    wait_until(lambda: httpx.get(f"{json_stack.url}/health", timeout=10).json().get("status") == "draining", 60,
               0.05, "the API to start draining")
    r = httpx.post(f"{json_stack.url}{CHAT}", json={"model": TOY, "messages": user("hi"), "max_tokens": 2},
                   timeout=30)
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
    assert r.json()["error"]["type"] == "server_shutting_down"
    for events in streams.join():
        # Every stream that was running finished whole.
        assert events[-1].name == "message_delta", events[-1]
        assert events[-1].data["usage"]["completion_tokens"] == 3000
    assert json_stack.proc.wait(timeout=120) == 0
    said = [e["message"] for e in records(json_stack.log()) if e["process"] == "serve"]
    for child in ("api", "worker 0 (cpu)", "broker"):
        assert f"{child} exited with code 0" in said, said


def test_sigterm_to_loom_api_ends_what_outlives_the_drain_timeout(tmp_path, model_dir):
    """As under supervisord: only the API is signalled; streams longer than --drain-timeout get an error event."""
    p = Parts(tmp_path)
    try:
        p.broker()
        p.worker("worker", [str(model_dir / TOY)])
        url = p.api("api", ["--require-model", TOY, "--drain-timeout", "1"])
        wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, 120, 0.2, "the model to load")
        streams = Streams(url, 4, max_tokens=8000)
        streams.wait_started()
        api = p.procs["api"]
        api.send_signal(signal.SIGTERM)
        assert api.wait(timeout=60) == 0
        for events in streams.join():
            assert events[-1].name == "error", events[-1]
            assert events[-1].data["error"]["type"] == "server_shutting_down"
        # The workers were told to stop on them: nothing computes for a client that is gone.
        wait_until(lambda: p.log("worker").count("cancelled") >= 4, 30, 0.1, "the worker to cancel the 4 streams")
        assert p.procs["worker"].poll() is None and p.procs["broker"].poll() is None
    finally:
        p.stop_all()


def test_supervisord_waits_longer_than_the_drain():
    conf = configparser.ConfigParser(interpolation=None)
    conf.read(REPO / "supervisord.conf")
    api = conf["program:api"]
    drain = float(re.search(r"--drain-timeout (\d+)", api["command"]).group(1))
    assert int(api["stopwaitsecs"]) > drain
    # The API stops before the workers it drains through (supervisord stops the highest priority first).
    assert int(api["priority"]) > int(conf["program:worker"]["priority"]) > int(conf["program:broker"]["priority"])
