"""The slash commands of an interactive `loom chat`."""
from __future__ import annotations

from collections.abc import Callable
from typing import TextIO

from loom.chat.render import Painter, explain
from loom.chat.session import Chat
from loom.client import LoomError

COMMANDS_HELP = """\
commands:
  /model [NAME]  switch to model NAME ("" or "default": the server's default);
                 without NAME, show the current model and the loaded ones
  /load NAME     load NAME on the server and switch to it
  /reset         forget the conversation (the --system prompt stays)
  /hidden        toggle showing the final hidden state after each answer
  /help          this list
  /quit          leave (Ctrl-D at the prompt does too)
Ctrl-C during an answer stops it; Ctrl-C at the prompt leaves."""


def run_command(chat: Chat, text: str, out: TextIO, paint: Painter) -> str | None:
    name, _, rest = text.partition(" ")
    rest = rest.strip()

    def say(message: str) -> None:
        out.write(paint.dim(message) + "\n")
        out.flush()

    if name in ("/quit", "/exit", "/q"):
        return "quit"
    if name == "/help":
        say(COMMANDS_HELP)
    elif name == "/reset":
        chat.conversation.reset()
        say("conversation cleared")
    elif name == "/hidden":
        chat.settings.hidden = not chat.settings.hidden
        say(f"hidden states {'on' if chat.settings.hidden else 'off'}")
    elif name == "/model":
        if rest:
            chat.settings.model = "" if rest in ('""', "default") else rest
            say(f"model: {chat.settings.model or 'the server default'}")
        else:
            _show_models(chat, say)
    elif name == "/load":
        if not rest:
            say("usage: /load NAME")
        else:
            _load(chat, rest, say)
    else:
        say(f"unknown command {name}; /help lists them")
    return None


def _show_models(chat: Chat, say: Callable[[str], None]) -> None:
    say(f"model: {chat.settings.model or 'the server default'}")
    try:
        loaded = chat.client.models().loaded_models
    except LoomError as exc:
        chat.err.write(explain(exc, chat.settings.url, chat.settings.model) + "\n")
        return
    if not loaded:
        say("no model is loaded on the server; /load NAME loads one")
    for m in loaded:
        say(f"  {m.model_id}  ({m.device}, {m.dtype}, hidden size {m.hidden_size}, {m.num_layers} layers)")


def _load(chat: Chat, name: str, say: Callable[[str], None]) -> None:
    say(f"loading {name} ...")
    try:
        result = chat.client.load_model(name)
    except KeyboardInterrupt:
        say("stopped waiting (the server may still finish loading it)")
        return
    except LoomError as exc:
        chat.err.write(f"error: {exc}\n")
        return
    chat.settings.model = result.model_id
    seconds = f" in {result.load_time_seconds:.1f} s" if result.load_time_seconds is not None else ""
    say(f"loaded {result.model_id} on {result.device}{seconds}; now chatting with it")
