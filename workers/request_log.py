"""The worker's log lines about each request, each naming its X-Request-Id.

The engine notes a request when it admits it and sees every frame it emits
(the runner's emit callback), so one line marks the start and one the end of
each request, with no change to the step loop.
"""
from __future__ import annotations

import logging
from typing import Any

from loom import protocol as P
from loom.logs import request_context

log = logging.getLogger("loom.worker")


class RequestLog:
    def __init__(self) -> None:
        self._ids: dict[str, str] = {}  # rid -> request id, while the request runs

    def context(self, item: Any):
        """Log lines while handling `item` name its request (the id travels on it, or was noted)."""
        rid = getattr(item, "rid", "")
        return request_context(getattr(item, "request_id", "") or self._ids.get(rid, ""))

    def admitted(self, req: P.Generate) -> None:
        self._ids[req.rid] = req.request_id
        log.info("request %s admitted: model %s, max_tokens %d", req.rid, req.model, req.max_tokens)

    def emitted(self, msg: P.Message) -> None:
        if type(msg) is P.Token:  # the hot path: nothing to note
            return
        if isinstance(msg, (P.Final, P.Error)):
            request_id = self._ids.pop(msg.rid, None)
            if request_id is None:
                return
            with request_context(request_id):
                if isinstance(msg, P.Final):
                    log.info("request %s finished: %s, %d prompt + %d completion tokens in %.3fs", msg.rid,
                             msg.stop_reason, msg.prompt_tokens, msg.completion_tokens, msg.generate_s)
                else:
                    log.info("request %s ended with %s: %s", msg.rid, msg.type, msg.message)

    def cancelled(self, rid: str) -> None:
        request_id = self._ids.pop(rid, "")
        with request_context(request_id):
            log.info("request %s cancelled", rid)

    def forget_all(self) -> None:
        self._ids.clear()
