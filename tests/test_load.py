"""Admission control and a bounded load test with a worker killed mid-way."""
from __future__ import annotations

import asyncio
import collections
import os
import random
import signal

import httpx
import pytest

from tests.conftest import TOY
from tests.helpers import start_stack, user, wait_until

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def crowded(tmp_path_factory, model_dir):
    """Two workers admitting at most 12 requests each."""
    s = start_stack(tmp_path_factory.mktemp("load"), str(model_dir / TOY), [model_dir],
                    extra=["--workers=2", "--device", "cpu", "--capacity", "12"])
    yield s
    s.stop()


def test_past_capacity_requests_get_429_with_retry_after(crowded):
    async def main():
        async with httpx.AsyncClient(base_url=crowded.url, timeout=60) as client:
            body = {"model": TOY, "messages": user("Keep going."), "max_tokens": 4000, "temperature": 0,
                    "stream": True}
            holders = []
            for _ in range(24):  # fill both workers
                holders.append(await client.send(client.build_request("POST", CHAT, json=body), stream=True))
            assert all(r.status_code == 200 for r in holders), [(r.status_code, (await r.aread())[:200]) for r in holders if r.status_code != 200]
            over_stream = await client.post(CHAT, json=body)
            over_plain = await client.post(CHAT, json={**body, "stream": False})
            for r in holders:
                await r.aclose()
            return over_stream, over_plain

    over_stream, over_plain = asyncio.run(main())
    for r in (over_stream, over_plain):
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "overloaded_error"
    # Capacity frees up once those clients are gone.
    wait_until(lambda: sum(w["active_requests"] for w in crowded.workers()) == 0, 10, 0.1, "slots to free up")


def test_500_mixed_requests_with_a_worker_killed(crowded):
    outcomes: collections.Counter[str] = collections.Counter()
    rng = random.Random(7)
    total, clients = 500, 32
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)

    async def one(client: httpx.AsyncClient, i: int) -> str:
        kind = rng.choice(["stream", "stream", "plain", "disconnect"])
        body = {"model": TOY, "messages": user(f"request {i}"), "max_tokens": rng.randint(5, 60),
                "temperature": rng.choice([0, 0.7])}
        if kind == "plain":
            r = await client.post(CHAT, json=body)
            if r.status_code == 200:
                # At temperature 0.7 the end-of-turn token may come first: 0 tokens is still an answer.
                answer = r.json()
                return "complete" if {"text", "usage", "stop_reason"} <= set(answer) else "bad"
            return {429: "429", 503: "error"}.get(r.status_code, f"status {r.status_code}")
        async with client.stream("POST", CHAT, json={**body, "stream": True}) as r:
            if r.status_code != 200:
                return {429: "429"}.get(r.status_code, f"status {r.status_code}")
            last, seen = None, 0
            async for line in r.aiter_lines():
                if line.startswith("event:"):
                    last = line.split(":", 1)[1].strip()
                    seen += 1
                    if kind == "disconnect" and seen >= 3:
                        return "disconnected"
            return {"message_delta": "complete", "error": "error"}.get(last, f"cut off after {last}")

    async def client_loop(client: httpx.AsyncClient) -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if i == total // 2:
                victim = max(crowded.workers(), key=lambda w: w["active_requests"])["pid"]
                os.kill(victim, signal.SIGKILL)
            try:
                outcomes[await asyncio.wait_for(one(client, i), 60)] += 1
            except asyncio.TimeoutError:
                outcomes["hung"] += 1
            except httpx.HTTPError as exc:
                outcomes[f"transport error {type(exc).__name__}"] += 1

    async def main() -> None:
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(base_url=crowded.url, timeout=60, limits=limits) as client:
            await asyncio.gather(*(client_loop(client) for _ in range(clients)))

    asyncio.run(main())
    print("\nload test outcomes:", dict(outcomes))
    assert sum(outcomes.values()) == total
    assert set(outcomes) <= {"complete", "error", "429", "disconnected"}, outcomes
    # How many are turned away (429) depends only on how fast a refusal is against a generation,
    # which a faster API changes; of the requests admitted, most must be answered in full.
    admitted = total - outcomes["429"]
    assert admitted >= 24 and outcomes["complete"] > admitted // 2, outcomes
    assert outcomes["error"] >= 1  # the killed worker's requests ended with an error, not silence
    # The server is healthy again afterwards: the killed worker was restarted.
    wait_until(lambda: len([w for w in crowded.workers() if w["models"]]) == 2, 60, 0.3, "both workers back")


def test_a_slow_reader_does_not_slow_other_streams(crowded):
    import socket
    import time

    def timed_stream() -> float:
        with httpx.Client(base_url=crowded.url, timeout=60) as client:
            started = time.perf_counter()
            r = client.post(CHAT, json={"model": TOY, "messages": user("again"), "max_tokens": 300,
                                        "temperature": 0})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 300
            return time.perf_counter() - started

    alone = min(timed_stream() for _ in range(2))
    # A raw client that asks for a long stream and never reads its socket.
    host, port = crowded.url.removeprefix("http://").split(":")
    body = ('{"model": "%s", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4000, '
            '"temperature": 0, "stream": true}' % TOY).encode()
    slow = socket.create_connection((host, int(port)))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    try:
        wait_until(lambda: sum(w["active_requests"] for w in crowded.workers()) >= 1, 10, 0.05, "the slow stream")
        beside = min(timed_stream() for _ in range(2))
    finally:
        slow.close()
    # Generous: the slow stream shares the CPU, but must not hold the others back.
    assert beside < 4 * alone + 1, (alone, beside)
    wait_until(lambda: sum(w["active_requests"] for w in crowded.workers()) == 0, 15, 0.1, "the slow stream to end")
