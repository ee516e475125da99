"""`loom chat` and the client library against a real Loom stack.

These tests need the `stack` fixture from tests/conftest.py: a running
server with `url` (str) and `default_model` (str, e.g. "loom-tiny") loaded.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


from tests.conftest import TOY

from loom.client import LoomClient, MessageDelta, TextDelta

REPO = Path(__file__).resolve().parent.parent
USAGE_LINE = r"\[\d+ prompt \+ (\d+) completion tokens · .*\]"


def cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOOM_URL", "LOOM_API_KEY")}
    env.update(PYTHONPATH=str(REPO), HOME=str(home), NO_COLOR="1", TERM="dumb")
    return env


def loom_chat(*args: str, home: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loom", "chat", *args],
        capture_output=True, text=True, env=cli_env(home), cwd=REPO, timeout=timeout,
    )


def test_client_streams_typed_events(stack: Any) -> None:
    with LoomClient(stack.url) as client:
        assert client.health().status == "healthy"
        assert stack.default_model in [m.model_id for m in client.models().loaded_models]
        with client.stream_chat([{"role": "user", "content": "Count from 1 to 5."}], max_tokens=20,
                                return_hidden_states=True) as stream:
            events = list(stream)
    assert all(isinstance(e, TextDelta) for e in events[:-1])
    final = events[-1]
    assert isinstance(final, MessageDelta)
    assert final.stop_reason in ("end_turn", "max_tokens")
    # At most one delta per token: a token ending inside a UTF-8 character
    # waits for the next, and an end token has no text.
    assert len(events) - 1 <= final.usage.completion_tokens
    assert final.hidden_state is not None and final.hidden_state.shape[0] == 1


def test_one_shot_against_real_stack(stack: Any, tmp_path: Path) -> None:
    result = loom_chat("--url", stack.url, "-p", "Count from 1 to 5.", "--max-tokens", "50", home=tmp_path)
    # A sampled answer from a toy model may be short, or even empty (the end
    # token first), so only a clean run is asserted here. That tokens arrive
    # one by one is checked in the interactive test below and, against a
    # server slow enough to time, in test_chat_offline.py.
    assert (result.returncode, result.stderr) == (0, ""), result
    assert result.stdout == "" or result.stdout.endswith("\n")


def test_one_shot_hidden_state_matches_model(stack: Any, tmp_path: Path) -> None:
    with LoomClient(stack.url) as client:
        [model] = [m for m in client.models().loaded_models if m.model_id == stack.default_model]
    result = loom_chat("--url", stack.url, "--model", stack.default_model, "--hidden", "--max-tokens", "8",
                       "-p", "Hello", home=tmp_path)
    assert result.returncode == 0, result.stderr
    match = re.search(r"hidden state, layer -1: shape \[1, (\d+)\]", result.stderr)
    assert match, result.stderr
    assert int(match.group(1)) == model.hidden_size


def test_one_shot_unknown_model_is_a_short_error(stack: Any, tmp_path: Path) -> None:
    result = loom_chat("--url", stack.url, "--model", "no-such/model", "-p", "Hi", home=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error")
    assert "Traceback" not in result.stderr


def read_until(child: Any, pattern: str, timeout: float = 120) -> list[tuple[float, str]]:
    """Everything the child prints until `pattern` shows up, as timed reads."""
    import pexpect

    chunks: list[tuple[float, str]] = []
    seen = ""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, seen):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for {pattern!r}; got {seen!r}")
        try:
            data = child.read_nonblocking(4096, timeout=remaining)
        except pexpect.TIMEOUT:
            continue
        chunks.append((time.monotonic(), data))
        seen += data
    return chunks


def test_interactive_shows_tokens_as_they_come(stack: Any, tmp_path: Path) -> None:
    import pexpect
    child = pexpect.spawn(
        # Greedy on the generated toy model: it never ends its turn before max_tokens, so the
        # answer is 1500 tokens long every time (seconds of generation, whatever the machine's load).
        sys.executable, ["-m", "loom", "chat", "--url", stack.url, "--model", TOY, "--max-tokens", "1500",
                         "--temperature", "0"],
        env=cli_env(tmp_path), cwd=str(REPO), encoding="utf-8", timeout=120,
    )
    try:
        child.expect_exact("you> ")
        child.sendline("Tell me a long story.")
        # Past the terminal's echo of the question, the first piece of the answer.
        first = "".join(data for _, data in read_until(child, r"(?s)story\.\r?\n.*\S"))
        assert not re.search(USAGE_LINE, first)
        # It reached the terminal while the server was still generating the answer: shown as it
        # comes, not at the end. (The check takes milliseconds; the answer takes seconds.)
        assert any(w["active_requests"] for w in stack.workers()), "the answer had ended before it was shown"
        # Raw reads bypass pexpect's buffer, so read on to the next prompt here.
        text = "".join(data for _, data in read_until(child, USAGE_LINE + r"[\s\S]*you> "))
        usage = re.search(USAGE_LINE, text)
        assert usage is not None and int(usage.group(1)) == 1500, text[-300:]

        child.sendline("/reset")  # the long answer would not fit the default model's context
        child.expect_exact("conversation cleared")
        child.sendline(f"/model {stack.default_model}")
        child.expect_exact("you> ")
        child.sendline("/hidden")
        child.expect_exact("hidden states on")
        child.sendline("Say hi.")
        child.expect(r"hidden state, layer -1: shape \[1, \d+\]")
        child.expect_exact("you> ")

        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_interactive_ctrl_c_stops_the_answer(stack: Any, tmp_path: Path) -> None:
    import pexpect
    child = pexpect.spawn(
        # Greedy on the generated toy model, which never ends its turn before max_tokens: the answer
        # runs 8000 tokens, seconds of generation, and is still running when Ctrl-C arrives. (Sampled,
        # the toy model's end token has a small chance at every step, and answers could end at once.)
        sys.executable, ["-m", "loom", "chat", "--url", stack.url, "--max-tokens", "8000", "--model", TOY,
                         "--temperature", "0"],
        env=cli_env(tmp_path), cwd=str(REPO), encoding="utf-8", timeout=120,
    )
    try:
        child.expect_exact("you> ")
        child.sendline("Write a very long story about a lighthouse keeper.")
        # Past the echo of the question, wait for the first piece of the answer.
        seen = "".join(data for _, data in read_until(child, r"(?s)keeper\.\r?\n.*\S"))
        answer_over = USAGE_LINE + "|error"
        assert not re.search(answer_over, seen), "the answer ended before Ctrl-C could be sent"
        child.sendintr()
        assert child.expect([r"\[stopped\]", answer_over]) == 0, "the answer ended before Ctrl-C arrived"
        child.expect_exact("you> ")
        # The server and the client both carry on (on the default model, whose answer ends soon).
        child.sendline("/reset")
        child.expect_exact("conversation cleared")
        child.sendline(f"/model {stack.default_model}")
        child.expect_exact("you> ")
        child.sendline("Count from 1 to 3.")
        child.expect(USAGE_LINE)
        child.expect_exact("you> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
