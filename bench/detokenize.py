#!/usr/bin/env python
"""Incremental detokenizing cost per token: two decodes a token, one (the window detokenizer), and a byte table.

    python bench/detokenize.py

Streams the same completions (encoded text, 200 tokens each) through each
and prints microseconds per token, measured in this run; "two decodes" is the
implementation that workers/detokenizer.py replaced, kept here as the
baseline; "byte table" is workers/byte_detokenizer.py, which the worker uses
for byte-level tokenizers (all three here).
"""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from workers.byte_detokenizer import ByteDetokenizer, byte_table  # noqa: E402
from workers.detokenizer import IncrementalDetokenizer  # noqa: E402


class TwoDecodeDetokenizer:
    """The replaced implementation: the prefix window and the whole window decoded on every token."""

    def __init__(self, tokenizer, prompt_tail: list[int]):
        self.tokenizer = tokenizer
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
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""


def tokenizers():
    from transformers import AutoTokenizer

    from loom.toy_models import make_tokenizer

    out = {"toy (byte-level BPE, 512)": make_tokenizer()}
    bundled = REPO / "models" / "loom-tiny"
    if (bundled / "tokenizer.json").is_file():
        out["loom-tiny (byte-level BPE, 1024)"] = AutoTokenizer.from_pretrained(str(bundled), local_files_only=True)
    return out


def per_token_us(cls, tokenizer, streams: list[tuple[list[int], list[int]]]) -> tuple[float, str]:
    best, text = float("inf"), ""
    for _ in range(3):  # best of three: the machine is shared
        t0 = time.perf_counter()
        pieces = []
        for tail, completion in streams:
            d = cls(tokenizer, tail)
            pieces += [d.push(t) for t in completion]
            pieces.append(d.flush())
        best = min(best, (time.perf_counter() - t0) / sum(len(c) for _, c in streams) * 1e6)
        text = "".join(pieces)
    return best, text


def main() -> int:
    rng = random.Random(0)
    words = ["hello", "world", "the", "capital", "of", "France", "is", "Paris", "café", "naïve", "日本語", "🎉", "1,", "2."]
    print(f"detokenizing, 50 streams x 200 tokens, best of 3 (load average {[round(x, 2) for x in os.getloadavg()]})")
    print(f"{'tokenizer':<34} {'two decodes':>12} {'window':>7} {'byte table':>11} {'speed-up':>9}  same text")
    for name, tok in tokenizers().items():
        streams = []
        for _ in range(50):
            ids = tok(" ".join(rng.choice(words) for _ in range(400)), add_special_tokens=False)["input_ids"]
            # The prompt ends where a character does, as a prompt made from text always does.
            cut = next(k for k in range(4, 20) if not tok.decode(ids[:k]).endswith("\ufffd"))
            streams.append((ids[:cut], ids[cut:cut + 200]))
        before, text_before = per_token_us(TwoDecodeDetokenizer, tok, streams)
        window, text_window = per_token_us(IncrementalDetokenizer, tok, streams)
        table = byte_table(tok)
        if table is None:
            print(f"{name:<34} {before:>12.2f} {window:>7.2f} {'-':>11} {before / window:>8.1f}x  {text_before == text_window}")
            continue
        now, text_now = per_token_us(lambda _tok, _tail: ByteDetokenizer(table), tok, streams)
        print(f"{name:<34} {before:>12.2f} {window:>7.2f} {now:>11.2f} {before / now:>8.1f}x  "
              f"{text_before == text_window == text_now}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
