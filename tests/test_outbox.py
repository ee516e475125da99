"""The worker's outbox: frames put by the engine thread reach the socket
thread, which drains only when the wake-up pipe is readable (as
workers/main.py's SocketLoop does). A lost wake-up strands frames for good:
the worker keeps heartbeating while its streams go silent."""
from __future__ import annotations

import os
import select
import threading
import time

import pytest

from loom import protocol as P
from workers.outbox import Outbox


def test_no_frame_is_stranded_without_a_wake_up(monkeypatch: pytest.MonkeyPatch) -> None:
    # The socket thread can be preempted anywhere in drain; the widest place is the pipe read,
    # so each read here starts late, letting the engine's puts land around it as they can in production.
    real_read = os.read

    def late_read(fd: int, n: int) -> bytes:
        time.sleep(0.0002)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", late_read)
    outbox = Outbox()
    total = 20_000
    got = 0

    def engine() -> None:
        for i in range(total):
            outbox.put(P.Cancel(rid=str(i)), [])
            if i % 8 == 0:
                time.sleep(0)  # a step's worth of frames, then let the socket thread in

    thread = threading.Thread(target=engine)
    thread.start()
    try:
        while got < total:
            # Generous: the engine thread puts continuously, so a readable pipe comes within
            # milliseconds unless a wake-up was lost; then none ever comes.
            readable, _, _ = select.select([outbox.fileno], [], [], 10.0)
            if not readable:
                break
            got += len(outbox.drain())
    finally:
        thread.join()
    stranded = total - got
    assert stranded == 0, f"{stranded} frames waiting with no wake-up byte in the pipe"


def test_frames_come_out_in_order() -> None:
    outbox = Outbox()
    for i in range(5):
        outbox.put(P.Cancel(rid=str(i)), [])
    frames = outbox.drain()
    assert [P.decode(f)[0].rid for f in frames] == ["0", "1", "2", "3", "4"]
    assert outbox.drain() == []


def test_a_frame_without_a_wake_up_is_caught_at_the_second_heartbeat() -> None:
    outbox = Outbox()
    outbox.put(P.Cancel(rid="woken"), [])
    assert outbox.overdue() == []  # waiting, with its wake-up byte: not overdue
    assert len(outbox.drain()) == 1  # the drain the byte brings
    assert outbox.overdue() == []

    outbox._woken = True  # as a lost wake-up leaves it: the flag set, no byte in the pipe
    outbox.put(P.Cancel(rid="stranded"), [])
    assert not select.select([outbox.fileno], [], [], 0)[0]
    assert outbox.overdue() == []  # first seen: it may have just arrived
    late = outbox.overdue()  # still the oldest a heartbeat later: sent late instead of never
    assert [P.decode(f)[0].rid for f in late] == ["stranded"]
    assert outbox.overdue() == []
    outbox.put(P.Cancel(rid="next"), [])  # and the wake-ups work again
    assert select.select([outbox.fileno], [], [], 0)[0]
