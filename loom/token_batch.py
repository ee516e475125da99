"""Token messages bound for one API process, collected into one `Tokens`
message: a worker's step (workers/step_batch.py) and the broker's regrouping
of a Tokens message whose entries go to several API processes both build them."""
from __future__ import annotations

from typing import Any

from loom.protocol import Token, Tokens


class TokenBatch:
    """Token messages bound for one API process, collected into one Tokens message."""

    __slots__ = ("rids", "texts", "indexes", "extras", "buffers", "has_extras")

    def __init__(self) -> None:
        self.rids: list[str] = []
        self.texts: list[str] = []
        self.indexes: list[int] = []
        self.extras: list[dict[str, Any]] = []  # one per entry once any entry has some, else empty
        self.buffers: list[Any] = []
        self.has_extras = False

    def __len__(self) -> int:
        return len(self.rids)

    def add_texts(self, rids: list[str], texts: list[str], indexes: list[int]) -> None:
        """add(Token(rid, text, index), []) for each entry: tokens with nothing but their text, without Token objects."""
        self.rids += rids
        self.texts += texts
        self.indexes += indexes
        if self.has_extras:
            self.extras += [{} for _ in rids]

    def add(self, token: Token, buffers: list[Any]) -> None:
        extra: dict[str, Any] = {}
        if token.arrays:
            extra["arrays"] = token.arrays
            self.buffers.extend(buffers)
        if token.logprobs is not None:
            extra["logprobs"] = token.logprobs
        if token.lens is not None:
            extra["lens"] = token.lens
        if extra and not self.has_extras:  # the first entry with extras: every entry gets a map from now on
            self.extras = [{} for _ in self.rids]
            self.has_extras = True
        self.rids.append(token.rid)
        self.texts.append(token.text)
        self.indexes.append(token.index)
        if self.has_extras:
            self.extras.append(extra)

    def message(self, api: bytes, t_emit: float) -> tuple[Tokens, list[Any]]:
        return Tokens(api=api, rids=self.rids, texts=self.texts, indexes=self.indexes, t_emit=t_emit,
                      extras=self.extras), self.buffers
