"""Incremental detokenization: text for each new token, as soon as it is whole.

Decoding a token on its own is wrong for most tokenizers (SentencePiece drops
the leading space, byte-level BPE can split a UTF-8 character across tokens),
so each step decodes a short window of recent tokens and emits what it adds.
A window that ends inside a character (U+FFFD at the end) emits nothing until
the following token completes it.
"""
from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    __slots__ = ("tokenizer", "ids", "prefix_offset", "read_offset")

    def __init__(self, tokenizer: Any, prompt_tail: list[int]):
        self.tokenizer = tokenizer
        # A few prompt tokens give the first generated token its left context.
        self.ids = list(prompt_tail)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back when generation ends."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""
