"""Bench clients: HTTP SSE streams on one asyncio loop, and a direct ZeroMQ client of the broker frontend."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from bench.common import MESSAGES

# --- HTTP streaming client (asyncio, one event loop for every stream) --------------------

async def _sse_stream(client, model: str, max_tokens: int, *, t0_ref: list[float] | None = None,
                      close_after: int | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            **(extra or {})}
    arrivals: list[float] = []  # time.time() of each content_block_delta
    final = None
    t_send = time.time()
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:300]!r}", "t_send": t_send}
        buf = b""
        name = None
        done = False
        async for chunk in r.aiter_raw():
            now = time.time()
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                name, data = None, b""
                for line in event.split(b"\n"):
                    if line.startswith(b"event:"):
                        name = line[6:].strip()
                    elif line.startswith(b"data:"):
                        data = line[5:].strip()
                if name == b"content_block_delta":
                    arrivals.append(now)
                elif name in (b"message_delta", b"error"):
                    final = json.loads(data)
                    final["_event"] = name.decode()
                    done = True
            if close_after is not None and len(arrivals) >= close_after:
                break  # leaving the context manager closes the connection
            if done:
                break
    return {"t_send": t_send, "arrivals": arrivals, "final": final, "t_closed": time.time()}


async def _many(url: str, model: str, n: int, max_tokens: int, extra: dict[str, Any] | None = None):
    import httpx

    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300, connect=10), limits=limits) as c:
        t_start = time.time()
        results = await asyncio.gather(*[_sse_stream(c, model, max_tokens, extra=extra) for _ in range(n)])
        return t_start, time.time(), results


def http_streams(url: str, model: str, n: int, max_tokens: int, extra: dict[str, Any] | None = None):
    return asyncio.run(_many(url, model, n, max_tokens, extra))


def stream_stats(res: dict[str, Any]) -> dict[str, Any]:
    arr, final = res.get("arrivals") or [], res.get("final") or {}
    n_tok = (final.get("usage") or {}).get("completion_tokens") or len(arr)
    out = {"error": res.get("error") or (final.get("error") if final.get("_event") == "error" else None),
           "deltas": len(arr), "completion_tokens": n_tok,
           "ttft_s": (arr[0] - res["t_send"]) if arr else None,
           "worker_tps": (final.get("metadata") or {}).get("tokens_per_second"),
           "end_s": ((arr[-1] if arr else res.get("t_closed", res["t_send"])) - res["t_send"])}
    if len(arr) >= 2 and n_tok >= 2:
        out["decode_tps"] = (n_tok - 1) / (arr[-1] - arr[0])
        out["gaps_s"] = [b - a for a, b in zip(arr, arr[1:])]
    return out


# --- direct ZeroMQ client (talks to the broker frontend with loom.protocol) -------------

class ZClient:
    def __init__(self, address: str):
        import zmq

        from loom import protocol as P

        self.zmq, self.P = zmq, P
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, f"bench-{uuid.uuid4().hex[:8]}".encode())
        self.sock.connect(address)
        self._pending: list[tuple[Any, float]] = []

    def generate(self, model: str, max_tokens: int) -> str:
        rid = uuid.uuid4().hex
        msg = self.P.Generate(rid=rid, model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0.0,
                              top_p=1.0)
        self.sock.send_multipart(self.P.encode(msg))
        return rid

    def cancel(self, rid: str) -> None:
        self.sock.send_multipart(self.P.encode(self.P.Cancel(rid=rid)))

    def recv(self, timeout_s: float):
        """The next message, a step's Tokens message one Token at a time (all with its arrival time)."""
        if self._pending:
            return self._pending.pop(0)
        if not self.sock.poll(timeout_s * 1000):
            return None, 0.0
        frames = self.sock.recv_multipart()
        now = time.time()
        self._pending = [(msg, now) for msg, _ in self.P.decode_each(frames)]
        return self._pending.pop(0)

    def run(self, model: str, n_streams: int, max_tokens: int, cancel_after: int | None = None,
            on_cancel=None, timeout_s: float = 120) -> dict[str, Any]:
        """Run n_streams concurrent generations; per stream: (t_emit, t_recv, index) of each Token."""
        t_send = time.time()
        rids = [self.generate(model, max_tokens) for _ in range(n_streams)]
        streams = {rid: {"tokens": [], "final": None, "error": None} for rid in rids}
        open_ = set(rids)
        cancelled_at = None
        deadline = time.monotonic() + timeout_s
        while open_ and time.monotonic() < deadline:
            msg, now = self.recv(min(2.0, max(0.01, deadline - time.monotonic())))
            if msg is None:
                continue
            s = streams.get(getattr(msg, "rid", None))
            if s is None:
                continue
            if isinstance(msg, self.P.Token):
                s["tokens"].append((msg.t_emit, now, msg.index))
                if cancel_after is not None and cancelled_at is None and len(s["tokens"]) >= cancel_after:
                    cancelled_at = time.time()
                    self.cancel(msg.rid)
                    if on_cancel is not None:
                        return {"t_send": t_send, "streams": streams, "cancelled_at": cancelled_at,
                                "after_cancel": on_cancel(cancelled_at)}
            elif isinstance(msg, self.P.Final):
                s["final"] = msg
                open_.discard(msg.rid)
            elif isinstance(msg, self.P.Error):
                s["error"] = f"{msg.type}: {msg.message}"
                open_.discard(msg.rid)
        return {"t_send": t_send, "streams": streams, "cancelled_at": cancelled_at}

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()
