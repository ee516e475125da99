"""Shared pieces of the hostile-frame tests (test_hostile_frames.py for the
broker, test_hostile_frames_worker.py for the worker): processes to start,
raw msgpack frames, and the malformed messages each side must drop.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import zmq

from loom import protocol as P
from tests.helpers import REPO, wait_until


def spawn(args: list[str], log_path: Path) -> subprocess.Popen:
    """A `python -m loom ...` process in its own process group, logging to a file."""
    log_file = open(log_path, "wb")
    return subprocess.Popen([sys.executable, "-m", "loom", *args], stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "LOOM_LOG_LEVEL": "INFO"})


def pack(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def header(msg: P.Message, **overrides: Any) -> dict[str, Any]:
    return {**msg.header(), **overrides}


def recv(sock: zmq.Socket, timeout: float) -> list[bytes] | None:
    if sock.poll(int(timeout * 1000), zmq.POLLIN):
        return sock.recv_multipart()
    return None


def malformed_frames(model: str) -> list[tuple[str, list[bytes]]]:
    """Messages that `protocol.decode` must reject: each one is dropped and logged."""
    good = P.Generate(rid="g-ok", model=model, prompt="hello", max_tokens=2, temperature=0.0)
    valid = pack(good.header())
    nested = b"\x91" * 5000 + b"\x00"  # an array in an array ... 5000 deep
    return [
        ("random bytes", [os.urandom(97)]),
        ("empty frame", [b""]),
        ("truncated msgpack", [valid[: len(valid) // 2]]),
        ("one byte short", [valid[:-1]]),
        ("not a map", [pack([1, 2, 3])]),
        ("a bare string", [pack("generate")]),
        ("non-string map keys", [msgpack.packb({1: 2, 3: 4})]),
        ("huge declared array length", [b"\xdd\xff\xff\xff\xff"]),
        ("deep nesting", [nested]),
        ("ext type", [msgpack.packb(msgpack.ExtType(42, b"boom"))]),
        ("no version", [pack({k: v for k, v in good.header().items() if k != "v"})]),
        ("wrong version", [pack(header(good, v=99))]),
        ("version as string", [pack(header(good, v="1"))]),
        ("unknown kind", [pack(header(good, kind="self_destruct"))]),
        ("kind not a string", [pack(header(good, kind=["generate"]))]),
        ("rid is an int", [pack(header(good, rid=123))]),
        ("rid missing", [pack({k: v for k, v in good.header().items() if k != "rid"})]),
        ("max_tokens is a string", [pack(header(good, max_tokens="x"))]),
        ("max_tokens is a float", [pack(header(good, max_tokens=2.5))]),
        ("temperature is a string", [pack(header(good, temperature="hot"))]),
        ("messages is a string", [pack(header(good, prompt=None, messages="hi"))]),
        ("messages holds non-maps", [pack(header(good, prompt=None, messages=[1, "two"]))]),
        ("layers is a map", [pack(header(good, layers={"a": 1}))]),
        ("layers holds strings", [pack(header(good, layers=["x", None]))]),
        ("layers holds floats", [pack(header(good, layers=[1.5]))]),
        ("all_layers is a string", [pack(header(good, all_layers="yes"))]),
        ("model is bytes", [pack(header(good, model=b"\xff\xfe"))]),
        ("oversized header (2 MB)", [pack(header(good, prompt="A" * (2 << 20)))]),
        ("oversized raw frame (2 MB)", [os.urandom(2 << 20)]),
    ]


def tokens_header(**overrides: Any) -> dict[str, Any]:
    good = P.Tokens(api=b"api-test", rids=["a", "b"], texts=["x", "y"], indexes=[0, 0])
    return header(good, **overrides)


def malformed_tokens() -> list[tuple[str, list[bytes]]]:
    """Tokens messages (a step's tokens for one API process) that decode must reject."""
    spec = {"layer": 1, "shape": [1, 4], "dtype": "float32", "keys": [1]}
    return [
        ("tokens: fewer texts than rids", [pack(tokens_header(texts=["x"]))]),
        ("tokens: more indexes than rids", [pack(tokens_header(indexes=[0, 1, 2]))]),
        ("tokens: a rid is an int", [pack(tokens_header(rids=["a", 7]))]),
        ("tokens: a text is bytes", [pack(tokens_header(texts=["x", b"y"]))]),
        ("tokens: an index is a string", [pack(tokens_header(indexes=[0, "1"]))]),
        ("tokens: api is a string", [pack(tokens_header(api="api-test"))]),
        ("tokens: api missing", [pack({k: v for k, v in tokens_header().items() if k != "api"})]),
        ("tokens: extras not one per entry", [pack(tokens_header(extras=[{}]))]),
        ("tokens: an extra is not a map", [pack(tokens_header(extras=[{}, 5]))]),
        ("tokens: arrays is a map", [pack(tokens_header(extras=[{}, {"arrays": {"a": 1}}]))]),
        ("tokens: logprobs hold strings", [pack(tokens_header(extras=[{"logprobs": ["x"]}, {}]))]),
        ("tokens: lens is a list", [pack(tokens_header(extras=[{"lens": [1]}, {}]))]),
        ("tokens: an array without its buffer", [pack(tokens_header(extras=[{"arrays": [spec]}, {}]))]),
        ("tokens: a buffer of the wrong size", [pack(tokens_header(extras=[{}, {"arrays": [spec]}])), b"\0" * 15]),
        ("tokens: a buffer nobody describes", [pack(tokens_header()), b"\0" * 16]),
    ]


def count(text: str, needle: str) -> int:
    return text.count(needle)


def logged(path: Path, needle: str, at_least: int, timeout: float = 15) -> int:
    """How often `needle` is in the log, once it is there `at_least` times (frames on
    other sockets may still be in flight); fails with the log's tail if it never is."""
    try:
        return wait_until(lambda: count(path.read_text(errors="replace"), needle) >= at_least
                          and count(path.read_text(errors="replace"), needle), timeout, 0.1, repr(needle))
    except TimeoutError:
        text = path.read_text(errors="replace")
        raise AssertionError(f"{count(text, needle)} of {at_least} {needle!r} in the log:\n{text[-4000:]}") from None
