"""A step's tokens leave the worker as one message per API process, not one per token.

The engine sends every frame through `put`. Token messages are held and
grouped by the API process their request came from (the broker stamps it on
the Generate); `flush`, called once per engine loop, sends each group as one
`Tokens` message: one msgpack encode, one ZeroMQ message through the broker
and one read in the API, instead of one per row. A request's other frames
(its Final, a States block) never overtake its tokens: while it has a token
waiting they wait behind the batch.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from loom import protocol as P
from loom.token_batch import TokenBatch

Send = Callable[[P.Message, list[Any]], None]


class StepBatch:
    def __init__(self, send: Send) -> None:
        self._send = send
        self._api: dict[str, bytes] = {}  # rid -> identity of the API process that asked
        self._groups: dict[bytes, TokenBatch] = {}
        self._waiting: set[str] = set()  # rids with a token in a group
        self._after: list[tuple[P.Message, list[Any]]] = []

    def route(self, rid: str, api: bytes) -> None:
        self._api[rid] = api

    def forget(self, rid: str) -> None:
        self._api.pop(rid, None)

    def _group(self, api: bytes) -> TokenBatch:
        group = self._groups.get(api)
        if group is None:
            group = self._groups[api] = TokenBatch()
        return group

    def put(self, msg: P.Message, buffers: list[Any]) -> None:
        if type(msg) is P.Token:
            self._group(self._api.get(msg.rid, b"")).add(msg, buffers)
            self._waiting.add(msg.rid)
            return
        rid = getattr(msg, "rid", None)
        if isinstance(msg, (P.Final, P.Error)):
            self._api.pop(rid, None)
        if rid in self._waiting:
            self._after.append((msg, buffers))
        else:
            self._send(msg, buffers)

    def put_texts(self, rids: list[str], texts: list[str], indexes: list[int]) -> None:
        """put(Token(rid, text, index)) for each entry (a step's plain tokens), without Token objects."""
        if not rids:
            return
        api_of = self._api
        apis = {api_of.get(rid, b"") for rid in rids}
        if len(apis) == 1:  # the usual case: one API process, or one request
            self._group(apis.pop()).add_texts(rids, texts, indexes)
        else:
            for rid, text, index in zip(rids, texts, indexes):
                self._group(api_of.get(rid, b"")).add_texts([rid], [text], [index])
        self._waiting.update(rids)

    def flush(self) -> None:
        if not self._groups:
            return
        now = time.time()
        for api, group in self._groups.items():
            self._send(*group.message(api, now))
        self._groups.clear()
        self._waiting.clear()
        after, self._after = self._after, []
        for msg, buffers in after:
            self._send(msg, buffers)
