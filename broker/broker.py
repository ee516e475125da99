"""The broker: routes requests from API processes to workers, frames back.

Two ROUTER sockets: the frontend for API processes, the backend for workers.
It keeps the worker table (device, models, load, last heartbeat) and one
route per request in flight (which API asked, which worker serves it). A
frame from a worker is relayed only if that worker owns the request, so a
worker that was given up on (a missed heartbeat) can send nothing stale.
A worker on the asking API's host may send a generation's frames straight
to it instead (workers/direct_replies.py) and tell the broker when the
request is over (`Ended`).
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import zmq

from loom import protocol as P
from loom.logs import request_context
from loom.model_names import answers_to
from loom.peers import worker_identity
from loom.token_batch import TokenBatch

log = logging.getLogger("loom.broker")

TERMINAL = (P.Final, P.Error, P.Loaded, P.Unloaded, P.PatchResult)


@dataclass
class Worker:
    identity: bytes
    worker_id: str
    device: str
    host: str
    pid: int
    capacity: int
    models: list[dict[str, Any]]
    active: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    routes: set[str] = field(default_factory=set)
    figures: dict[str, int] = field(default_factory=dict)  # running, waiting, kv_cache_bytes (heartbeats)

    def has_model(self, model: str) -> bool:
        return self.model_info(model) is not None

    def model_info(self, model: str) -> dict[str, Any] | None:
        # Any of a model's names will do: its id, the path it was given, its absolute path.
        return next((m for m in self.models if answers_to(m, model)), None)

    @property
    def load(self) -> int:
        return len(self.routes)

    def describe(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "device": self.device, "host": self.host, "pid": self.pid,
                "capacity": self.capacity, "active_requests": self.load, "generating": self.active,
                "models": self.models, **self.figures,
                "last_heartbeat_s": round(time.monotonic() - self.last_seen, 3)}


def _valid_models(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A worker's model entries that name a model: anything else would trip routing and the API."""
    return [m for m in models if isinstance(m.get("model_id"), str)]


@dataclass
class Route:
    api: bytes
    worker: bytes
    kind: str
    # An unload goes to every worker holding the model (`worker` is then
    # b"*"); the API gets its answer when the last of them has answered.
    unloading: set[bytes] = field(default_factory=set)
    request_id: str = ""  # for log lines about it

    def served_by(self, identity: bytes) -> bool:
        return self.worker == identity or identity in self.unloading


class Broker:
    def __init__(self, frontend: zmq.Socket, backend: zmq.Socket):
        self.frontend = frontend
        self.backend = backend
        self.broker_id = uuid.uuid4().hex[:12]
        self.workers: dict[bytes, Worker] = {}
        self.routes: dict[str, Route] = {}

    # --- sending ---------------------------------------------------------------

    def _to_api(self, api: bytes, msg: P.Message, buffers: list[Any] = ()) -> bool:
        return self._send(self.frontend, api, P.encode(msg, buffers))

    def _to_api_raw(self, api: bytes, frames: list[Any]) -> bool:
        return self._send(self.frontend, api, frames)

    def _to_worker(self, identity: bytes, msg: P.Message) -> bool:
        return self._send(self.backend, identity, P.encode(msg))

    def _send(self, sock: zmq.Socket, identity: bytes, frames: list[Any]) -> bool:
        try:
            if len(frames) == 1:  # most messages: two sends, without send_multipart's checks
                sock.send(identity, zmq.NOBLOCK | zmq.SNDMORE)
                sock.send(frames[0], zmq.NOBLOCK, copy=False)
            else:
                sock.send_multipart([identity, *frames], zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the peer is gone (ROUTER_MANDATORY); EAGAIN: it is
            # not reading and its queue is full. Either way nothing waits here.
            if exc.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            return False

    def _fail(self, rid: str, error_type: str, message: str) -> None:
        route = self.routes.pop(rid, None)
        if route is None:
            return
        worker = self.workers.get(route.worker)
        if worker is not None:
            worker.routes.discard(rid)
        with request_context(route.request_id):
            log.info("request %s failed: %s", rid, error_type)
        self._to_api(route.api, P.Error(rid=rid, type=error_type, message=message))

    # --- frontend: requests from API processes -------------------------------------

    def on_frontend(self, frames: list[Any]) -> None:
        api, body = bytes(frames[0]), frames[1:]
        try:
            msg, _ = P.decode(body)
        except P.ProtocolError as exc:
            log.warning("dropped a malformed message from API %r: %s", api[:32], exc)
            return
        if isinstance(msg, P.Ping):
            self._to_api(api, P.Pong(broker_id=self.broker_id))
        elif isinstance(msg, (P.Generate, P.Patch, P.Load, P.Unload)):
            with request_context(msg.request_id):
                self._route(api, msg)
        elif isinstance(msg, P.StatusRequest):
            self._to_api(api, P.Status(rid=msg.rid, broker_id=self.broker_id,
                                       workers=[w.describe() for w in self.workers.values()]))
        elif isinstance(msg, P.Cancel):
            route = self.routes.get(msg.rid)
            if route is not None and route.api == api:  # only the API that asked may cancel
                del self.routes[msg.rid]
                worker = self.workers.get(route.worker)
                if worker is not None:
                    worker.routes.discard(msg.rid)
                    self._to_worker(route.worker, msg)
        else:
            log.warning("dropped an unexpected %s message from API %r", msg.kind, api[:32])

    def _route(self, api: bytes, msg: P.Generate | P.Patch | P.Load | P.Unload) -> None:
        if isinstance(msg, (P.Generate, P.Patch)):  # a patch goes where its model is, like a generation
            self._route_generate(api, msg)
        elif isinstance(msg, P.Load):
            self._route_load(api, msg)
        else:
            self._route_unload(api, msg)
        route = self.routes.get(msg.rid)
        if route is not None:
            route.request_id = msg.request_id
            worker = self.workers.get(route.worker)
            log.info("%s %s for %s -> %s", msg.kind, msg.rid, msg.model,
                     worker.worker_id if worker else f"{len(route.unloading)} worker(s)")
        else:
            log.info("%s %s for %s answered by the broker", msg.kind, msg.rid, msg.model)

    def _candidates(self, device: str | None) -> list[Worker]:
        return [w for w in self.workers.values() if device is None or w.device == device]

    def _route_generate(self, api: bytes, msg: P.Generate | P.Patch) -> None:
        if msg.rid in self.routes:
            self._to_api(api, P.Error(rid=msg.rid, type=P.ErrorType.INVALID_REQUEST, message="duplicate request id"))
            return
        holders = [w for w in self._candidates(msg.device) if w.has_model(msg.model)]
        if not holders:
            where = f" on {msg.device}" if msg.device else ""
            self._to_api(api, P.Error(rid=msg.rid, type=P.ErrorType.MODEL_NOT_LOADED,
                                      message=f"model {msg.model!r} is not loaded{where}"))
            return
        free = [w for w in holders if w.load < w.capacity]
        if not free:
            self._to_api(api, P.Error(rid=msg.rid, type=P.ErrorType.OVERLOADED, retry_after=1.0,
                                      message=f"every worker serving {msg.model!r} is at capacity; retry shortly"))
            return
        worker = min(free, key=lambda w: w.load / max(1, w.capacity))
        self._assign(api, worker, msg, "generate")

    def _assign(self, api: bytes, worker: Worker, msg: P.Message, kind: str) -> None:
        rid = msg.rid  # type: ignore[attr-defined]
        if isinstance(msg, P.Generate):
            msg.api = api  # whatever the API wrote: the worker batches its tokens by it
        if not self._to_worker(worker.identity, msg):
            self._worker_gone(worker, "its connection closed")
            self._to_api(api, P.Error(rid=rid, type=P.ErrorType.WORKER_LOST, message="the worker went away; retry"))
            return
        self.routes[rid] = Route(api=api, worker=worker.identity, kind=kind)
        worker.routes.add(rid)

    def _route_load(self, api: bytes, msg: P.Load) -> None:
        candidates = self._candidates(msg.device)
        if not candidates:
            what = f"on device {msg.device}" if msg.device else "connected"
            self._to_api(api, P.Error(rid=msg.rid, type=P.ErrorType.NO_WORKER,
                                      message=f"no worker is {what}; start one with `loom worker --device ...`"))
            return
        for w in candidates:
            info = w.model_info(msg.model)
            if info is not None:
                self._to_api(api, P.Loaded(rid=msg.rid, info=info))
                return
        # A load already under way on some worker: join it rather than load twice.
        for route in self.routes.values():
            if route.kind == f"load:{msg.model}" and route.worker in {w.identity for w in candidates}:
                self._assign(api, self.workers[route.worker], msg, f"load:{msg.model}")
                return
        worker = min(candidates, key=lambda w: (len(w.models), w.load))
        # Ids taken elsewhere: a same-named directory on that worker gets another id.
        msg.reserved = {m["model_id"]: str(m.get("source", "")) for w in self.workers.values() for m in w.models}
        self._assign(api, worker, msg, f"load:{msg.model}")

    def _route_unload(self, api: bytes, msg: P.Unload) -> None:
        holders = [w for w in self.workers.values() if w.has_model(msg.model)]
        if not holders:
            self._to_api(api, P.Error(rid=msg.rid, type=P.ErrorType.MODEL_NOT_LOADED,
                                      message=f"model {msg.model!r} is not loaded"))
            return
        sent = [w for w in holders if self._to_worker(w.identity, msg)]
        if not sent:
            self._to_api(api, P.Error(rid=msg.rid, type=P.ErrorType.WORKER_LOST, message="the worker went away"))
            return
        self.routes[msg.rid] = Route(api=api, worker=b"*", kind=f"unload:{msg.model}", unloading={w.identity for w in sent})

    # --- backend: frames from workers ---------------------------------------------------

    def on_backend(self, frames: list[Any]) -> None:
        identity, body = worker_identity(bytes(frames[0])), frames[1:]
        try:
            msg, buffers = P.decode(body)
        except P.ProtocolError as exc:
            log.warning("dropped a malformed message from worker %r: %s", identity[:64], exc)
            return
        worker = self.workers.get(identity)
        if isinstance(msg, P.Register):
            self._register(identity, msg)
            return
        if worker is None:
            # Unknown: we restarted, or gave up on it. Nothing it sends is relayed.
            if isinstance(msg, P.Heartbeat):
                self._to_worker(identity, P.Reregister(broker_id=self.broker_id))
            return
        worker.last_seen = time.monotonic()
        if type(msg) is P.Tokens:
            self._relay_tokens(identity, worker, msg, buffers, body)
            return
        if isinstance(msg, P.Heartbeat):
            worker.active = msg.active
            worker.figures = {"running": msg.running, "waiting": msg.waiting, "kv_cache_bytes": msg.kv_cache_bytes}
            if msg.models is not None:
                worker.models = _valid_models(msg.models)
            return
        rid = getattr(msg, "rid", None)
        route = self.routes.get(rid) if rid is not None else None
        if route is None or not route.served_by(identity):
            return  # a request that was cancelled, failed over, or never ours
        if isinstance(msg, P.Ended):  # its frames went straight to the API (workers/direct_replies.py)
            self.routes.pop(rid, None)
            worker.routes.discard(rid)
            return
        if isinstance(msg, P.Loaded) and not worker.has_model(msg.info.get("model_id", "")):
            worker.models = [*worker.models, *_valid_models([msg.info])]
        if isinstance(msg, P.Unloaded):
            worker.models = [m for m in worker.models if not answers_to(m, msg.model)]
        if isinstance(msg, TERMINAL):
            route.unloading.discard(identity)
            if route.unloading:
                return
            self.routes.pop(rid, None)
            worker.routes.discard(rid)
        if not self._to_api_raw(route.api, body) and not isinstance(msg, TERMINAL):
            self._api_gone(worker, [rid])

    def _relay_tokens(self, identity: bytes, worker: Worker, msg: P.Tokens, buffers: list[Any],
                      body: list[Any]) -> None:
        """A step's tokens for one API process: relayed as they came, no entry decoded on its own.

        Each entry still needs a route from that worker to that API (a cancelled
        or failed-over request's token goes nowhere); only when one does not
        is the batch rebuilt from the entries that do.
        """
        routes, api = self.routes, msg.api
        for rid in msg.rids:
            route = routes.get(rid)
            if route is None or route.worker != identity or route.api != api:
                self._regroup(identity, msg, buffers)
                return
        if not self._to_api_raw(api, body):
            self._api_gone(worker, msg.rids)

    def _regroup(self, identity: bytes, msg: P.Tokens, buffers: list[Any]) -> None:
        groups: dict[bytes, TokenBatch] = {}
        for token, bufs in msg.tokens(buffers):
            route = self.routes.get(token.rid)
            if route is not None and route.worker == identity:
                groups.setdefault(route.api, TokenBatch()).add(token, bufs)
        worker = self.workers[identity]
        for api, group in groups.items():
            if not self._to_api(api, *group.message(api, msg.t_emit)):
                self._api_gone(worker, group.rids)

    def _api_gone(self, worker: Worker, rids: list[str]) -> None:
        """The API process is gone or not reading: stop the work for it."""
        for rid in rids:
            if self.routes.pop(rid, None) is not None:
                worker.routes.discard(rid)
                self._to_worker(worker.identity, P.Cancel(rid=rid))

    def _register(self, identity: bytes, msg: P.Register) -> None:
        old = self.workers.pop(identity, None)
        if old is not None:
            self._forget(old, "the worker restarted its session")
        self.workers[identity] = Worker(identity=identity, worker_id=msg.worker_id, device=msg.device, host=msg.host,
                                        pid=msg.pid, capacity=max(1, msg.capacity), models=_valid_models(msg.models),
                                        active=msg.active)
        names = ", ".join(m["model_id"] for m in self.workers[identity].models) or "no models yet"
        log.info("worker %s joined: %s on %s, capacity %d (%s)", msg.worker_id, msg.device, msg.host,
                 msg.capacity, names)

    # --- liveness ------------------------------------------------------------------------

    def heartbeat(self) -> None:
        """Beat every worker; drop the silent ones and the unreachable ones."""
        now = time.monotonic()
        beat = P.Heartbeat(sender=self.broker_id)
        for worker in list(self.workers.values()):
            if now - worker.last_seen > P.HEARTBEAT_TIMEOUT_S:
                self._worker_gone(worker, f"no heartbeat for {now - worker.last_seen:.1f}s")
            elif not self._to_worker(worker.identity, beat):
                self._worker_gone(worker, "its connection closed")

    def _worker_gone(self, worker: Worker, why: str) -> None:
        if self.workers.pop(worker.identity, None) is None:
            return
        log.warning("worker %s (%s) lost: %s; failing %d request(s)", worker.worker_id, worker.device, why,
                    len(worker.routes))
        self._forget(worker, f"the worker serving this request ({worker.device}) stopped responding: {why}")

    def _forget(self, worker: Worker, message: str) -> None:
        for rid in list(worker.routes):
            self._fail(rid, P.ErrorType.WORKER_LOST, message)
        # A worker that is gone holds no model: for an unload, it has answered.
        for rid, route in list(self.routes.items()):
            if worker.identity in route.unloading:
                route.unloading.discard(worker.identity)
                if not route.unloading:
                    del self.routes[rid]
                    self._to_api(route.api, P.Unloaded(rid=rid, model=route.kind.removeprefix("unload:")))
