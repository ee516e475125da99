"""The engine thread's own connection to the broker, for the frames of requests.

Tokens used to go engine thread -> outbox -> socket thread -> ZeroMQ: the
socket thread woke for every step and took the GIL from the engine thread to
send, about 3 thread switches a token. On a 2-core machine that cost a
single stream on the 4M model ~20% of its rate. Here the engine thread sends
on a DEALER socket only it uses; ZeroMQ's I/O thread, which needs no GIL,
does the writing. The broker counts this connection (the worker's identity
plus P.DATA_IDENTITY_SUFFIX) as the worker. Registration, heartbeats and
model lists stay on the socket thread's connection (workers/main.py).
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

import zmq

from loom import protocol as P
from loom.curve import apply_curve_client

log = logging.getLogger("loom.worker")


class DataSocket:
    """`put(msg, buffers)` sends at once, without blocking. Only the engine thread may call it."""

    def __init__(self, ctx: zmq.Context, worker_id: str, args: argparse.Namespace) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, worker_id.encode() + P.DATA_IDENTITY_SUFFIX)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        apply_curve_client(self.sock, args)
        self.sock.connect(args.broker)
        self._dropped = 0

    def put(self, msg: P.Message, buffers: list[Any]) -> None:
        frames = P.encode(msg, buffers)
        try:
            if len(frames) == 1:
                self.sock.send(frames[0], zmq.NOBLOCK)
            else:
                self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            # No broker connection, or its queue is full: the broker fails the
            # request when it notices; waiting here would stop every stream.
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.warning("broker not accepting frames; %d dropped so far", self._dropped)

    def close(self) -> None:
        self.sock.close(0)
