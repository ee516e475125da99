"""Hostile ZeroMQ frames: malformed, truncated, mistyped and oversized messages.

Real processes only. A broker started here gets garbage on both of its ROUTER
sockets (from DEALER sockets that pose as an API process and as a worker), and
a worker gets garbage from a ROUTER socket that this test binds in place of a
broker. Each must drop what it cannot use, say so in its log, and go on
answering real requests correctly.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from loom import protocol as P
from tests.conftest import TOY
from tests.helpers import REPO, free_port, stop_group, wait_until


# --- helpers -------------------------------------------------------------------------


def spawn(args: list[str], log_path: Path) -> subprocess.Popen:
    """A `python -m loom ...` process in its own process group, logging to a file."""
    log_file = open(log_path, "wb")
    return subprocess.Popen([sys.executable, "-m", "loom", *args], stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "LOOM_LOG_LEVEL": "INFO"})


def pack(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def header(msg: P.Message, **overrides: Any) -> dict[str, Any]:
    return {**msg.header(), **overrides}


def recv(sock: zmq.Socket, timeout: float) -> list[bytes] | None:
    if sock.poll(int(timeout * 1000), zmq.POLLIN):
        return sock.recv_multipart()
    return None


def malformed_frames(model: str) -> list[tuple[str, list[bytes]]]:
    """Messages that `protocol.decode` must reject: each one is dropped and logged."""
    good = P.Generate(rid="g-ok", model=model, prompt="hello", max_tokens=2, temperature=0.0)
    valid = pack(good.header())
    nested = b"\x91" * 5000 + b"\x00"  # an array in an array ... 5000 deep
    return [
        ("random bytes", [os.urandom(97)]),
        ("empty frame", [b""]),
        ("truncated msgpack", [valid[: len(valid) // 2]]),
        ("one byte short", [valid[:-1]]),
        ("not a map", [pack([1, 2, 3])]),
        ("a bare string", [pack("generate")]),
        ("non-string map keys", [msgpack.packb({1: 2, 3: 4})]),
        ("huge declared array length", [b"\xdd\xff\xff\xff\xff"]),
        ("deep nesting", [nested]),
        ("ext type", [msgpack.packb(msgpack.ExtType(42, b"boom"))]),
        ("no version", [pack({k: v for k, v in good.header().items() if k != "v"})]),
        ("wrong version", [pack(header(good, v=99))]),
        ("version as string", [pack(header(good, v="1"))]),
        ("unknown kind", [pack(header(good, kind="self_destruct"))]),
        ("kind not a string", [pack(header(good, kind=["generate"]))]),
        ("rid is an int", [pack(header(good, rid=123))]),
        ("rid missing", [pack({k: v for k, v in good.header().items() if k != "rid"})]),
        ("max_tokens is a string", [pack(header(good, max_tokens="x"))]),
        ("max_tokens is a float", [pack(header(good, max_tokens=2.5))]),
        ("temperature is a string", [pack(header(good, temperature="hot"))]),
        ("messages is a string", [pack(header(good, prompt=None, messages="hi"))]),
        ("messages holds non-maps", [pack(header(good, prompt=None, messages=[1, "two"]))]),
        ("layers is a map", [pack(header(good, layers={"a": 1}))]),
        ("layers holds strings", [pack(header(good, layers=["x", None]))]),
        ("layers holds floats", [pack(header(good, layers=[1.5]))]),
        ("all_layers is a string", [pack(header(good, all_layers="yes"))]),
        ("model is bytes", [pack(header(good, model=b"\xff\xfe"))]),
        ("oversized header (2 MB)", [pack(header(good, prompt="A" * (2 << 20)))]),
        ("oversized raw frame (2 MB)", [os.urandom(2 << 20)]),
    ]


def tokens_header(**overrides: Any) -> dict[str, Any]:
    good = P.Tokens(api=b"api-test", rids=["a", "b"], texts=["x", "y"], indexes=[0, 0])
    return header(good, **overrides)


def malformed_tokens() -> list[tuple[str, list[bytes]]]:
    """Tokens messages (a step's tokens for one API process) that decode must reject."""
    spec = {"layer": 1, "shape": [1, 4], "dtype": "float32", "keys": [1]}
    return [
        ("tokens: fewer texts than rids", [pack(tokens_header(texts=["x"]))]),
        ("tokens: more indexes than rids", [pack(tokens_header(indexes=[0, 1, 2]))]),
        ("tokens: a rid is an int", [pack(tokens_header(rids=["a", 7]))]),
        ("tokens: a text is bytes", [pack(tokens_header(texts=["x", b"y"]))]),
        ("tokens: an index is a string", [pack(tokens_header(indexes=[0, "1"]))]),
        ("tokens: api is a string", [pack(tokens_header(api="api-test"))]),
        ("tokens: api missing", [pack({k: v for k, v in tokens_header().items() if k != "api"})]),
        ("tokens: extras not one per entry", [pack(tokens_header(extras=[{}]))]),
        ("tokens: an extra is not a map", [pack(tokens_header(extras=[{}, 5]))]),
        ("tokens: arrays is a map", [pack(tokens_header(extras=[{}, {"arrays": {"a": 1}}]))]),
        ("tokens: logprobs hold strings", [pack(tokens_header(extras=[{"logprobs": ["x"]}, {}]))]),
        ("tokens: lens is a list", [pack(tokens_header(extras=[{"lens": [1]}, {}]))]),
        ("tokens: an array without its buffer", [pack(tokens_header(extras=[{"arrays": [spec]}, {}]))]),
        ("tokens: a buffer of the wrong size", [pack(tokens_header(extras=[{}, {"arrays": [spec]}])), b"\0" * 15]),
        ("tokens: a buffer nobody describes", [pack(tokens_header()), b"\0" * 16]),
    ]


def count(text: str, needle: str) -> int:
    return text.count(needle)


def logged(path: Path, needle: str, at_least: int, timeout: float = 15) -> int:
    """How often `needle` is in the log, once it is there `at_least` times (frames on
    other sockets may still be in flight); fails with the log's tail if it never is."""
    try:
        return wait_until(lambda: count(path.read_text(errors="replace"), needle) >= at_least
                          and count(path.read_text(errors="replace"), needle), timeout, 0.1, repr(needle))
    except TimeoutError:
        text = path.read_text(errors="replace")
        raise AssertionError(f"{count(text, needle)} of {at_least} {needle!r} in the log:\n{text[-4000:]}") from None


# --- the worker ------------------------------------------------------------------------


class FakeBroker:
    """A ROUTER socket standing in for the broker's backend."""

    def __init__(self, ctx: zmq.Context):
        self.port = free_port()
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(f"tcp://127.0.0.1:{self.port}")
        self.worker: bytes | None = None
        self.replies: dict[str, list[tuple[P.Message, list[bytes]]]] = {}
        self.models: list[dict[str, Any]] = []

    def pump(self, timeout: float) -> None:
        """Read what the worker sent; file replies by rid."""
        frames = recv(self.sock, timeout)
        while frames is not None:
            identity, body = frames[0], frames[1:]
            for msg, buffers in P.decode_each(body):  # the worker must never send us garbage
                if isinstance(msg, P.Register):
                    self.worker = identity
                    self.models = msg.models
                elif isinstance(msg, P.Heartbeat):
                    if msg.models is not None:
                        self.models = msg.models
                else:
                    self.replies.setdefault(msg.rid, []).append((msg, buffers))
            frames = recv(self.sock, 0)

    def send(self, frames: list[bytes]) -> None:
        assert self.worker is not None
        self.sock.send_multipart([self.worker, *frames])

    def wait_for(self, rid: str, timeout: float) -> list[P.Message]:
        """Every reply for `rid` up to and including its terminal one."""
        terminal = (P.Final, P.Error, P.Loaded, P.Unloaded)

        def done() -> bool:
            self.pump(0.05)
            return any(isinstance(m, terminal) for m, _ in self.replies.get(rid, []))

        wait_until(done, timeout, 0.0, f"the worker's answer to {rid}")
        return [m for m, _ in self.replies[rid]]


@pytest.fixture(scope="module")
def worker_and_fake_broker(tmp_path_factory, model_dir):
    tmp = tmp_path_factory.mktemp("hostile-worker")
    ctx = zmq.Context()
    fake = FakeBroker(ctx)
    log_path = tmp / "worker.log"
    proc = spawn(["worker", "--broker", f"tcp://127.0.0.1:{fake.port}", "--device", "cpu", "--threads", "1",
                  "--model", str(model_dir / TOY)], log_path)
    try:
        def loaded() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            fake.pump(0.1)
            return fake.worker is not None and any(m.get("model_id") == TOY for m in fake.models)

        wait_until(loaded, 120, 0.0, "the worker to register and load the toy model")
        yield fake, proc, log_path
    finally:
        stop_group(proc)
        fake.sock.close(0)
        ctx.term()


def generate_ok(fake: FakeBroker, rid: str, max_tokens: int = 3) -> None:
    fake.send(P.encode(P.Generate(rid=rid, model=TOY, prompt="Count from 1 to 5.", max_tokens=max_tokens,
                                  temperature=0.0)))
    replies = fake.wait_for(rid, 60)
    tokens = [m for m in replies if isinstance(m, P.Token)]
    final = replies[-1]
    assert isinstance(final, P.Final), replies
    # A token that ends inside a UTF-8 character is held for the next one, so
    # there may be fewer Token frames than tokens, never more.
    assert final.completion_tokens == max_tokens and 1 <= len(tokens) <= max_tokens, replies
    indexes = [t.index for t in tokens]
    assert indexes == sorted(set(indexes)) and indexes[-1] < max_tokens, replies
    assert final.model == TOY and final.stop_reason == "max_tokens"


def test_worker_drops_malformed_frames_and_keeps_serving(worker_and_fake_broker):
    fake, proc, log_path = worker_and_fake_broker
    generate_ok(fake, "before")
    before = count(log_path.read_text(errors="replace"), "dropped a malformed message from the broker")
    garbage = malformed_frames(TOY)
    for _, frames in garbage:
        fake.send(frames)
    # A valid request after the garbage is answered, and correctly.
    generate_ok(fake, "after-garbage")
    assert proc.poll() is None, "the worker died"
    log = log_path.read_text(errors="replace")
    dropped = count(log, "dropped a malformed message from the broker") - before
    assert dropped == len(garbage), f"{dropped} of {len(garbage)} malformed messages logged as dropped:\n{log[-4000:]}"
    # Nothing any of the garbage named was answered as if it were a request.
    assert not any(rid in fake.replies for rid in ("g-ok", 123, "123")), fake.replies.keys()
    assert "Traceback" not in log, log[-4000:]


def test_worker_survives_well_formed_but_hostile_requests(worker_and_fake_broker):
    """Messages that decode but carry nonsense: each gets an Error for its rid or is ignored."""
    fake, proc, log_path = worker_and_fake_broker
    errors = {
        "h-no-such-model": P.Generate(rid="h-no-such-model", model="no-such-model", prompt="hi", max_tokens=2),
        "h-bad-layer": P.Generate(rid="h-bad-layer", model=TOY, prompt="hi", max_tokens=2, layers=[10_000]),
        "h-load-escape": P.Load(rid="h-load-escape", model="../../../../etc"),
        "h-load-dtype": P.Load(rid="h-load-dtype", model="no-such-model", dtype="int3"),
        "h-unload-missing": P.Unload(rid="h-unload-missing", model="never-loaded"),
        "h-long-context": P.Generate(rid="h-long-context", model=TOY, prompt="hello " * 20_000, max_tokens=2),
    }
    # These run but must be clamped into sense, not crash anything.
    odd_but_fine = {
        "h-negative-max": P.Generate(rid="h-negative-max", model=TOY, prompt="hi", max_tokens=-5, temperature=0.0),
        "h-nan-temp": P.Generate(rid="h-nan-temp", model=TOY, prompt="hi", max_tokens=2, temperature=float("nan")),
        "h-odd-seed": P.Generate(rid="h-odd-seed", model=TOY, prompt="hi", max_tokens=2, temperature=1.0,
                                 top_p=5.0, seed=2**64 - 1),
        "h-negative-seed": P.Generate(rid="h-negative-seed", model=TOY, prompt="hi", max_tokens=2, temperature=1.0,
                                      seed=-(2**63)),
        # The worker trusts the API to have validated messages; a template may render this.
        "h-bad-role": P.Generate(rid="h-bad-role", model=TOY, messages=[{"nope": 1}], max_tokens=2),
        "h-tiny-temp": P.Generate(rid="h-tiny-temp", model=TOY, prompt="hi", max_tokens=2, temperature=5e-324),
        "h-inf-temp": P.Generate(rid="h-inf-temp", model=TOY, prompt="hi", max_tokens=2, temperature=float("inf")),
        "h-no-prompt": P.Generate(rid="h-no-prompt", model=TOY, max_tokens=2, temperature=0.0),
        "h-extra-frames": None,  # a valid generate followed by junk buffer frames
    }
    for msg in [*errors.values(), *(m for m in odd_but_fine.values() if m is not None)]:
        fake.send(P.encode(msg))
    extra = P.Generate(rid="h-extra-frames", model=TOY, prompt="hi", max_tokens=2, temperature=0.0)
    fake.send(P.encode(extra, [os.urandom(1000), b"", os.urandom(10)]))
    # Messages a worker never expects from a broker, and a cancel for nothing.
    fake.send(P.encode(P.Final(rid="h-final", stop_reason="end_turn", prompt_tokens=1, completion_tokens=1,
                               generate_s=0.0, model=TOY, dtype="float32")))
    fake.send(P.encode(P.Register(worker_id="me", device="cpu", host="h", pid=1, capacity=1, models=[])))
    fake.send(P.encode(P.Cancel(rid="never-started")))

    for rid in errors:
        replies = fake.wait_for(rid, 60)
        assert len(replies) == 1 and isinstance(replies[0], P.Error), (rid, replies)
        assert replies[0].type in (P.ErrorType.INVALID_REQUEST, P.ErrorType.MODEL_NOT_FOUND,
                                   P.ErrorType.MODEL_NOT_LOADED, P.ErrorType.MODEL_LOAD_FAILED,
                                   P.ErrorType.CONTEXT_LENGTH), (rid, replies)
    for rid in odd_but_fine:
        replies = fake.wait_for(rid, 60)
        last = replies[-1]
        assert isinstance(last, (P.Final, P.Error)), (rid, replies)
        if isinstance(last, P.Final):
            assert 1 <= last.completion_tokens <= 2, (rid, last)
        else:
            assert last.type == P.ErrorType.INVALID_REQUEST, (rid, last)
    assert "h-final" not in fake.replies
    generate_ok(fake, "after-hostile")
    assert proc.poll() is None
    log = log_path.read_text(errors="replace")
    assert "unexpected final message from the broker; dropped" in log
    assert "unexpected register message from the broker; dropped" in log
    assert "Traceback" not in log, log[-4000:]  # every request was answered, none blew up


def test_worker_rejects_type_confusion_in_layers(worker_and_fake_broker):
    """`layers` of the wrong element type must not reach the engine thread and kill it."""
    fake, proc, log_path = worker_and_fake_broker
    for i, layers in enumerate((["x"], [None], [[1]], [{"a": 1}], [True])):
        fake.send([pack(header(P.Generate(rid=f"tl-{i}", model=TOY, prompt="hi", max_tokens=2), layers=layers))])
    generate_ok(fake, "after-layers")  # answered after the five above: the engine thread is alive
    assert proc.poll() is None
    assert "Traceback" not in log_path.read_text(errors="replace")
    for i in range(4):
        # Either dropped at decode (no reply) or answered with an invalid-request error.
        fake.pump(0.05)
        for msg, _ in fake.replies.get(f"tl-{i}", []):
            assert isinstance(msg, P.Error) and msg.type == P.ErrorType.INVALID_REQUEST, msg


# --- the broker ----------------------------------------------------------------------------


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


def test_worker_sends_a_step_as_one_message_per_api(worker_and_fake_broker):
    """Requests from two API processes, running together: each step's tokens leave as one Tokens
    message per API, naming it and holding only its requests' tokens; each Final follows its tokens."""
    fake, proc, _ = worker_and_fake_broker
    rids = {"ba-a1": b"api-a", "ba-a2": b"api-a", "ba-b1": b"api-b"}
    batches: list[P.Tokens] = []
    order: dict[str, list[str]] = {rid: [] for rid in rids}
    for rid, api in rids.items():
        fake.send(P.encode(P.Generate(rid=rid, model=TOY, prompt="Count from 1 to 5.", max_tokens=12,
                                      temperature=0.0, api=api)))
    deadline = time.monotonic() + 60
    while not all(o and o[-1] == "final" for o in order.values()):
        assert time.monotonic() < deadline, order
        frames = recv(fake.sock, 1)
        if frames is None:
            continue
        msg, _ = P.decode(frames[1:])
        if isinstance(msg, P.Tokens):
            batches.append(msg)
            for rid in msg.rids:
                order[rid].append("token")
        elif isinstance(msg, P.Final) and msg.rid in order:
            order[msg.rid].append("final")
    for batch in batches:
        assert {rids[r] for r in batch.rids} == {batch.api} and len(set(batch.rids)) == len(batch.rids), batch
    # Rows of one API that ran in the same step shared a message.
    assert any(set(batch.rids) == {"ba-a1", "ba-a2"} for batch in batches), [b.rids for b in batches]
    for rid, seen in order.items():
        assert seen[-1] == "final" and seen.count("final") == 1 and "token" in seen, (rid, seen)
    assert proc.poll() is None
