"""Hostile ZeroMQ frames sent to a worker: malformed, truncated, mistyped and
oversized messages.

Real processes only. A worker gets garbage from a ROUTER socket that this test
binds in place of a broker; it must drop what it cannot use, say so in its
log, and go on answering real requests correctly. The broker's side is in
test_hostile_frames.py.
"""
from __future__ import annotations

import os
import time
from typing import Any

import pytest
import zmq

from loom import protocol as P
from loom.peers import DATA_IDENTITY_SUFFIX, worker_identity
from tests.conftest import TOY
from tests.helpers import free_port, stop_group, wait_until
from tests.hostile_frames import count, header, malformed_frames, pack, recv, spawn


class FakeBroker:
    """A ROUTER socket standing in for the broker's backend."""

    def __init__(self, ctx: zmq.Context):
        self.port = free_port()
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(f"tcp://127.0.0.1:{self.port}")
        self.worker: bytes | None = None
        self.replies: dict[str, list[tuple[P.Message, list[bytes]]]] = {}
        self.senders: dict[str, set[bytes]] = {}  # rid -> the connections its replies came on
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
                    self.senders.setdefault(msg.rid, set()).add(identity)
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


def test_request_frames_come_on_the_engine_connection_and_model_lists_on_the_worker_one(worker_and_fake_broker):
    fake, _, _ = worker_and_fake_broker
    generate_ok(fake, "via-data")
    assert fake.senders["via-data"] == {fake.worker + DATA_IDENTITY_SUFFIX}
    assert worker_identity(fake.worker + DATA_IDENTITY_SUFFIX) == fake.worker == worker_identity(fake.worker)
    # Loaded changes the model list the heartbeats carry: it goes with them, in order.
    fake.send(P.encode(P.Load(rid="reload", model=TOY)))
    assert isinstance(fake.wait_for("reload", 60)[-1], P.Loaded)
    assert fake.senders["reload"] == {fake.worker}


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
            # An end of turn may be sampled first (infinite temperature draws it 1 time in vocabulary size).
            assert last.completion_tokens <= 2, (rid, last)
            assert last.completion_tokens >= 1 or last.stop_reason == "end_turn", (rid, last)
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
