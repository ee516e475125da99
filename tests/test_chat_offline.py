"""`loom chat` (one-shot and interactive, as a real subprocess) against a fake
server that speaks the HTTP contract over real HTTP (tests/fake_loom.py).
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_loom import SLOW, FakeLoom, drain, serving
from tests.helpers import REPO, free_port


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLoom]:
    with serving() as fake:
        yield fake


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
