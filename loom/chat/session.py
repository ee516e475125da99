"""One `loom chat` conversation: the history sent with each question, and
each answer streamed to the terminal token by token."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TextIO

from loom.chat.render import Painter, describe_usage, explain, hidden_lines
from loom.chat.settings import Settings
from loom.client import LoomClient, LoomError, MessageDelta, TextDelta


@dataclass
class Answer:
    text: str
    final: MessageDelta | None = None
    interrupted: bool = False
    error: LoomError | None = None


@dataclass
class Conversation:
    """The history sent with every question, system prompt first."""

    system: str | None
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self, question: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns + [{"role": "user", "content": question}]

    def record(self, question: str, answer: str) -> None:
        self.turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    def reset(self) -> None:
        self.turns.clear()


class Chat:
    """Streams answers to the terminal and keeps the conversation."""

    def __init__(self, client: LoomClient, settings: Settings, out: TextIO, info: TextIO, err: TextIO) -> None:
        self.client = client
        self.settings = settings
        self.out = out  # the answer's text
        self.info = info  # usage and hidden-state lines
        self.err = err
        self.paint = Painter(info, os.environ)
        self.conversation = Conversation(settings.system)

    def ask(self, question: str, *, show_usage: bool) -> Answer:
        started = time.perf_counter()
        first_token_after: float | None = None
        pieces: list[str] = []
        answer = Answer(text="")
        stream = self.client.stream_chat(
            self.conversation.messages(question),
            self.settings.model,
            max_tokens=self.settings.max_tokens,
            temperature=self.settings.temperature,
            return_hidden_states=self.settings.hidden,
        )
        try:
            with stream:
                for event in stream:
                    if isinstance(event, TextDelta):
                        if first_token_after is None:
                            first_token_after = time.perf_counter() - started
                        pieces.append(event.text)
                        # Flush every token: the point is to watch it arrive.
                        self.out.write(event.text)
                        self.out.flush()
            answer.final = stream.final
        except KeyboardInterrupt:
            answer.interrupted = True
        except LoomError as exc:
            answer.error = exc
        finally:
            stream.close()
        answer.text = "".join(pieces)
        elapsed = time.perf_counter() - started

        if answer.text and not answer.text.endswith("\n"):
            self.out.write("\n")
            self.out.flush()
        if answer.interrupted:
            self.info.write(self.paint.dim("[stopped]") + "\n")
        elif answer.error is not None:
            self.err.write(explain(answer.error, self.settings.url, self.settings.model) + "\n")
        elif answer.final is not None:
            if show_usage:
                self.info.write(self.paint.dim(describe_usage(answer.final, elapsed, first_token_after)) + "\n")
            if self.settings.hidden:
                for line in hidden_lines(answer.final):
                    self.info.write(self.paint.dim(line) + "\n")
        self.info.flush()

        # Keep what the user saw, even if cut short; a failed turn leaves no trace.
        if answer.error is None and answer.text:
            self.conversation.record(question, answer.text)
        return answer
