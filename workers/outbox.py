"""Frames leaving the engine thread, handed to the socket thread.

A deque plus a wake-up pipe: the socket thread polls the pipe's read end next
to its ZeroMQ socket, so a frame is on the wire microseconds after the engine
produced it, and the engine never blocks on (or touches) that socket. Request
frames take the engine's own socket instead (workers/data_socket.py); what
comes here is the model list changes, which must stay in order with the
socket thread's heartbeats.
"""
from __future__ import annotations

import collections
import os
from typing import Any

from loom import protocol as P


class Outbox:
    def __init__(self) -> None:
        self._frames: collections.deque[list[Any]] = collections.deque()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._woken = False  # a wake-up byte is in the pipe that no drain has started on
        self._first_seen: list[Any] | None = None  # the oldest frame at the last `overdue` call

    @property
    def fileno(self) -> int:
        return self._read_fd

    def put(self, msg: P.Message, buffers: list[Any]) -> None:
        self._frames.append(P.encode(msg, buffers))
        # One wake-up byte per batch the reader has not started on: a frame
        # put while one is pending rides on it (drain clears the flag after
        # it empties the pipe and before it takes the frames, so a frame put
        # after that writes a new byte, which no earlier read can swallow).
        if not self._woken:
            self._woken = True
            try:
                os.write(self._write_fd, b"\0")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already: the reader will drain

    def drain(self) -> list[list[Any]]:
        try:
            os.read(self._read_fd, 4096)  # a wake-up left over makes one empty drain later, no harm
        except BlockingIOError:
            pass
        # Only now: cleared before the read, a put landing between the two
        # would write a byte that this read swallows, leaving the flag set
        # with no byte in the pipe, and every later frame stranded.
        self._woken = False
        frames = []
        while self._frames:
            frames.append(self._frames.popleft())
        return frames

    def overdue(self) -> list[list[Any]]:
        """The waiting frames, drained, if the oldest was already waiting at the previous call.

        The socket thread calls this once a heartbeat: a frame that waited a
        whole interval had no wake-up (a drain follows a wake-up within
        microseconds), and is sent late instead of never. Only the socket
        thread pops frames, so the oldest one cannot go while this looks.
        """
        first = self._frames[0] if self._frames else None
        stale = first is not None and first is self._first_seen
        self._first_seen = None if stale else first
        return self.drain() if stale else []
