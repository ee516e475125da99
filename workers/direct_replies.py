"""A generation's frames sent straight to the API process that asked, when it is on this host.

Through the broker, each step's message woke the broker's thread and
ZeroMQ's I/O threads in three processes on the way: about 9 µs of CPU a
token at 64 streams on a 2-core machine, a third of the relay. An API
process names a Unix socket of its own in each Generate (`reply_to`,
api/reply_socket.py). The engine connects to it once and writes each step's
message for that process there itself: one non-blocking `sendmsg`, read by
the API's event loop, with no thread woken on either side in between.

Connecting to a Unix socket succeeds or fails at once, so a request knows
its path when it is admitted, and keeps it: its frames never overtake each
other. A worker on another host finds no such path and answers through the
broker, as before. The broker still routes each request and fails it if this
worker is lost; it hears that a direct request is over from a small `Ended`.

When the API process is gone, or has let MAX_PENDING_BYTES pile up unread,
its requests are lost: each gets an Error through the broker (which ends its
route, and its stream if the API is still there) and the engine cancels them.
"""
from __future__ import annotations

import logging
import socket
import time
from typing import Any, Callable

from loom import protocol as P
from loom.stream_frames import framed

log = logging.getLogger("loom.worker")

MAX_PENDING_BYTES = 64 << 20  # unread by an API process that is alive but not reading: past this, it is lost
RETRY_S = 2.0  # an API process we could not connect to is tried again this much later
MAX_PEERS = 64  # API processes remembered; past this, those without a connection are forgotten
MAX_IOVECS = 512  # sendmsg takes at most IOV_MAX (1024) buffers; more are joined first

_TERMINAL = (P.Final, P.Error)


class _Peer:
    """One API process's reply socket, as this engine sees it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.key = b"direct " + path.encode()  # the StepBatch group of its requests' tokens
        self.sock: socket.socket | None = None
        self.pending = bytearray()  # written after what the socket would not take yet
        self.rids: set[str] = set()
        self.retry_at = 0.0

    def connect(self) -> bool:
        if time.monotonic() < self.retry_at:
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)  # a full accept queue must not stop the engine
        try:
            sock.connect(self.path)
        except OSError:  # no such socket here (another host), refused, not ours, busy
            sock.close()
            self.retry_at = time.monotonic() + RETRY_S
            return False
        self.sock = sock
        log.info("answering requests from the API process at %s directly", self.path)
        return True

    def send(self, parts: list[Any]) -> bool:
        """Write one message; False when the API process is gone or too far behind."""
        buffers, size = framed(parts)
        if self.pending:
            self.pending += b"".join(buffers)
            return self.flush()
        try:
            sent = self.sock.sendmsg(buffers if len(buffers) <= MAX_IOVECS else [b"".join(buffers)])  # type: ignore[union-attr]
        except BlockingIOError:
            sent = 0
        except OSError:
            return False
        if sent < size:
            self.pending += b"".join(buffers)[sent:]
        return len(self.pending) <= MAX_PENDING_BYTES

    def flush(self) -> bool:
        """Write what was held back; False when the API process is gone or too far behind."""
        try:
            sent = self.sock.send(self.pending)  # type: ignore[union-attr]
        except BlockingIOError:
            sent = 0
        except OSError:
            return False
        del self.pending[:sent]
        return len(self.pending) <= MAX_PENDING_BYTES

    def disconnect(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.pending.clear()
        self.retry_at = time.monotonic() + RETRY_S


class DirectReplies:
    """Which requests answer straight to their API process, and sending their frames. Engine thread only."""

    def __init__(self, to_broker: Callable[[P.Message], None]) -> None:
        self._to_broker = to_broker
        self._peers: dict[str, _Peer] = {}  # by socket path
        self._by_key: dict[bytes, _Peer] = {}
        self._rids: dict[str, _Peer] = {}
        self._lost: list[str] = []

    def route(self, rid: str, api: bytes, reply_to: str) -> bytes:
        """The key `rid`'s tokens are grouped under: its peer's, or `api`'s (through the broker)."""
        if not reply_to.startswith("unix:"):
            return api
        path = reply_to[len("unix:"):]
        peer = self._peers.get(path)
        if peer is None:
            self._prune()
            peer = self._peers[path] = _Peer(path)
            self._by_key[peer.key] = peer
        if peer.sock is None and not peer.connect():
            return api
        peer.rids.add(rid)
        self._rids[rid] = peer
        return peer.key

    def send(self, msg: P.Message, buffers: list[Any]) -> bool:
        """Send `msg` straight to its API if its request answers that way; False if it does not."""
        if type(msg) is P.Tokens:
            peer = self._by_key.get(msg.api)
            if peer is None:
                return False
            if peer.sock is not None and not peer.send(P.encode(msg, buffers)):
                self._drop(peer)
            return True
        rid = getattr(msg, "rid", "")
        peer = self._rids.get(rid)
        if peer is None:
            return False
        if isinstance(msg, _TERMINAL):
            # The broker hears first, so it has freed the slot by the time the client can ask again
            # (a client answered at once and turned away by a stale count would get a needless 429).
            self._end(rid)
        if not peer.send(P.encode(msg, buffers)):
            self._drop(peer)
        return True

    @property
    def pending(self) -> bool:
        """Whether some API process has frames waiting to be written (`flush` soon)."""
        return any(p.pending for p in self._peers.values())

    def flush(self) -> None:
        for peer in self._peers.values():
            if peer.pending and not peer.flush():
                self._drop(peer)

    def forget(self, rid: str) -> None:
        """`rid` was cancelled through the broker, which has dropped its route already."""
        peer = self._rids.pop(rid, None)
        if peer is not None:
            peer.rids.discard(rid)

    def take_lost(self) -> list[str]:
        """Requests whose API process stopped taking their frames since the last call: the engine cancels them."""
        lost, self._lost = self._lost, []
        return lost

    def close(self) -> None:
        for peer in self._peers.values():
            peer.disconnect()

    def _prune(self) -> None:
        """Forget API processes we hold no connection to (restarted ones leave theirs behind)."""
        if len(self._peers) >= MAX_PEERS:
            for peer in [p for p in self._peers.values() if p.sock is None and not p.rids]:
                del self._peers[peer.path], self._by_key[peer.key]

    def _end(self, rid: str) -> None:
        peer = self._rids.pop(rid, None)
        if peer is not None:
            peer.rids.discard(rid)
            self._to_broker(P.Ended(rid=rid))

    def _drop(self, peer: _Peer) -> None:
        """The API process at `peer` is gone (or not reading): its requests are over here."""
        if peer.sock is None:
            return
        log.warning("the API process at %s stopped taking frames; stopping its %d request(s)", peer.path,
                    len(peer.rids))
        peer.disconnect()
        for rid in list(peer.rids):
            self._rids.pop(rid, None)
            # Through the broker, which ends its route, and the API's stream if it is still listening.
            self._to_broker(P.Error(rid=rid, type=P.ErrorType.WORKER_LOST,
                                    message="the worker lost its connection to the API process; retry"))
            self._lost.append(rid)
        peer.rids.clear()
