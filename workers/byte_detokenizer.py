"""Detokenizing a byte-level BPE model's tokens without calling the tokenizer.

With a byte-level tokenizer (GPT-2, Llama 3, the bundled model), a token is
a fixed run of bytes and the text of a sequence is those runs joined and
read as UTF-8, invalid bytes becoming U+FFFD. So a token's text needs a
table lookup and an incremental UTF-8 decoder that holds back a character's
first bytes until its last arrives: about 0.5 µs a token where decoding a
window through the tokenizer (workers/detokenizer.py) costs 2-4 µs, on the
engine thread, for every row of every step.

The table is built from the tokenizer's vocabulary by the byte-level
decoder's own rule and used only after it reproduces the tokenizer's decode:
for every token on its own and for random sequences of them. Any other
tokenizer, or one that disagrees anywhere, keeps the window detokenizer.
"""
from __future__ import annotations

import codecs
import logging
import random
from typing import Any

log = logging.getLogger("loom.worker")

# Sequences checked against the tokenizer's decode before a table is trusted.
CHECK_SEQUENCES = 256
CHECK_LENGTH = 24


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from a byte to the printable character a byte-level vocabulary spells it with."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


_CHAR_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _token_bytes(token: str) -> bytes:
    # The byte-level decoder's rule: a token spelt in the byte alphabet is those
    # bytes; one with any other character (an added token) is its own UTF-8.
    try:
        return bytes(_CHAR_BYTE[c] for c in token)
    except KeyError:
        return token.encode()


def byte_table(tokenizer: Any) -> list[bytes] | None:
    """Each token id's bytes (b"" for special tokens), or None when this tokenizer is not plainly byte-level."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or type(getattr(backend, "decoder", None)).__name__ != "ByteLevel":
        return None
    try:
        size = backend.get_vocab_size(with_added_tokens=True)
        # What decode(skip_special_tokens=True) skips: the added tokens marked special.
        special = {int(i) for i, added in backend.get_added_tokens_decoder().items() if added.special}
        table = []
        for i in range(size):
            token = backend.id_to_token(i)
            table.append(b"" if token is None or i in special else _token_bytes(token))
        if _agrees(backend, table):
            return table
    except Exception:  # a tokenizer this code does not understand: the window detokenizer is always right
        log.debug("no byte table for %s", type(tokenizer).__name__, exc_info=True)
    return None


def _agrees(backend: Any, table: list[bytes]) -> bool:
    def decode(ids: list[int]) -> str:
        return b"".join(table[i] for i in ids).decode("utf-8", "replace")

    singles = [[i] for i in range(len(table))]
    rng = random.Random(0)
    sequences = [[rng.randrange(len(table)) for _ in range(rng.randint(1, CHECK_LENGTH))]
                 for _ in range(CHECK_SEQUENCES)]
    for batch in (singles, sequences):
        expected = backend.decode_batch(batch, skip_special_tokens=True)
        for ids, text in zip(batch, expected):
            if decode(ids) != text:
                log.info("byte table disagrees with the tokenizer on %s: detokenizing by windows", ids[:8])
                return False
    return True


class ByteDetokenizer:
    """Text for each new token as soon as it is whole, from a byte table (same interface as IncrementalDetokenizer)."""

    __slots__ = ("table", "_utf8", "_held")

    def __init__(self, table: list[bytes]) -> None:
        self.table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        # Text ending in U+FFFD (bytes that are no character) waits for text that is, as the
        # window detokenizer's does: a model emitting byte garbage costs one event, not one a token.
        self._held = ""

    def push(self, token_id: int) -> str:
        try:
            piece = self.table[token_id]
        except IndexError:  # an id past the tokenizer's vocabulary (a padded embedding): decode skips it too
            return ""
        text = self._utf8.decode(piece)
        if not text:
            return ""
        if text.endswith("\ufffd"):
            self._held += text
            return ""
        if self._held:
            text, self._held = self._held + text, ""
        return text

    def flush(self) -> str:
        """What is held, and a character left unfinished when generation ends (U+FFFD, as decoding the whole text gives)."""
        rest, self._held = self._held + self._utf8.decode(b"", True), ""
        return rest
