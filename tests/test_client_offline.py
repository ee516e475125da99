"""The client library and `loom chat` against a fake server that speaks the
HTTP contract over real HTTP on 127.0.0.1 (a stdlib server in a thread).

The fake server picks its behaviour from the request's model name, so each
test says in its request what it wants the server to do.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import queue
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from loom.client import (
    AsyncLoomClient,
    ErrorEvent,
    LoomClient,
    LoomConnectionError,
    LoomHTTPError,
    LoomProtocolError,
    LoomStreamError,
    MessageDelta,
    TextDelta,
)

REPO = Path(__file__).resolve().parent.parent
SLOW = 0.15  # seconds between tokens of the "slow" model
TOKENS = ["1", ",", " 2", ",", " 3"]
HIDDEN = [3.0, -4.0, 0.5, 0.25]


# --- the fake server ---------------------------------------------------------


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


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLoom]:
    fake = FakeLoom()
    thread = threading.Thread(target=fake.serve_forever, daemon=True)
    thread.start()
    yield fake
    fake.shutdown()
    fake.server_close()


@pytest.fixture()
def client(server: FakeLoom) -> Iterator[LoomClient]:
    with LoomClient(server.url) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


USER = [{"role": "user", "content": "Count from 1 to 3."}]


# --- plain endpoints -----------------------------------------------------------


def test_health_models_load_unload(client: LoomClient, server: FakeLoom) -> None:
    assert client.health().status == "healthy"
    [model] = client.models().loaded_models
    assert (model.model_id, model.hidden_size, model.num_layers) == ("fake/tiny", 4, 2)
    loaded = client.load_model("fake/other", dtype="float16", device="cuda:1")
    assert loaded.model_id == "fake/other" and loaded.loader_type == "fake"
    assert server.last("/models/load")["body"] == {"model": "fake/other", "dtype": "float16", "device": "cuda:1"}
    assert client.unload_model("fake/tiny")["status"] == "unloaded"
    assert server.requests[-1]["path"] == "/models/fake--tiny"


def test_unload_unknown_model_raises_with_fastapi_detail(client: LoomClient) -> None:
    with pytest.raises(LoomHTTPError) as info:
        client.unload_model("nope")
    assert info.value.status_code == 404
    assert info.value.message == "model nope is not loaded"


def test_health_503_is_returned_not_raised(server: FakeLoom) -> None:
    with LoomClient(server.url + "/down") as c:
        health = c.health()
    assert health.status == "unhealthy"
    assert health.model_extra == {"detail": "no worker is alive", "workers": []}


def test_a_server_that_is_not_loom_gives_protocol_errors(server: FakeLoom) -> None:
    with LoomClient(server.url + "/html") as c:
        with pytest.raises(LoomProtocolError, match="is this a Loom server"):
            c.models()
        with pytest.raises(LoomProtocolError):
            c.chat(USER)
        with pytest.raises(LoomStreamError, match="expected an event stream, got text/html"):
            list(c.stream_chat(USER))


def test_api_key_is_sent_as_bearer_token(server: FakeLoom) -> None:
    with LoomClient(server.url, api_key="s3cret") as c:
        c.health()
    assert server.last("/health")["headers"]["Authorization"] == "Bearer s3cret"


def test_chat_returns_typed_result(client: LoomClient, server: FakeLoom) -> None:
    result = client.chat(USER, "fake/tiny", max_tokens=20, return_hidden_states=True, hidden_state_layers=[-1])
    assert result.text == "1, 2, 3"
    assert result.usage.total_tokens == 12
    assert result.hidden_state is not None and result.hidden_state.shape == [1, 4]
    assert result.hidden_states is not None and result.hidden_states["-1"].values() == HIDDEN
    assert result.metadata["tokens_per_second"] == 50.0
    sent = server.last("/v1/chat/completions")["body"]
    assert sent == {"model": "fake/tiny", "max_tokens": 20, "hidden_state_layers": [-1],
                    "return_hidden_states": True, "messages": USER}


def test_unset_fields_are_left_out_for_server_defaults(client: LoomClient, server: FakeLoom) -> None:
    client.chat(USER)
    assert server.last("/v1/chat/completions")["body"] == {"model": "", "messages": USER}


def test_generate_decodes_base64_hidden_states(client: LoomClient, server: FakeLoom) -> None:
    result = client.generate("Hello", return_hidden_states=True, hidden_state_format="base64")
    assert result.text == "Hello world"
    assert result.hidden_states is not None and result.hidden_states["-1"].values() == HIDDEN
    assert server.last("/generate")["body"]["hidden_state_format"] == "base64"


# --- streaming -----------------------------------------------------------------


def test_stream_events_arrive_incrementally(client: LoomClient) -> None:
    arrivals: list[float] = []
    with client.stream_chat(USER, "slow") as stream:
        events = []
        for event in stream:
            arrivals.append(time.monotonic())
            events.append(event)
    assert [type(e) for e in events] == [TextDelta] * 5 + [MessageDelta]
    assert stream.text == "1, 2, 3"
    # Tokens are SLOW apart on the server; buffering would bunch them up.
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:5])]
    assert all(gap > SLOW / 2 for gap in gaps), gaps


def test_stream_final_event_is_typed(client: LoomClient, server: FakeLoom) -> None:
    stream = client.stream_chat(USER, "fake/tiny", return_hidden_states=True)
    events = list(stream)
    final = events[-1]
    assert isinstance(final, MessageDelta) and final is stream.final
    assert final.stop_reason == "end_turn"
    assert final.usage.completion_tokens == 5
    assert final.hidden_state is not None and final.hidden_state.values() == HIDDEN
    sent = server.last("/v1/chat/completions")
    assert sent["body"]["stream"] is True
    assert sent["headers"]["Accept"] == "text/event-stream"


def test_comments_and_unknown_events_are_skipped(client: LoomClient) -> None:
    events = list(client.stream_chat(USER, "chatty"))
    assert [type(e) for e in events] == [TextDelta] * 5 + [MessageDelta]


def test_chunk_boundaries_inside_utf8_over_http(client: LoomClient) -> None:
    stream = client.stream_chat(USER, "unicode")
    assert [e.text for e in stream if isinstance(e, TextDelta)] == ["é", "😀", " ok"]


def test_error_event_raises_stream_error(client: LoomClient) -> None:
    stream = client.stream_chat(USER, "boom")
    seen = []
    with pytest.raises(LoomStreamError) as info:
        for event in stream:
            seen.append(event)
    assert len(seen) == 2 and stream.text == "1,"
    assert info.value.error_type == "worker_died"
    assert info.value.message == "worker w0 exited"
    assert isinstance(info.value.event, ErrorEvent)


def test_error_event_can_arrive_as_a_typed_event(client: LoomClient) -> None:
    events = list(client.stream_chat(USER, "boom", raise_on_error=False))
    assert isinstance(events[-1], ErrorEvent)
    assert events[-1].error_type == "worker_died"


def test_stream_cut_off_without_final_event_raises(client: LoomClient) -> None:
    with pytest.raises(LoomStreamError, match="before its final event"):
        list(client.stream_chat(USER, "cutoff"))


def test_stream_http_errors_carry_the_servers_message(client: LoomClient) -> None:
    with pytest.raises(LoomHTTPError) as info:
        with client.stream_chat(USER, "missing"):
            pass
    assert (info.value.status_code, info.value.error_type) == (404, "model_not_loaded")
    assert info.value.message == "model 'missing' is not loaded"
    with pytest.raises(LoomHTTPError, match=r"max_tokens: Input should be less than or equal to 8192 \(HTTP 422\)"):
        list(client.stream_chat(USER, "invalid"))


def test_stream_generate(client: LoomClient, server: FakeLoom) -> None:
    events = list(client.stream_generate("Once upon", "fake/tiny", max_tokens=5))
    assert isinstance(events[-1], MessageDelta)
    assert server.last("/generate")["body"] == {"model": "fake/tiny", "max_tokens": 5, "stream": True, "prompt": "Once upon"}


def drain(q: queue.Queue[str]) -> None:
    while not q.empty():
        q.get_nowait()


def test_closing_the_stream_early_disconnects(client: LoomClient, server: FakeLoom) -> None:
    drain(server.disconnects)
    with client.stream_chat(USER, "endless") as stream:
        for n, _ in enumerate(stream):
            if n == 2:
                break
    assert server.disconnects.get(timeout=5) == "endless"


def test_abandoning_the_iterator_disconnects(client: LoomClient, server: FakeLoom) -> None:
    drain(server.disconnects)
    for n, _ in enumerate(client.stream_chat(USER, "endless")):
        if n == 2:
            break
    assert server.disconnects.get(timeout=5) == "endless"
    # The client is still usable afterwards.
    assert client.health().status == "healthy"


def test_connection_error_when_nothing_listens() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with LoomClient(url) as c:
        with pytest.raises(LoomConnectionError) as info:
            c.health()
        assert url in str(info.value) and "loom serve" in str(info.value)
        with pytest.raises(LoomConnectionError):
            list(c.stream_chat(USER))


# --- the async client ------------------------------------------------------------


def test_async_client(server: FakeLoom) -> None:
    async def main() -> None:
        async with AsyncLoomClient(server.url) as c:
            assert (await c.health()).status == "healthy"
            assert (await c.chat(USER)).text == "1, 2, 3"
            arrivals = []
            async with c.stream_chat(USER, "slow", return_hidden_states=True) as stream:
                async for event in stream:
                    arrivals.append(time.monotonic())
            assert stream.text == "1, 2, 3"
            assert stream.final is not None and stream.final.hidden_state is not None
            assert arrivals[4] - arrivals[0] > 2 * SLOW
            with pytest.raises(LoomStreamError, match="worker w0 exited"):
                async with c.stream_chat(USER, "boom") as stream:
                    async for _ in stream:
                        pass
            with pytest.raises(LoomHTTPError, match="not loaded"):
                await c.chat(USER, "missing")

            drain(server.disconnects)
            async with c.stream_chat(USER, "endless") as stream:
                async for _ in stream:
                    break
            assert await asyncio.to_thread(server.disconnects.get, timeout=5) == "endless"

        async with AsyncLoomClient(f"http://127.0.0.1:{free_port()}") as down:
            with pytest.raises(LoomConnectionError, match="loom serve"):
                await down.models()

    asyncio.run(main())


# --- loom chat -----------------------------------------------------------------


def cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOOM_URL", "LOOM_API_KEY")}
    env.update(PYTHONPATH=str(REPO), HOME=str(home), NO_COLOR="1", TERM="dumb", PYTHONUNBUFFERED="0")
    return env


def loom_chat(*args: str, home: Path, stdin: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loom", "chat", *args],
        input=stdin, capture_output=True, text=True, env=cli_env(home), cwd=REPO, timeout=timeout,
    )


def test_chat_imports_no_server_code(tmp_path: Path) -> None:
    code = ("import sys, loom.chat, loom.client; "
            "bad = {'torch', 'zmq', 'transformers', 'api', 'broker', 'workers'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env=cli_env(tmp_path), cwd=REPO)


def test_chat_help(tmp_path: Path) -> None:
    result = loom_chat("--help", home=tmp_path)
    assert result.returncode == 0
    assert "--backend" in result.stdout and "/reset" in result.stdout


def test_one_shot_prints_answer(server: FakeLoom, tmp_path: Path) -> None:
    result = loom_chat("--url", server.url, "-p", "Count from 1 to 5.", "--max-tokens", "50", home=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "1, 2, 3\n", "")
    sent = server.last("/v1/chat/completions")["body"]
    assert sent["messages"] == [{"role": "user", "content": "Count from 1 to 5."}]
    assert sent["max_tokens"] == 50 and sent["stream"] is True and sent["model"] == ""


def test_one_shot_output_is_incremental(server: FakeLoom, tmp_path: Path) -> None:
    # stdout is a pipe here, where Python buffers by default: only a flush per
    # token gets the first token out long before the last.
    proc = subprocess.Popen(
        [sys.executable, "-m", "loom", "chat", "--url", server.url, "--model", "slow", "-p", "Count"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(tmp_path), cwd=REPO,
    )
    assert proc.stdout is not None
    reads: list[tuple[float, bytes]] = []
    while True:
        select.select([proc.stdout], [], [], 10)
        data = os.read(proc.stdout.fileno(), 4096)
        if not data:
            break
        reads.append((time.monotonic(), data))
    assert proc.wait(timeout=10) == 0
    assert b"".join(d for _, d in reads) == b"1, 2, 3\n"
    assert len(reads) >= 4, reads
    assert reads[-1][0] - reads[0][0] > 3 * SLOW


def test_one_shot_reads_prompt_from_stdin_with_system(server: FakeLoom, tmp_path: Path) -> None:
    result = loom_chat("--url", server.url, "-p", "-", "--system", "Be brief.", "--temperature", "0",
                       home=tmp_path, stdin="Count from 1 to 5.\n")
    assert result.returncode == 0, result.stderr
    sent = server.last("/v1/chat/completions")["body"]
    assert sent["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Count from 1 to 5.\n"}]
    assert sent["temperature"] == 0


def test_one_shot_hidden_state(server: FakeLoom, tmp_path: Path) -> None:
    result = loom_chat("--url", server.url, "-p", "hi", "--hidden", home=tmp_path)
    assert result.returncode == 0 and result.stdout == "1, 2, 3\n"
    assert "shape [1, 4]" in result.stderr and "L2 norm 5.0312" in result.stderr
    assert "3.0000, -4.0000, 0.5000, 0.2500" in result.stderr
    assert server.last("/v1/chat/completions")["body"]["return_hidden_states"] is True


def test_one_shot_server_down(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = loom_chat("--url", url, "-p", "hi", home=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert url in result.stderr and "loom serve" in result.stderr
    assert "Traceback" not in result.stderr


def test_one_shot_model_not_loaded(server: FakeLoom, tmp_path: Path) -> None:
    result = loom_chat("--url", server.url, "--model", "missing", "-p", "hi", home=tmp_path)
    assert result.returncode == 1
    assert "model 'missing' is not loaded (HTTP 404)" in result.stderr and "/models/load" in result.stderr
    assert "Traceback" not in result.stderr


def test_one_shot_error_event_mid_stream(server: FakeLoom, tmp_path: Path) -> None:
    result = loom_chat("--url", server.url, "--model", "boom", "-p", "hi", home=tmp_path)
    assert result.returncode == 1
    assert result.stdout == "1,\n"
    assert "worker_died: worker w0 exited" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_backends(server: FakeLoom, tmp_path: Path) -> None:
    config = tmp_path / "weaver.yaml"
    config.write_text(
        "backends:\n"
        "  - name: off\n    type: loom\n    url: http://127.0.0.1:9\n    model: nowhere\n"
        f"  - name: loom\n    type: loom\n    url: {server.url}\n    model: fake/tiny\n"
        "  - name: other\n    type: openai\n    url: http://x\n"
    )
    result = loom_chat("--config", str(config), "--backend", "loom", "-p", "hi", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert server.last("/v1/chat/completions")["body"]["model"] == "fake/tiny"

    result = loom_chat("--config", str(config), "--backend", "nope", "-p", "hi", home=tmp_path)
    assert result.returncode == 2 and "no backend named 'nope'" in result.stderr
    result = loom_chat("--config", str(config), "--backend", "other", "-p", "hi", home=tmp_path)
    assert result.returncode == 2 and "type: loom" in result.stderr


def test_default_config_file_and_flag_precedence(server: FakeLoom, tmp_path: Path) -> None:
    (tmp_path / ".config" / "loom").mkdir(parents=True)
    (tmp_path / ".config" / "loom" / "chat.yaml").write_text(
        f"backends:\n  - name: loom\n    type: loom\n    url: {server.url}\n    model: fake/tiny\n"
    )
    assert loom_chat("-p", "hi", home=tmp_path).returncode == 0
    assert server.last("/v1/chat/completions")["body"]["model"] == "fake/tiny"
    assert loom_chat("-p", "hi", "--model", "fake/flag", home=tmp_path).returncode == 0
    assert server.last("/v1/chat/completions")["body"]["model"] == "fake/flag"


# --- loom chat, interactive ------------------------------------------------------


def test_interactive_session(server: FakeLoom, tmp_path: Path) -> None:
    import pexpect
    child = pexpect.spawn(
        sys.executable, ["-m", "loom", "chat", "--url", server.url, "--model", "slow"],
        env=cli_env(tmp_path), cwd=str(REPO), encoding="utf-8", timeout=10,
    )
    try:
        child.expect_exact("you> ")
        child.sendline("Count from 1 to 3.")
        child.expect_exact("1,")
        first = time.monotonic()
        child.expect_exact(" 3")
        assert time.monotonic() - first > 2 * SLOW  # the answer came token by token
        child.expect(r"\[7 prompt \+ 5 completion tokens · [\d.]+ tok/s · [\d.]+ s · end_turn")
        child.expect_exact("you> ")

        child.sendline("And again.")
        child.expect_exact("you> ")
        assert [m["role"] for m in server.last("/v1/chat/completions")["body"]["messages"]] == [
            "user", "assistant", "user"]

        child.sendline("/reset")
        child.expect_exact("conversation cleared")
        child.sendline("/hidden")
        child.expect_exact("hidden states on")
        child.sendline("/model fake/tiny")
        child.expect_exact("model: fake/tiny")
        child.sendline("Hi.")
        child.expect(r"hidden state, layer -1: shape \[1, 4\] float32 · L2 norm 5\.0312")
        child.expect_exact("you> ")
        sent = server.last("/v1/chat/completions")["body"]
        assert sent["model"] == "fake/tiny" and sent["return_hidden_states"] is True
        assert len(sent["messages"]) == 1

        # Ctrl-C mid-answer stops that answer, closes the stream, and returns to the prompt.
        drain(server.disconnects)
        child.sendline("/model endless")
        child.sendline("Go on forever.")
        child.expect_exact(" 2")
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect_exact("you> ")
        assert server.disconnects.get(timeout=5) == "endless"

        child.sendline("/model missing")
        child.sendline("Hi.")
        child.expect_exact("is not loaded (HTTP 404)")
        child.expect_exact("you> ")

        child.sendline("/help")
        child.expect_exact("/quit")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert "Traceback" not in (child.before or "")


def test_interactive_eof_exits(server: FakeLoom, tmp_path: Path) -> None:
    import pexpect
    child = pexpect.spawn(sys.executable, ["-m", "loom", "chat", "--url", server.url],
                          env=cli_env(tmp_path), cwd=str(REPO), encoding="utf-8", timeout=10)
    child.expect_exact("you> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_interactive_server_down(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = loom_chat("--url", url, home=tmp_path, stdin="")
    assert result.returncode == 1
    assert url in result.stderr and "loom serve" in result.stderr and "Traceback" not in result.stderr
