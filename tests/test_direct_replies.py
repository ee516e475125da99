"""Direct replies (issue 13): a worker on the API's host writes a generation's frames to the API's own socket.

The framing, each end on real Unix sockets, and a real broker, worker and two
API processes (one taking everything through the broker) for the paths
end to end: the same answers either way, and an API process that dies mid-stream
stops its generation on the worker and frees the broker's route.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import threading

import httpx
import numpy as np
import pytest

from api.broker_client import BrokerClient, BrokerError, Mailbox
from loom import protocol as P
from loom.protocol_checks import ProtocolError
from loom.stream_frames import FrameReader, framed
from tests.conftest import TOY
from tests.helpers import user, wait_until
from tests.ops_processes import Parts
from workers import direct_replies
from workers.direct_replies import DirectReplies

ARRAY = np.arange(12, dtype=np.float32).reshape(3, 4)


def _stream(*messages: list) -> bytes:
    out = b""
    for parts in messages:
        buffers, size = framed(parts)
        data = b"".join(bytes(memoryview(b)) for b in buffers)
        assert len(data) == size
        out += data
    return out


def _as_bytes(messages: list[list]) -> list[list[bytes]]:
    return [[bytes(p) for p in parts] for parts in messages]


def test_messages_are_whole_however_the_stream_is_cut():
    messages = [[b"header one"], [b"header two", memoryview(ARRAY.data), b""], [b"x" * 70_000]]
    want = [[b"header one"], [b"header two", ARRAY.tobytes(), b""], [b"x" * 70_000]]
    data = _stream(*messages)
    for cut in [*range(0, 40), *range(len(data) - 40, len(data) + 1), len(data) // 2]:
        reader = FrameReader()
        got = reader.feed(data[:cut]) + reader.feed(data[cut:])
        assert _as_bytes(got) == want, cut
    reader = FrameReader()
    got = [m for i in range(0, len(data), 997) for m in reader.feed(data[i:i + 997])]
    assert _as_bytes(got) == want


@pytest.mark.parametrize("data", [
    struct.pack("<II", 1 << 31, 1),  # larger than any message may be
    struct.pack("<II", 8, 5),  # more part lengths than bytes
    struct.pack("<III", 8, 1, 3) + b"abcd",  # parts that do not add up to the size
])
def test_a_stream_that_cannot_be_framed_is_refused(data):
    with pytest.raises(ProtocolError):
        FrameReader().feed(data)


@pytest.fixture
def listener(tmp_path):
    path = str(tmp_path / "replies")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen()
    yield path, srv
    srv.close()


def _read_messages(conn: socket.socket, count: int) -> list[P.Message]:
    reader, got = FrameReader(), []
    conn.settimeout(10)
    while len(got) < count:
        got += reader.feed(conn.recv(1 << 16))
    return [P.decode(parts)[0] for parts in got]


def _final(rid: str) -> P.Final:
    return P.Final(rid=rid, stop_reason="max_tokens", prompt_tokens=1, completion_tokens=1, generate_s=0.0,
                   model="m", dtype="float32")


def test_a_request_answers_directly_and_the_broker_hears_its_end(listener):
    path, srv = listener
    to_broker: list[P.Message] = []
    replies = DirectReplies(to_broker.append)
    key = replies.route("r1", b"api-1", f"unix:{path}")
    assert key != b"api-1"  # its tokens are batched apart from those that go through the broker
    conn, _ = srv.accept()
    assert replies.send(P.Tokens(api=key, rids=["r1"], texts=["hi"], indexes=[0]), [])
    assert replies.send(_final("r1"), [])
    assert to_broker == [P.Ended(rid="r1")]
    tokens, final = _read_messages(conn, 2)
    assert type(tokens) is P.Tokens and tokens.rids == ["r1"] and tokens.texts == ["hi"]
    assert final == _final("r1")
    # Its request is over: later frames for it, and other requests' frames, take the broker's path.
    assert not replies.send(_final("r1"), []) and not replies.send(_final("r9"), [])
    replies.close()
    conn.close()


def test_without_a_reachable_socket_requests_answer_through_the_broker(tmp_path):
    replies = DirectReplies([].append)
    # Another host's path, a path with no listener, no socket named, a transport that is not ours.
    for reply_to in (f"unix:{tmp_path}/nothing-here", "", "tcp://127.0.0.1:1"):
        assert replies.route("r1", b"api-1", reply_to) == b"api-1"
        assert not replies.send(_final("r1"), [])


def test_an_api_process_that_went_away_loses_its_requests(listener):
    path, srv = listener
    to_broker: list[P.Message] = []
    replies = DirectReplies(to_broker.append)
    key = replies.route("r1", b"api-1", f"unix:{path}")
    assert replies.route("r2", b"api-1", f"unix:{path}") == key
    conn, _ = srv.accept()
    conn.close()
    lost: list[str] = []
    for i in range(100):
        replies.send(P.Tokens(api=key, rids=["r1", "r2"], texts=["x", "y"], indexes=[i, i]), [])
        lost += replies.take_lost()
        if lost:
            break
    assert sorted(lost) == ["r1", "r2"]  # the engine cancels these
    # The broker ends their routes, and their streams if the API is still listening.
    assert sorted(m.rid for m in to_broker) == ["r1", "r2"]
    assert all(isinstance(m, P.Error) and m.type == P.ErrorType.WORKER_LOST for m in to_broker)
    # A step's later tokens for them go nowhere, and nothing is reported twice.
    assert replies.send(P.Tokens(api=key, rids=["r1"], texts=["z"], indexes=[100]), [])
    assert replies.take_lost() == [] and len(to_broker) == 2


def test_a_full_socket_holds_frames_back_in_order_until_the_api_reads(listener, monkeypatch):
    path, srv = listener
    replies = DirectReplies([].append)
    key = replies.route("r1", b"api-1", f"unix:{path}")
    conn, _ = srv.accept()
    payload = os.urandom(50_000).hex()

    def tokens(i: int) -> P.Tokens:
        return P.Tokens(api=key, rids=["r1"], texts=[f"{i}:{payload}"], indexes=[i])

    sent = 0
    while not replies.pending:  # the socket's buffers fill up: the rest waits in the worker
        assert replies.send(tokens(sent), [])
        sent += 1
    for _ in range(5):
        assert replies.send(tokens(sent), [])
        sent += 1
    got: list[P.Message] = []
    reader = threading.Thread(target=lambda: got.extend(_read_messages(conn, sent)))
    reader.start()
    wait_until(lambda: replies.flush() or not replies.pending, 30, 0.01, "the held frames to be written")
    reader.join(30)
    assert [m.indexes[0] for m in got] == list(range(sent))
    assert all(m.texts[0] == f"{m.indexes[0]}:{payload}" for m in got)
    assert replies.take_lost() == []
    # An API process that lets too much pile up unread loses its requests instead of the worker's memory.
    monkeypatch.setattr(direct_replies, "MAX_PENDING_BYTES", 1 << 20)
    for i in range(100):
        replies.send(tokens(i), [])
        if replies.take_lost() == ["r1"]:
            break
    else:
        pytest.fail("an API process that never reads kept its request")
    conn.close()


def test_the_api_routes_frames_from_its_socket_and_drops_a_connection_it_cannot_read():
    async def main() -> None:
        client = BrokerClient("tcp://127.0.0.1:9")  # no broker: only the reply socket is used here
        await client.start()
        loop = asyncio.get_running_loop()
        try:
            generate = P.Generate(rid="r1", model="m", prompt="hi")
            with pytest.raises(BrokerError):
                client._send(generate)
            assert generate.reply_to == client.replies.endpoint  # every Generate names the socket
            box = client.queues["r1"] = Mailbox()
            worker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            worker.setblocking(False)
            await loop.sock_connect(worker, client.replies.path)
            tokens = P.Tokens(api=b"k", rids=["r1", "someone-else"], texts=["a", "b"], indexes=[0, 0])
            await loop.sock_sendall(worker, _stream(P.encode(tokens)))
            frames = await asyncio.wait_for(box.take(), 10)
            assert [(m.rid, m.text) for m, _ in frames] == [("r1", "a")]
            # A connection that sends what cannot be framed is closed; the others carry on.
            bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            bad.setblocking(False)
            await loop.sock_connect(bad, client.replies.path)
            await loop.sock_sendall(bad, struct.pack("<II", 1 << 31, 1))
            assert await asyncio.wait_for(loop.sock_recv(bad, 1), 10) == b""
            await loop.sock_sendall(worker, _stream(P.encode(_final("r1"))))
            frames = await asyncio.wait_for(box.take(), 10)
            assert frames[0][0] == _final("r1")
            worker.close()
            bad.close()
        finally:
            await client.close()
        assert not os.path.exists(client.replies.path)

    asyncio.run(main())


def test_directories_left_by_dead_api_processes_are_swept_and_live_ones_kept(tmp_path):
    from api.reply_socket import PREFIX, STALE_AFTER_S, sweep_stale

    def made(name: str, listening: bool, age_s: float) -> tuple[str, socket.socket]:
        d = tmp_path / f"{PREFIX}{name}"
        d.mkdir(mode=0o700)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(d / "replies"))
        if listening:
            sock.listen()
        else:
            sock.close()  # the process died: the socket file stays, nothing listens
        old = os.stat(d).st_mtime - age_s
        os.utime(d, (old, old))
        return str(d), sock

    dead, _ = made("dead", listening=False, age_s=STALE_AFTER_S + 5)
    alive, live_sock = made("alive", listening=True, age_s=STALE_AFTER_S + 5)
    young, _ = made("young", listening=False, age_s=0)  # may not have bound its socket yet
    unrelated = tmp_path / "someone-else"
    unrelated.mkdir()
    sweep_stale(str(tmp_path))
    assert not os.path.exists(dead)
    assert os.path.exists(alive) and os.path.exists(young) and unrelated.exists()
    live_sock.close()


# --- end to end ----------------------------------------------------------------------------------------

@pytest.fixture
def parts(tmp_path, model_dir):
    p = Parts(tmp_path)
    p.broker()
    p.worker("worker", [str(model_dir / TOY)])
    try:
        yield p
    finally:
        p.stop_all()


def _ready(url: str) -> bool:
    return httpx.get(f"{url}/health", timeout=5).status_code == 200


def test_answers_are_the_same_either_way_and_a_dead_api_stops_its_generation(parts):
    direct = parts.api("direct")
    relayed = parts.api("relayed", ["--no-direct-replies"])
    wait_until(lambda: _ready(direct) and _ready(relayed), 120, 0.2, "the worker")
    body = {"model": TOY, "messages": user("Tell me a story"), "max_tokens": 24, "temperature": 0.9, "seed": 7}
    texts = []
    for url in (direct, relayed):
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        texts.append(r.json()["text"])
    assert texts[0] == texts[1] and texts[0]
    assert "answering requests from the API process at" in parts.log("worker")
    assert parts.log("relayed").count("replies all through the broker") == 1

    # A stream that will not end by itself (greedy on the toy model); its API process is killed while it runs.
    with httpx.stream("POST", f"{direct}/v1/chat/completions", timeout=60,
                      json={"model": TOY, "messages": user("go on"), "max_tokens": 8000, "temperature": 0,
                            "stream": True}) as r:
        assert r.status_code == 200  # the headers wait for the first frame: it is generating
        # Dead before this client hangs up, so no Cancel can come from it.
        os.kill(parts.procs["direct"].pid, signal.SIGKILL)
        parts.procs.pop("direct").wait(10)

    def idle() -> bool:
        workers = httpx.get(f"{relayed}/health", timeout=5).json()["workers"]
        return workers[0]["active_requests"] == 0 and workers[0]["generating"] == 0

    wait_until(idle, 60, 0.2, "the worker to stop the dead API's stream and the broker to drop its route")
    assert "stopped taking frames" in parts.log("worker")
