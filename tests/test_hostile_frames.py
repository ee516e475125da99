"""Hostile ZeroMQ frames sent to a broker: malformed, truncated, mistyped and
oversized messages.

Real processes only. A broker started here gets garbage on both of its ROUTER
sockets (from DEALER sockets that pose as an API process and as a worker). It
must drop what it cannot use, say so in its log, and go on answering real
requests correctly. The worker's side is in test_hostile_frames_worker.py.
"""
from __future__ import annotations

import time

import pytest
import zmq

from loom import protocol as P
from tests.conftest import TOY
from tests.helpers import free_port, stop_group, wait_until
from tests.hostile_frames import count, header, logged, malformed_frames, malformed_tokens, pack, recv, spawn


class ApiPeer:
    """A DEALER posing as an API process on the broker's frontend."""

    def __init__(self, ctx: zmq.Context, address: str, identity: bytes):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.connect(address)

    def request(self, msg: P.Message, timeout: float = 60) -> list[P.Message]:
        """Send `msg`; every reply with its rid (or a Pong) up to the terminal one."""
        self.sock.send_multipart(P.encode(msg))
        rid = getattr(msg, "rid", None)
        replies: list[P.Message] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frames = recv(self.sock, max(0.0, deadline - time.monotonic()))
            if frames is None:
                break
            for reply, _ in P.decode_each(frames):  # the broker must never relay garbage
                if rid is None and isinstance(reply, P.Pong):
                    return [reply]
                if getattr(reply, "rid", None) != rid:
                    continue
                replies.append(reply)
                if isinstance(reply, (P.Final, P.Error, P.Loaded, P.Unloaded, P.Status)):
                    return replies
        raise AssertionError(f"no terminal reply to {msg.kind} {rid} within {timeout}s: {replies}")


@pytest.fixture(scope="module")
def broker_and_worker(tmp_path_factory, model_dir):
    tmp = tmp_path_factory.mktemp("hostile-broker")
    frontend = f"tcp://127.0.0.1:{free_port()}"
    backend = f"tcp://127.0.0.1:{free_port()}"
    broker_log, worker_log = tmp / "broker.log", tmp / "worker.log"
    procs = [spawn(["broker", "--frontend", frontend, "--backend", backend], broker_log)]
    ctx = zmq.Context()
    try:
        procs.append(spawn(["worker", "--broker", backend, "--device", "cpu", "--threads", "1",
                            "--model", str(model_dir / TOY)], worker_log))
        api = ApiPeer(ctx, frontend, b"api-test")

        def ready() -> bool:
            for p, path in zip(procs, (broker_log, worker_log)):
                if p.poll() is not None:
                    raise RuntimeError(f"{path.name} exited with {p.returncode}:\n{path.read_text()[-3000:]}")
            status = api.request(P.StatusRequest(rid="s-ready"), timeout=2)[-1]
            return any(m.get("model_id") == TOY for w in status.workers for m in w["models"])

        wait_until(ready, 120, 0.2, "the broker to see the worker with the toy model")
        yield dict(ctx=ctx, api=api, frontend=frontend, backend=backend, procs=procs, broker_log=broker_log,
                   worker_log=worker_log)
    finally:
        for p in procs:
            stop_group(p)
        ctx.destroy(linger=0)


def broker_generate_ok(api: ApiPeer, rid: str, max_tokens: int = 3) -> None:
    replies = api.request(P.Generate(rid=rid, model=TOY, prompt="Count from 1 to 5.", max_tokens=max_tokens,
                                     temperature=0.0))
    tokens = [m for m in replies if isinstance(m, P.Token)]
    assert isinstance(replies[-1], P.Final), replies
    assert replies[-1].completion_tokens == max_tokens and 1 <= len(tokens) <= max_tokens, replies


def test_broker_frontend_drops_garbage(broker_and_worker):
    b = broker_and_worker
    api: ApiPeer = b["api"]
    broker_generate_ok(api, "fe-before")
    before = count(b["broker_log"].read_text(errors="replace"), "dropped a malformed message from API")
    hostile = ApiPeer(b["ctx"], b["frontend"], b"api-hostile")
    garbage = malformed_frames(TOY)
    for _, frames in garbage:
        hostile.sock.send_multipart(frames)
    # Well-formed messages an API process has no business sending.
    hostile.sock.send_multipart(P.encode(P.Token(rid="fe-tok", text="x", index=0)))
    hostile.sock.send_multipart(P.encode(P.Tokens(api=b"api-test", rids=["fe-tok"], texts=["x"], indexes=[0])))
    hostile.sock.send_multipart(P.encode(P.Register(worker_id="w", device="cpu", host="h", pid=1, capacity=9,
                                                    models=[{"model_id": TOY}])))
    # Requests that decode but name nonsense get a clear error, not silence.
    no_model = hostile.request(P.Generate(rid="fe-nomodel", model="no-such-model", prompt="hi", max_tokens=2))
    assert isinstance(no_model[-1], P.Error) and no_model[-1].type == P.ErrorType.MODEL_NOT_LOADED
    no_device = hostile.request(P.Load(rid="fe-nodevice", model=TOY, device="tpu:7"))
    assert isinstance(no_device[-1], P.Error) and no_device[-1].type == P.ErrorType.NO_WORKER
    # A cancel for somebody else's request (sent once that request is streaming) does nothing to it.
    api.sock.send_multipart(P.encode(P.Generate(rid="fe-victim", model=TOY, prompt="hi", max_tokens=200,
                                                temperature=0.0)))
    replies: list[P.Message] = []
    deadline = time.monotonic() + 60
    while not replies or not isinstance(replies[-1], (P.Final, P.Error)):
        assert time.monotonic() < deadline, f"the victim's stream stalled after {len(replies)} replies"
        frames = recv(api.sock, 1)
        for msg, _ in P.decode_each(frames) if frames else []:
            if getattr(msg, "rid", None) == "fe-victim":
                replies.append(msg)
                if len(replies) == 1:
                    hostile.sock.send_multipart(P.encode(P.Cancel(rid="fe-victim")))
    assert isinstance(replies[-1], P.Final) and replies[-1].completion_tokens == 200, replies[-3:]
    assert len(replies) >= 20  # tokens kept coming after the hostile cancel

    broker_generate_ok(api, "fe-after")
    assert all(p.poll() is None for p in b["procs"])
    dropped = logged(b["broker_log"], "dropped a malformed message from API", before + len(garbage)) - before
    log = b["broker_log"].read_text(errors="replace")
    assert dropped == len(garbage), f"{dropped} of {len(garbage)} logged as dropped:\n{log[-4000:]}"
    assert "dropped an unexpected token message from API" in log
    assert "dropped an unexpected tokens message from API" in log
    assert "dropped an unexpected register message from API" in log
    # The hostile register on the wrong socket did not add a worker.
    status = api.request(P.StatusRequest(rid="fe-status"))[-1]
    assert [w["worker_id"] for w in status.workers if w["worker_id"] == "w"] == []
    assert "Traceback" not in log, log[-4000:]
    hostile.sock.close(0)


def test_broker_backend_drops_garbage(broker_and_worker):
    b = broker_and_worker
    api: ApiPeer = b["api"]
    before = count(b["broker_log"].read_text(errors="replace"), "dropped a malformed message from worker")
    fake = b["ctx"].socket(zmq.DEALER)
    fake.setsockopt(zmq.LINGER, 0)
    fake.setsockopt(zmq.IDENTITY, b"fake-worker")
    fake.connect(b["backend"])
    garbage = malformed_frames(TOY) + [
        ("register with capacity as a string", [pack(header(
            P.Register(worker_id="bad", device="cpu", host="h", pid=1, capacity=1, models=[]), capacity="x"))]),
        ("register with models as a map", [pack(header(
            P.Register(worker_id="bad", device="cpu", host="h", pid=1, capacity=1, models=[]), models={"a": 1}))]),
        ("final with too few buffers", P.encode(P.Final(
            rid="x", stop_reason="end_turn", prompt_tokens=1, completion_tokens=1, generate_s=0, model=TOY,
            dtype="float32", arrays=[{"layer": -1, "shape": [1, 4], "dtype": "float32", "keys": [-1]}]))),
        ("final with a wrong-size buffer", P.encode(P.Final(
            rid="x", stop_reason="end_turn", prompt_tokens=1, completion_tokens=1, generate_s=0, model=TOY,
            dtype="float32", arrays=[{"layer": -1, "shape": [1, 4], "dtype": "float32", "keys": [-1]}]),
            [b"\0" * 15])),
        ("final with a bogus dtype", P.encode(P.Final(
            rid="x", stop_reason="end_turn", prompt_tokens=1, completion_tokens=1, generate_s=0, model=TOY,
            dtype="float32", arrays=[{"layer": -1, "shape": [1, 4], "dtype": "complex256", "keys": [-1]}]),
            [b"\0" * 16])),
        ("final with a non-numeric shape", P.encode(P.Final(
            rid="x", stop_reason="end_turn", prompt_tokens=1, completion_tokens=1, generate_s=0, model=TOY,
            dtype="float32", arrays=[{"layer": -1, "shape": ["a", "b"], "dtype": "float32", "keys": [-1]}]),
            [b"\0" * 16])),
        ("final with a scalar shape", P.encode(P.Final(
            rid="x", stop_reason="end_turn", prompt_tokens=1, completion_tokens=1, generate_s=0, model=TOY,
            dtype="float32", arrays=[{"layer": -1, "shape": 4, "dtype": "float32", "keys": [-1]}]),
            [b"\0" * 16])),
        ("final with array specs that are not maps", P.encode(P.Final(
            rid="x", stop_reason="end_turn", prompt_tokens=1, completion_tokens=1, generate_s=0, model=TOY,
            dtype="float32", arrays=[7]), [b"\0" * 16])),
        *malformed_tokens(),
    ]
    for _, frames in garbage:
        fake.send_multipart(frames)
    # Well-formed frames from a worker the broker does not know: nothing is relayed.
    fake.send_multipart(P.encode(P.Token(rid="be-orphan", text="pwned", index=0)))
    fake.send_multipart(P.encode(P.Final(rid="be-orphan", stop_reason="end_turn", prompt_tokens=1,
                                         completion_tokens=1, generate_s=0, model=TOY, dtype="float32")))
    broker_generate_ok(api, "be-after")

    dropped = logged(b["broker_log"], "dropped a malformed message from worker", before + len(garbage)) - before
    log = b["broker_log"].read_text(errors="replace")
    assert dropped == len(garbage), f"{dropped} of {len(garbage)} logged as dropped:\n{log[-4000:]}"
    status = api.request(P.StatusRequest(rid="be-status"))[-1]
    ids = [w["worker_id"] for w in status.workers]
    assert "bad" not in ids and len(ids) == 1, status.workers
    assert all(p.poll() is None for p in b["procs"])
    assert "Traceback" not in log, log[-4000:]
    fake.close(0)


def test_broker_survives_a_registered_worker_with_hostile_model_lists(broker_and_worker):
    """A peer that registers with model entries of the wrong shape must not poison routing."""
    b = broker_and_worker
    api: ApiPeer = b["api"]
    fakes = []
    try:
        for i, models in enumerate(([1, 2, 3], ["toy"], [{"model_id": 5}], [{"model_id": None}], [None])):
            fake = b["ctx"].socket(zmq.DEALER)
            fake.setsockopt(zmq.LINGER, 0)
            fake.setsockopt(zmq.IDENTITY, f"fake-models-{i}".encode())
            fake.connect(b["backend"])
            fakes.append(fake)
            fake.send_multipart([pack(header(P.Register(worker_id=f"fake-models-{i}", device="cpu", host="h", pid=1,
                                                        capacity=64, models=[]), models=models))])
            fake.send_multipart([pack(header(P.Heartbeat(sender=f"fake-models-{i}"), models=models))])
        time.sleep(0.3)
        # Routing and status still work while those peers are connected.
        broker_generate_ok(api, "hm-after")
        status = api.request(P.StatusRequest(rid="hm-status"))[-1]
        assert any(m.get("model_id") == TOY for w in status.workers for m in w["models"]), status.workers
        for w in status.workers:
            assert all(isinstance(m, dict) and isinstance(m.get("model_id"), str) for m in w["models"]), w
        load = api.request(P.Load(rid="hm-load", model=TOY))
        assert isinstance(load[-1], P.Loaded) and load[-1].info["model_id"] == TOY, load
        assert all(p.poll() is None for p in b["procs"])
    finally:
        for fake in fakes:
            fake.close(0)


def test_broker_relays_tokens_only_to_the_api_that_asked(broker_and_worker):
    """The broker stamps the asking API on each request, whatever it wrote there; a step's
    tokens reach that API only, and tokens a worker sends for requests it does not serve reach nobody."""
    b = broker_and_worker
    api: ApiPeer = b["api"]
    thief = ApiPeer(b["ctx"], b["frontend"], b"api-thief")
    intruder = b["ctx"].socket(zmq.DEALER)
    intruder.setsockopt(zmq.LINGER, 0)
    intruder.setsockopt(zmq.IDENTITY, b"intruder-worker")
    intruder.connect(b["backend"])
    try:
        # A registered worker with no model: nothing is routed to it, but it is known.
        intruder.send_multipart(P.encode(P.Register(worker_id="intruder", device="cpu", host="h", pid=1,
                                                    capacity=1, models=[])))
        forged = P.Generate(rid="st-forged", model=TOY, prompt="Count from 1 to 5.", max_tokens=30,
                            temperature=0.0, api=b"api-test")  # claims the other API's identity
        thief.sock.send_multipart(P.encode(forged))
        replies: list[P.Message] = []
        deadline = time.monotonic() + 60
        while not replies or not isinstance(replies[-1], (P.Final, P.Error)):
            assert time.monotonic() < deadline, f"the stream stalled after {len(replies)} replies"
            frames = recv(thief.sock, 1)
            for msg, _ in P.decode_each(frames) if frames else []:
                if getattr(msg, "rid", None) == "st-forged":
                    replies.append(msg)
                    if len(replies) == 1:  # while it streams: the intruder claims its next token
                        intruder.send_multipart(P.encode(P.Tokens(api=b"api-thief", rids=["st-forged"],
                                                                  texts=["pwned"], indexes=[1])))
                        intruder.send_multipart(P.encode(P.Tokens(api=b"api-test", rids=["st-forged"],
                                                                  texts=["pwned"], indexes=[1])))
        assert isinstance(replies[-1], P.Final) and replies[-1].completion_tokens == 30, replies[-3:]
        tokens = [m for m in replies if isinstance(m, P.Token)]
        assert tokens and all(t.text != "pwned" for t in tokens), tokens
        # The API it claimed to be got nothing of it.
        while (frames := recv(api.sock, 0.5)) is not None:
            for msg, _ in P.decode_each(frames):
                assert getattr(msg, "rid", None) != "st-forged", msg
        broker_generate_ok(api, "st-after")
        assert all(p.poll() is None for p in b["procs"])
    finally:
        thief.sock.close(0)
        intruder.close(0)
