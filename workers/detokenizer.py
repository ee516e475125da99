"""Incremental detokenization: text for each new token, as soon as it is whole.

Decoding a token on its own is wrong for most tokenizers (SentencePiece drops
the leading space, byte-level BPE can split a UTF-8 character across tokens),
so each step decodes a short window of recent tokens and emits what it adds
to the text of the window's first part (the prefix), which was decoded before.
A window that ends inside a character (U+FFFD at the end) emits nothing until
the following token completes it.

One decode per token: the window's text after an emit is the next call's
prefix text, so it is kept rather than decoded again. The window grows by a
token each step and slides forward once it is SLIDE tokens long (the one step
that decodes twice), which keeps each decode short.
"""
from __future__ import annotations

from typing import Any, Callable, Union

from workers.byte_detokenizer import ByteDetokenizer

# Prefix length (tokens) at which the window slides. Longer windows slide less
# often but cost more per decode; 2 to 6 tokens decode in about the same time.
SLIDE = 4


def decoder_for(tokenizer: Any) -> Callable[[list[int]], str]:
    """ids -> text, as tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).

    For a tokenizers-backed tokenizer that keeps the library's own _decode,
    that is exactly the Rust decoder's output, reached without ~2 us of
    Python per call; any other tokenizer goes through its decode.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # transformers 4 names it differently; the generic path is still right
        TokenizersBackend = None
    if backend is not None and TokenizersBackend is not None and type(tokenizer)._decode is TokenizersBackend._decode:
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class IncrementalDetokenizer:
    __slots__ = ("decode", "ids", "prefix_offset", "read_offset", "prefix_text")

    def __init__(self, tokenizer: Any, prompt_tail: list[int], decode: Callable[[list[int]], str] | None = None):
        self.decode = decode or decoder_for(tokenizer)
        # A few prompt tokens give the first generated token its left context.
        self.ids = list(prompt_tail)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.prefix_text = self.decode(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        new_text = self.decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(self.prefix_text) and not new_text.endswith("\ufffd"):
            out = new_text[len(self.prefix_text):]
            if self.read_offset - self.prefix_offset >= SLIDE:
                # Slide: the emitted tokens become the next prefix, as their own window.
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.ids)
                self.prefix_text = self.decode(self.ids[self.prefix_offset:self.read_offset])
            else:
                self.read_offset = len(self.ids)
                self.prefix_text = new_text
            return out
        return ""

    def flush(self) -> str:
        """Whatever is still held back when generation ends."""
        new_text = self.decode(self.ids[self.prefix_offset:])
        rest = new_text[len(self.prefix_text):] if len(new_text) > len(self.prefix_text) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.prefix_text = ""
        return rest


Detokenizer = Union[IncrementalDetokenizer, ByteDetokenizer]


def new_detokenizer(tokenizer: Any, table: list[bytes] | None, prompt_tail: list[int]) -> Detokenizer:
    """A byte-table detokenizer when the model has a table (no left context needed), else a window one."""
    return ByteDetokenizer(table) if table is not None else IncrementalDetokenizer(tokenizer, prompt_tail)
