"""The API process's own socket for the frames of its generations, skipping the broker.

Relaying a step's tokens through the broker woke the broker's thread and
ZeroMQ's I/O threads on the way: about 9 µs of CPU a token at 64 streams on
a 2-core machine, a third of the whole relay (bench/README.md, "Replies
straight to the API"). A worker on the same host writes them here instead
(workers/direct_replies.py): a Unix socket in a directory only this user may
enter, named in each Generate (`reply_to`), read by the event loop itself,
so no thread is woken between the worker's write and this process's read.
Messages are framed as loom/stream_frames.py says. The broker still routes
every request, hears each one's end (`Ended`) and fails the requests of a
worker it loses; everything but a generation's frames keeps its old path.

A Unix socket cannot be reached from another host: a worker there answers
through the broker as before, and nothing new is exposed on the network.
A process killed outright leaves its directory behind; the next API process
to start removes those nothing listens on (`sweep_stale`).
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
import time
from typing import Any, Callable

from loom.protocol_checks import ProtocolError
from loom.stream_frames import FrameReader

log = logging.getLogger("loom.api")

# Longest path a Unix socket may have (sun_path is 108 bytes on Linux, with its NUL).
_MAX_PATH = 107
PREFIX = "loom-api-"
STALE_AFTER_S = 60.0

OnMessage = Callable[[list[Any]], None]


class ReplySocket:
    """A Unix socket server on a private path: workers connect to `endpoint` ("unix:" + path)."""

    def __init__(self) -> None:
        sweep_stale(tempfile.gettempdir())
        self._dir = tempfile.mkdtemp(prefix=PREFIX)  # mode 0700: other users cannot connect
        self.path = os.path.join(self._dir, "replies")
        if len(self.path.encode()) > _MAX_PATH:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise OSError(f"temporary directory path too long for a Unix socket: {self.path}")
        self.endpoint = f"unix:{self.path}"
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.BaseTransport] = set()

    async def start(self, on_message: OnMessage) -> None:
        """Serve workers' connections: each whole message they write goes to `on_message` (its parts)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(on_message, self._connections), self.path)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for transport in list(self._connections):
            transport.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class _Connection(asyncio.Protocol):
    """One worker engine's connection."""

    def __init__(self, on_message: OnMessage, connections: set[asyncio.BaseTransport]) -> None:
        self._on_message = on_message
        self._connections = connections
        self._reader = FrameReader()
        self._transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._connections.add(transport)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._reader.feed(data)
        except ProtocolError as exc:
            # Nothing after a bad length can be framed: the worker's requests on it end, it reconnects.
            log.warning("closed a worker's reply connection: %s", exc)
            self._transport.close()
            return
        for parts in messages:
            self._on_message(parts)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self._transport)


def sweep_stale(parent: str) -> None:
    """Remove the socket directories of API processes that died without removing theirs (a SIGKILL, a crash).

    Only this user's, only those older than STALE_AFTER_S (a process that
    has just made its directory may not have bound its socket yet), and only
    where nothing listens any more: connecting is refused or finds no socket.
    """
    now = time.time()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        try:
            if not entry.name.startswith(PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            info = entry.stat(follow_symlinks=False)
            if info.st_uid != os.getuid() or now - info.st_mtime < STALE_AFTER_S:
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(os.path.join(entry.path, "replies"))
            continue  # a live API process answered
        except (ConnectionRefusedError, FileNotFoundError):
            shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            continue


def open_reply_socket() -> ReplySocket | None:
    """A ReplySocket, or None (with a log line) where one cannot be made: replies then come through the broker."""
    try:
        return ReplySocket()
    except OSError as exc:
        log.warning("replies come through the broker: no socket of our own (%s)", exc)
        return None
