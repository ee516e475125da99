"""The worker's connections to the broker, and the engine thread's own one for the frames of requests.

Tokens used to go engine thread -> outbox -> socket thread -> ZeroMQ: the
socket thread woke for every step and took the GIL from the engine thread to
send, about 3 thread switches a token. On a 2-core machine that cost a
single stream on the 4M model ~20% of its rate. Here the engine thread sends
on a DEALER socket only it uses; ZeroMQ's I/O thread, which needs no GIL,
does the writing. The broker counts this connection (loom/peers.py) as the
worker. Registration, heartbeats and model lists stay on the socket
thread's connection (workers/main.py), made by the same `broker_dealer`.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

import zmq

from loom import protocol as P
from loom.curve import apply_curve_client
from loom.peers import DATA_IDENTITY_SUFFIX
from workers.direct_replies import DirectReplies

log = logging.getLogger("loom.worker")


def broker_dealer(ctx: zmq.Context, identity: bytes, args: argparse.Namespace) -> zmq.Socket:
    """A DEALER connected to the broker at args.broker (CURVE when configured), reconnecting quickly."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    apply_curve_client(sock, args)
    sock.connect(args.broker)
    return sock


def send_now(sock: zmq.Socket, frames: list[Any]) -> bool:
    """Send encoded frames without blocking; False when the broker is not connected or its queue is full."""
    try:
        if len(frames) == 1:
            sock.send(frames[0], zmq.NOBLOCK)
        else:
            sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        return True
    except zmq.Again:
        return False


class DataSocket:
    """`put(msg, buffers)` sends at once, without blocking. Only the engine thread may use it.

    A request whose API process is on this host answers it directly
    (workers/direct_replies.py): `route` says which way each request goes.
    """

    def __init__(self, ctx: zmq.Context, worker_id: str, args: argparse.Namespace) -> None:
        self.sock = broker_dealer(ctx, worker_id.encode() + DATA_IDENTITY_SUFFIX, args)
        self.direct = DirectReplies(self._to_broker)
        self._dropped = 0

    def route(self, rid: str, api: bytes, reply_to: str) -> bytes:
        """The key a request's tokens are batched under (StepBatch): one per destination."""
        return self.direct.route(rid, api, reply_to)

    def put(self, msg: P.Message, buffers: list[Any]) -> None:
        if not self.direct.send(msg, buffers):
            self._to_broker(msg, buffers)

    def _to_broker(self, msg: P.Message, buffers: list[Any] | tuple[Any, ...] = ()) -> None:
        if not send_now(self.sock, P.encode(msg, buffers)):
            # The broker fails the request when it notices; waiting here would stop every stream.
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.warning("broker not accepting frames; %d dropped so far", self._dropped)

    def close(self) -> None:
        self.direct.close()
        self.sock.close(0)
