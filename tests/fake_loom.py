"""A fake Loom server for the offline client and `loom chat` tests: it speaks
the HTTP contract over real HTTP on 127.0.0.1 (a stdlib server in a thread).

It picks its behaviour from the request's model name, so each test says in
its request what it wants the server to do.
"""
from __future__ import annotations

import base64
import json
import queue
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SLOW = 0.15  # seconds between tokens of the "slow" model
TOKENS = ["1", ",", " 2", ",", " 3"]
HIDDEN = [3.0, -4.0, 0.5, 0.25]


def sse(event: str, body: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


def text_delta(text: str) -> bytes:
    return sse("content_block_delta", {"type": "content_block_delta", "delta": {"type": "text_delta", "text": text}})


def hidden_state() -> dict[str, Any]:
    return {"final": HIDDEN, "shape": [1, len(HIDDEN)], "layer": -1, "dtype": "float32"}


def final_delta(model: str, completion_tokens: int, hidden: bool) -> bytes:
    body: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn"},
        "usage": {"prompt_tokens": 7, "completion_tokens": completion_tokens, "total_tokens": 7 + completion_tokens},
        "metadata": {"model": model or "fake/tiny", "latency_ms": 10.0},
    }
    if hidden:
        body["hidden_state"] = hidden_state()
    return sse("message_delta", body)


class FakeLoom(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict[str, Any]] = []
        self.disconnects: queue.Queue[str] = queue.Queue()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def last(self, path: str) -> dict[str, Any]:
        return [r for r in self.requests if r["path"] == path][-1]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeLoom

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass

    # plumbing

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else {}
        self.server.requests.append(
            {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
        )
        return body

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # routes

    def _not_loom(self) -> bool:
        """Paths under /html/ play a web server that is not Loom; /down/ one with no worker alive."""
        if self.path.startswith("/html/"):
            data = b"<html>hello</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return True
        if self.path == "/down/health":
            self._json(503, {"detail": "no worker is alive", "workers": []})
            return True
        return False

    def do_GET(self) -> None:
        self._body()
        if self._not_loom():
            return
        if self.path == "/health":
            self._json(200, {"status": "healthy", "workers": [{"id": "w0", "device": "cpu", "alive": True}]})
        elif self.path == "/models":
            self._json(200, {"loaded_models": [{"model_id": "fake/tiny", "device": "cpu", "dtype": "float32",
                                                "hidden_size": 4, "num_layers": 2}]})
        else:
            self._json(404, {"detail": "Not Found"})

    def do_DELETE(self) -> None:
        self._body()
        if self.path == "/models/fake--tiny":
            self._json(200, {"status": "unloaded", "model_id": "fake/tiny"})
        else:
            self._json(404, {"detail": f"model {self.path.rsplit('/', 1)[-1]} is not loaded"})

    def do_POST(self) -> None:
        body = self._body()
        model = body.get("model", "")
        if self._not_loom():
            return
        if self.path == "/models/load":
            self._json(200, {"model_id": body["model"], "device": "cpu", "dtype": "float32", "hidden_size": 4,
                             "num_layers": 2, "load_time_seconds": 0.5, "loader_type": "fake"})
            return
        if self.path not in ("/v1/chat/completions", "/generate"):
            self._json(404, {"detail": "Not Found"})
            return
        if model == "missing":
            self._json(404, {"error": {"type": "model_not_loaded", "message": "model 'missing' is not loaded"}})
            return
        if model == "invalid":
            self._json(422, {"detail": [{"loc": ["body", "max_tokens"], "msg": "Input should be less than or equal to 8192",
                                         "type": "less_than_equal"}]})
            return
        if body.get("stream"):
            self._stream(model, bool(body.get("return_hidden_states")))
        elif self.path == "/generate":
            self._generate(body)
        else:
            answer: dict[str, Any] = {"text": "".join(TOKENS),
                                      "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12},
                                      "metadata": {"model": model or "fake/tiny", "tokens_per_second": 50.0}}
            if body.get("return_hidden_states"):
                answer["hidden_state"] = hidden_state()
                answer["hidden_states"] = {"-1": {"vector": HIDDEN, "shape": [1, 4], "layer": -1, "dtype": "float32"}}
            self._json(200, answer)

    def _generate(self, body: dict[str, Any]) -> None:
        raw = struct.pack("<4e", *HIDDEN)
        self._json(200, {"text": body["prompt"] + " world", "token_count": 1, "metadata": {},
                         "hidden_states": {"-1": {"data": base64.b64encode(raw).decode(), "shape": [1, 4],
                                                  "dtype": "float16", "encoding": "base64"}}})

    def _stream(self, model: str, hidden: bool) -> None:
        self._start_stream()
        try:
            if model == "endless":
                # Generates until the client goes away, like a long answer.
                for i in range(600):
                    self._chunk(text_delta(f" {i}"))
                    time.sleep(0.05)
                return
            delay = SLOW if model == "slow" else 0.005
            tokens = ["é", "😀", " ok"] if model == "unicode" else TOKENS
            for n, token in enumerate(tokens):
                if model in ("boom", "cutoff") and n == 2:
                    break
                event = text_delta(token)
                if model == "unicode":
                    # One byte per HTTP chunk: boundaries fall inside characters.
                    for i in range(len(event)):
                        self._chunk(event[i : i + 1])
                elif model == "chatty":
                    self._chunk(b": keep-alive\n\n" + sse("ping", {"type": "ping"}) + event)
                else:
                    self._chunk(event)
                time.sleep(delay)
            if model == "boom":
                self._chunk(sse("error", {"type": "error", "error": {"type": "worker_died", "message": "worker w0 exited"}}))
            elif model != "cutoff":
                self._chunk(final_delta(model, len(tokens), hidden))
            self._end_stream()
        except (BrokenPipeError, ConnectionResetError):
            self.server.disconnects.put(model)


@contextmanager
def serving() -> Iterator[FakeLoom]:
    """A FakeLoom answering on a thread until the block ends."""
    fake = FakeLoom()
    thread = threading.Thread(target=fake.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.shutdown()
        fake.server_close()


def drain(q: queue.Queue[str]) -> None:
    """Forget the disconnects seen so far, before a test waits for its own."""
    while not q.empty():
        q.get_nowait()
