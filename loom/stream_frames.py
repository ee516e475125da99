"""Protocol messages (their multipart frames) over a byte stream: a worker's direct replies to an API process.

ZeroMQ frames messages itself; a plain Unix socket carries bytes, so each
message is written as a prefix and its parts back to back:

    u32 size of what follows the prefix, u32 number of parts,
    u32 length of each part, then the parts.

All little-endian. A reader that meets a message over MAX_MESSAGE_BYTES or
with impossible lengths stops: the stream cannot be trusted past that point.
"""
from __future__ import annotations

import struct
from typing import Any

from loom.protocol_checks import ProtocolError

MAX_MESSAGE_BYTES = 1 << 30
MAX_PARTS = 1 << 16
_PREFIX = struct.Struct("<II")


def part_size(part: Any) -> int:
    """Bytes in a part (a memoryview over a float array counts items, not bytes, with len())."""
    return len(part) if type(part) is bytes else memoryview(part).nbytes


_ONE_PART = struct.Struct("<III")  # the prefix and the one length of a message in one part


def framed(parts: list[Any]) -> tuple[list[Any], int]:
    """The buffers that write one message (for sendmsg), and their total size."""
    if len(parts) == 1:  # a step's tokens without arrays: most messages
        size = part_size(parts[0])
        return [_ONE_PART.pack(4 + size, 1, size), parts[0]], _ONE_PART.size + size
    sizes = [part_size(p) for p in parts]
    lengths = struct.pack(f"<{len(parts)}I", *sizes)
    body = len(lengths) + sum(sizes)
    return [_PREFIX.pack(body, len(parts)), lengths, *parts], _PREFIX.size + body


class FrameReader:
    """Bytes in, whole messages out (each a list of parts: memoryviews into the bytes received)."""

    def __init__(self) -> None:
        self._held = bytearray()  # the start of a message whose end has not arrived
        self._need = 0  # bytes that message needs in all, once its prefix is in

    def feed(self, data: bytes) -> list[list[memoryview]]:
        """The messages completed by `data`. Raises ProtocolError for a stream that cannot be read on."""
        if self._held:
            self._held += data
            if len(self._held) < self._need:  # a large message still arriving: no copy yet
                return []
            data = bytes(self._held)
            self._held.clear()
        view = memoryview(data)
        out = []
        at, end = 0, len(data)
        while end - at >= _PREFIX.size:
            body, count = _PREFIX.unpack_from(data, at)
            if body > MAX_MESSAGE_BYTES or count > MAX_PARTS or 4 * count > body:
                raise ProtocolError(f"stream message of {body} bytes in {count} parts")
            if end - at - _PREFIX.size < body:
                self._need = _PREFIX.size + body
                break
            start = at + _PREFIX.size
            sizes = struct.unpack_from(f"<{count}I", data, start)
            if 4 * count + sum(sizes) != body:
                raise ProtocolError("stream message parts do not add up to its size")
            parts = []
            pos = start + 4 * count
            for size in sizes:
                parts.append(view[pos:pos + size])
                pos += size
            out.append(parts)
            at = start + body
        if at < end:
            if end - at < _PREFIX.size:
                self._need = _PREFIX.size
            self._held += view[at:]
        return out
