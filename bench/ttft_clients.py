"""The ways bench/ttft_path.py asks for a first token: httpx as figure (c) does,
a plain socket (kept alive or new), and a ZeroMQ DEALER on the broker's frontend.
Each returns the client's own stamps (time.time()) by stage name."""
from __future__ import annotations

import asyncio
import json
import socket
import time

from bench.clients import ZClient
from bench.common import MESSAGES

BODY = {"messages": MESSAGES, "max_tokens": 2, "temperature": 0, "stream": True}

def ask_httpx(url: str, model: str, request_id: str) -> dict[str, float]:
    """As efficiency.py's figure (c): a new client (and connection) and event loop for the one request."""
    import httpx

    marks: dict[str, float] = {}

    async def on_request(_request):
        marks.setdefault("client.request_hook", time.time())

    async def on_response(_response):
        marks.setdefault("client.response_hook", time.time())

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600, connect=10),
                                     headers={"X-Request-Id": request_id},
                                     event_hooks={"request": [on_request], "response": [on_response]}) as c:
            marks["client.send"] = time.time()
            async with c.stream("POST", "/v1/chat/completions", json={**BODY, "model": model}) as r:
                buf = b""
                async for chunk in r.aiter_raw():
                    buf += chunk
                    if "client.first" not in marks and b"event: content_block_delta" in buf:
                        marks["client.first"] = time.time()
                    if b"event: message_delta" in buf or b"event: error" in buf:
                        break
            if "client.first" not in marks:
                raise RuntimeError(f"no token: HTTP {r.status_code} {buf[:300]!r}")

    asyncio.run(go())
    return marks


class RawHttp:
    """One kept-alive connection; the request written as bytes, the chunked SSE answer scanned as bytes."""

    def __init__(self, port: int, keep_alive: bool = True):
        self.port = port
        self.keep_alive = keep_alive
        self.sock: socket.socket | None = None

    def ask(self, model: str, request_id: str) -> dict[str, float]:
        body = json.dumps({**BODY, "model": model}).encode()
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nX-Request-Id: {request_id}\r\n\r\n")
        marks = {"client.send": time.time()}
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(head.encode() + body)
        buf = b""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                self.close()
                raise RuntimeError(f"connection closed: {buf[:300]!r}")
            buf += chunk
            if "client.first" not in marks and b"event: content_block_delta" in buf:
                marks["client.first"] = time.time()
            if (b"event: message_delta" in buf or b"event: error" in buf) and buf.endswith(b"0\r\n\r\n"):
                break
            if b"\r\n\r\n" in buf and not buf.startswith(b"HTTP/1.1 200"):
                self.close()
                raise RuntimeError(f"not a stream: {buf[:300]!r}")
        if "client.first" not in marks:
            raise RuntimeError(f"no token: {buf[:300]!r}")
        if not self.keep_alive:
            self.close()
        return marks

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class ZmqDirect(ZClient):
    """A DEALER on the broker's frontend, as an API process talks to it (ZClient's socket, one request at a time)."""

    def ask(self, model: str, rid: str, request_id: str) -> dict[str, float]:
        P = self.P
        msg = P.Generate(rid=rid, model=model, messages=MESSAGES, max_tokens=2, temperature=0.0, top_p=1.0,
                         request_id=request_id)
        marks = {"client.send": time.time()}
        self.sock.send_multipart(P.encode(msg))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if not self.sock.poll(1000):
                continue
            frames = self.sock.recv_multipart()
            now = time.time()
            for reply, _ in P.decode_each(frames):
                if getattr(reply, "rid", None) != rid:
                    continue
                if isinstance(reply, P.Token):
                    marks.setdefault("client.first", now)
                elif isinstance(reply, P.Error):
                    raise RuntimeError(f"{reply.type}: {reply.message}")
                elif isinstance(reply, P.Final):
                    return marks
        raise TimeoutError("no answer from the broker")
