"""X-Request-Id: echoed on every answer, in error bodies, and in the logs of the API, broker and worker."""
from __future__ import annotations

import re
import uuid

from tests.conftest import TOY
from tests.helpers import Stack, sse_events, user, wait_until

CHAT = "/v1/chat/completions"


def test_every_answer_carries_an_id(stack: Stack):
    with stack.client() as client:
        answers = [client.get("/health"), client.get("/models"), client.get("/metrics"), client.get("/no-such-path"),
                   client.post(CHAT, json={"model": TOY, "messages": user("hi"), "max_tokens": 2}),
                   client.post(CHAT, json={"model": TOY, "messages": []})]
        with client.stream("POST", CHAT, json={"model": TOY, "messages": user("hi"), "max_tokens": 2,
                                               "stream": True}) as r:
            list(sse_events(r))
            answers.append(r)
    ids = [a.headers.get("x-request-id") for a in answers]
    assert all(i and re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), ids
    assert len(set(ids)) == len(ids)  # a new one for each request


def test_the_clients_id_is_kept_and_in_error_bodies(stack: Stack):
    given = f"client-{uuid.uuid4().hex[:8]}"
    with stack.client(headers={"X-Request-Id": given}) as client:
        ok = client.post(CHAT, json={"model": TOY, "messages": user("hi"), "max_tokens": 2})
        assert ok.status_code == 200 and ok.headers["x-request-id"] == given
        missing = client.post("/generate", json={"model": "no-such/model", "prompt": "hi", "max_tokens": 2})
        assert missing.status_code == 404 and missing.headers["x-request-id"] == given
        assert missing.json()["error"]["request_id"] == given
        invalid = client.post(CHAT, json={"model": TOY, "messages": []})
        assert invalid.status_code == 422 and invalid.json()["error"]["request_id"] == given
        with client.stream("POST", CHAT, json={"model": "no-such/model", "messages": user("hi"),
                                               "stream": True}) as r:
            events = list(sse_events(r))
            assert r.headers["x-request-id"] == given
        assert events[-1].name == "error" and events[-1].data["error"]["request_id"] == given


def test_unsafe_ids_are_cleaned_and_bounded(stack: Stack):
    with stack.client() as client:
        # Legal in an HTTP header (httptools refuses control bytes such as DEL outright), unsafe in a log line.
        r = client.get("/health", headers={"X-Request-Id": b"abc\xe9 <script>\t" + b"x" * 500})
    assert r.headers["x-request-id"] == ("abcscript" + "x" * 500)[:128]
    with stack.client() as client:
        r = client.get("/health", headers={"X-Request-Id": "<>\"'"})  # nothing usable: a new one
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def test_the_id_is_in_every_process_log(stack: Stack):
    given = f"trace-{uuid.uuid4().hex}"
    with stack.client(headers={"X-Request-Id": given}) as client:
        with client.stream("POST", CHAT, json={"model": TOY, "messages": user("hi"), "max_tokens": 3,
                                               "stream": True}) as r:
            assert list(sse_events(r))[-1].name == "message_delta"

    def lines() -> list[str]:
        return [line for line in stack.log().splitlines() if f"[{given}]" in line]

    def from_every_process() -> list[str] | None:
        found = lines()
        processes = {m.group(1) for m in (re.search(r" (api|broker|worker:cpu)\[\d+\] ", x) for x in found) if m}
        return found if processes == {"api", "broker", "worker:cpu"} else None

    found = wait_until(from_every_process, 30, 0.1, "the request id in the api, broker and worker logs")
    # The worker notes the request's start and end; the API its answer.
    assert any("admitted" in x for x in found) and any("finished" in x for x in found), found
    assert any(f"POST {CHAT} 200" in x for x in found), found
