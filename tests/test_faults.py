"""Faults with real processes: a worker killed or frozen, the broker restarted."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import httpx
import pytest

from loom.protocol import HEARTBEAT_TIMEOUT_S
from tests.conftest import TOY
from tests.helpers import Event, sse_events, start_stack, user, wait_until

# Greedy on the generated toy model, which never ends its turn before max_tokens: 8000 tokens are
# many seconds of generation, so a stream flowing when a worker or the broker is killed or frozen
# cannot have ended by then, however fast the relay gets.
UNENDING = 8000


@pytest.fixture(scope="module")
def pair(tmp_path_factory, model_dir):
    """A stack with two CPU workers, both serving the toy model."""
    s = start_stack(tmp_path_factory.mktemp("faults"), str(model_dir / TOY), [model_dir],
                    extra=["--workers=2", "--device", "cpu"])
    yield s
    s.stop()


class Stream(threading.Thread):
    """One streaming chat in a thread, recording each event and when it came."""

    def __init__(self, url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.events: list[Event] = []
        self.status = 0
        self.hang_up = threading.Event()  # set: the client closes the stream at its next event

    def run(self) -> None:
        body = {"model": TOY, "messages": user("Keep going."), "max_tokens": self.max_tokens, "temperature": 0,
                "stream": True}
        with httpx.Client(base_url=self.url, timeout=120) as client:
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                self.status = r.status_code
                for event in sse_events(r):
                    self.events.append(event)
                    if self.hang_up.is_set():
                        break

    @property
    def outcome(self) -> str:
        return self.events[-1].name if self.events and self.events[-1].name != "content_block_delta" else "open"


def _busy_workers(stack) -> dict[int, int]:
    return {w["pid"]: w["active_requests"] for w in stack.workers()}


def _start_streams(stack, n: int, max_tokens: int = UNENDING) -> list[Stream]:
    streams = [Stream(stack.url, max_tokens) for _ in range(n)]
    for s in streams:
        s.start()
    wait_until(lambda: all(len(s.events) >= 3 for s in streams), 30, 0.05, "every stream to be flowing")
    return streams


def _wait_two_workers(stack, exclude: set[int] = frozenset()) -> list[int]:
    def ready():
        pids = [w["pid"] for w in stack.workers() if any(m["model_id"] == TOY for m in w["models"])]
        return pids if len(pids) == 2 and not (set(pids) & exclude) else None
    return wait_until(ready, 60, 0.2, "two workers serving the model")


def test_killed_worker_fails_only_its_streams_and_is_restarted(pair):
    _wait_two_workers(pair)
    # Every stream is flowing and none can end before the kill (UNENDING tokens), so the
    # victim's count of requests read here is still its count when it dies.
    streams = _start_streams(pair, 4)
    load = _busy_workers(pair)
    victim = max(load, key=load.get)
    expected_errors = load[victim]
    assert expected_errors >= 1
    os.kill(victim, signal.SIGKILL)
    for s in streams:
        s.join(timeout=300)
    assert not any(s.is_alive() for s in streams), "a stream neither ended nor failed"
    errored = [s for s in streams if s.outcome == "error"]
    finished = [s for s in streams if s.outcome == "message_delta"]
    assert len(errored) == expected_errors, [s.outcome for s in streams]
    assert len(finished) == len(streams) - expected_errors
    for s in errored:
        error = s.events[-1].data["error"]
        assert error["type"] == "worker_lost"
        # Found by its closed connection, at the next heartbeat, not after the heartbeat timeout.
        assert "its connection closed" in error["message"], error
    for s in finished:  # the other worker's streams ran to the end untouched
        assert s.events[-1].data["usage"]["completion_tokens"] == UNENDING
    # The API kept serving, and loom serve restarted the worker, which registered again.
    with pair.client() as client:
        assert client.post("/v1/chat/completions", json={"model": TOY, "messages": user("hi"),
                                                          "max_tokens": 3}).status_code == 200
    pids = _wait_two_workers(pair, exclude={victim})
    with pair.client() as client:
        models = client.get("/models").json()["loaded_models"]
    assert sorted(m["model_id"] for m in models) == [TOY, TOY]
    assert victim not in pids


def test_frozen_worker_is_given_up_and_sends_nothing_stale(pair):
    _wait_two_workers(pair)
    # None can end before the freeze; the other worker's stream is hung up once the error came.
    streams = _start_streams(pair, 2)
    load = _busy_workers(pair)
    victim = max(load, key=load.get)
    stopped_at = time.perf_counter()
    os.kill(victim, signal.SIGSTOP)
    try:
        wait_until(lambda: all(s.outcome != "open" for s in streams) or
                   any(s.outcome == "error" for s in streams), 60, 0.05, "an error event")
        errored = [s for s in streams if s.outcome == "error"]
        # Given up by the broker's heartbeat timeout: a stopped worker's stream has no other way to end.
        # The margin is for a busy machine, not a promise of speed.
        assert errored and all(s.events[-1].at - stopped_at < HEARTBEAT_TIMEOUT_S + 20 for s in errored)
        assert victim not in [w["pid"] for w in pair.workers()]
    finally:
        os.kill(victim, signal.SIGCONT)
    for s in streams:
        s.hang_up.set()
        s.join(timeout=120)
    counts = {id(s): len(s.events) for s in streams}
    # Awake again: it learns it was forgotten, drops its stale work and registers anew.
    wait_until(lambda: victim in [w["pid"] for w in pair.workers()], 15, 0.2, "the woken worker to re-register")
    time.sleep(1)
    assert {id(s): len(s.events) for s in streams} == counts  # nothing arrived after the end
    assert "does not know this worker" in pair.log()
    with pair.client() as client:
        r = client.post("/v1/chat/completions", json={"model": TOY, "messages": user("hi"), "max_tokens": 5,
                                                       "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


def test_broker_restart_fails_in_flight_and_recovers(pair):
    _wait_two_workers(pair)
    # Streams that cannot end before the kill, however fast the relay: both must see the broker go.
    streams = _start_streams(pair, 2)
    broker = int(subprocess.run(["pgrep", "-f", "-P", str(pair.proc.pid), "loom broker"], capture_output=True,
                                text=True).stdout.split()[0])
    killed_at = time.perf_counter()
    os.kill(broker, signal.SIGKILL)
    for s in streams:
        s.join(timeout=60)
    assert [s.outcome for s in streams] == ["error", "error"]
    # Failed by the API's broker heartbeat: with no broker, nothing else can end them. Margin for a busy machine.
    assert all(s.events[-1].at - killed_at < HEARTBEAT_TIMEOUT_S + 20 for s in streams)

    def serves() -> bool:
        with pair.client() as client:
            r = client.post("/v1/chat/completions", json={"model": TOY, "messages": user("hi"), "max_tokens": 3},
                            timeout=5)
            return r.status_code == 200

    wait_until(serves, 60, 0.1, "a request to succeed after the broker restart")
    _wait_two_workers(pair)
