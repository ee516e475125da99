"""`loom chat`: talk to a Loom server in the terminal, token by token.

Interactive by default; `-p TEXT` asks one question, prints the streamed
answer on stdout and exits. Only the client library is imported here, never
torch or the server, so this starts fast anywhere.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from loom.client import DEFAULT_URL, HiddenState, LoomClient, LoomError, LoomHTTPError, MessageDelta, TextDelta

DEFAULT_CONFIG = Path("~/.config/loom/chat.yaml")
DEFAULT_MAX_TOKENS = 1024  # what Weaver sends; the server's own default (256) cuts answers short
PROMPT = "you> "
HIDDEN_PREVIEW = 6  # values of the hidden state shown after each answer

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

EPILOG = f"""\
{COMMANDS_HELP}

settings come from, first to last: flags, the --backend chosen from the
config file, $LOOM_URL / $LOOM_API_KEY, the config's first backend, defaults.
The config file (default {DEFAULT_CONFIG}, if it exists) is Weaver's:
  backends:
    - name: loom
      type: loom
      url: http://localhost:8080
      model: TinyLlama/TinyLlama-1.1B-Chat-v1.0

examples:
  loom chat
  loom chat -p "Count from 1 to 5."
  echo "Why is the sky blue?" | loom chat -p - --hidden"""


class UsageError(Exception):
    """A problem with the flags or the config file: exit 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument(
        "-p", "--prompt", metavar="TEXT",
        help="one-shot: send TEXT, print the streamed answer on stdout and exit; '-' reads it from stdin",
    )
    parser.add_argument("--url", help=f"server URL (default: $LOOM_URL or {DEFAULT_URL})")
    parser.add_argument("--model", help="model id (default: the server's default model)")
    parser.add_argument(
        "--max-tokens", type=int, metavar="N", help=f"most tokens per answer (default: {DEFAULT_MAX_TOKENS})"
    )
    parser.add_argument("--temperature", type=float, metavar="T", help="0 is greedy (default: the server's, 0.7)")
    parser.add_argument("--system", metavar="TEXT", help="system prompt put before the conversation")
    parser.add_argument("--api-key", metavar="KEY", help="bearer token (default: $LOOM_API_KEY)")
    parser.add_argument("--config", type=Path, metavar="PATH", help=f"backends file (default: {DEFAULT_CONFIG} if it exists)")
    parser.add_argument("--backend", metavar="NAME", help="backend to use from the config file (default: the first)")
    parser.add_argument("--hidden", action="store_true", help="request and show the final hidden state of each answer")


# --- settings ----------------------------------------------------------------


@dataclass
class Settings:
    url: str
    model: str
    api_key: str | None
    max_tokens: int
    temperature: float | None
    system: str | None
    hidden: bool


def resolve_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    backend, chosen = _load_backend(args.config, args.backend)
    # A backend named with --backend beats the environment; one picked only
    # because it comes first in the file does not.
    explicit = backend if chosen else {}
    implicit = {} if chosen else backend

    def pick(flag: Any, key: str, env: str | None, default: Any) -> Any:
        for value in (flag, explicit.get(key), environ.get(env) if env else None, implicit.get(key)):
            if value is not None:
                return value
        return default

    return Settings(
        url=str(pick(args.url, "url", "LOOM_URL", DEFAULT_URL)),
        model=str(pick(args.model, "model", None, "")),
        api_key=pick(args.api_key, "api_key", "LOOM_API_KEY", None),
        max_tokens=args.max_tokens if args.max_tokens is not None else DEFAULT_MAX_TOKENS,
        temperature=args.temperature,
        system=args.system,
        hidden=args.hidden,
    )


def _load_backend(path: Path | None, name: str | None) -> tuple[dict[str, Any], bool]:
    """The chosen backend's settings, and whether --backend chose it."""
    if path is None:
        default = DEFAULT_CONFIG.expanduser()
        if not default.is_file():
            if name:
                raise UsageError(f"--backend {name} needs a config file, and there is none at {default}")
            return {}, False
        path = default

    import yaml  # only when there is a config to read

    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"config {path} is not valid YAML: {exc}") from exc

    backends = document.get("backends") if isinstance(document, dict) else None
    if not isinstance(backends, list) or not all(isinstance(b, dict) for b in backends):
        raise UsageError(f"config {path} needs a `backends:` list of {{name, type, url, model}} entries")
    if not backends:
        raise UsageError(f"config {path} lists no backends")
    if name:
        matches = [b for b in backends if b.get("name") == name]
        if not matches:
            names = ", ".join(str(b.get("name")) for b in backends)
            raise UsageError(f"no backend named {name!r} in {path} (it has: {names})")
        backend = matches[0]
    else:
        backend = backends[0]
    kind = backend.get("type", "loom")
    if kind != "loom":
        raise UsageError(f"backend {backend.get('name')!r} in {path} has type {kind!r}; loom chat only talks to type: loom")
    return backend, bool(name)


# --- output ------------------------------------------------------------------


class Painter:
    """ANSI styling, only for terminals and only without $NO_COLOR."""

    def __init__(self, stream: TextIO, environ: Mapping[str, str]) -> None:
        isatty = getattr(stream, "isatty", lambda: False)
        self.enabled = isatty() and "NO_COLOR" not in environ and environ.get("TERM") != "dumb"

    def dim(self, text: str) -> str:
        return f"\033[2m{text}\033[0m" if self.enabled else text


def describe_usage(final: MessageDelta, elapsed: float, first_token_after: float | None) -> str:
    usage = final.usage
    rate = final.metadata.get("tokens_per_second")
    if not isinstance(rate, (int, float)):
        # Measure from the first token: the prompt's own processing time is not generation speed.
        span = elapsed - (first_token_after or 0.0)
        rate = (usage.completion_tokens - 1) / span if span > 0 and usage.completion_tokens > 1 else None
    parts = [f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens"]
    if rate is not None:
        parts.append(f"{rate:.1f} tok/s")
    parts.append(f"{elapsed:.2f} s")
    if final.stop_reason:
        parts.append(final.stop_reason)
    model = final.metadata.get("model")
    if model:
        parts.append(str(model))
    return "[" + " · ".join(parts) + "]"


def describe_hidden(state: HiddenState, label: str) -> str:
    values = state.values()
    layer = state.layer if state.layer is not None else label
    preview = ", ".join(f"{v:.4f}" for v in values[:HIDDEN_PREVIEW])
    more = ", ..." if len(values) > HIDDEN_PREVIEW else ""
    dtype = f" {state.dtype}" if state.dtype else ""
    return f"hidden state, layer {layer}: shape {list(state.shape)}{dtype} · L2 norm {state.l2_norm():.4f} · [{preview}{more}]"


def hidden_lines(final: MessageDelta) -> list[str]:
    lines = []
    if final.hidden_state is not None:
        lines.append(describe_hidden(final.hidden_state, "-1"))
    for key, state in (final.hidden_states or {}).items():
        lines.append(describe_hidden(state, key))
    return lines or ["hidden state: the server sent none"]


def explain(exc: LoomError, url: str, model: str) -> str:
    """One or two lines a person can act on."""
    text = f"error: {exc}"
    if isinstance(exc, LoomHTTPError):
        if exc.status_code == 404 and (exc.error_type == "model_not_loaded" or "not loaded" in exc.message.lower()):
            name = model or "the default model"
            text += (
                f"\n  {name} is not loaded on {url}; load it with /load NAME, or with "
                f"`curl -X POST {url}/models/load -H 'Content-Type: application/json' -d '{{\"model\": \"NAME\"}}'`"
            )
        elif exc.status_code == 401:
            text += "\n  pass the server's key with --api-key or $LOOM_API_KEY"
    return text


# --- one conversation --------------------------------------------------------


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


# --- modes -------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    try:
        settings = resolve_settings(args, os.environ)
    except UsageError as exc:
        print(f"loom chat: {exc}", file=sys.stderr)
        return 2
    _tolerate_unencodable_output()
    try:
        with LoomClient(settings.url, api_key=settings.api_key) as client:
            if args.prompt is not None:
                return one_shot(client, settings, args.prompt)
            return interactive(client, settings)
    except KeyboardInterrupt:
        # Outside an answer (connecting, reading stdin): just leave, quietly.
        sys.stderr.write("\n")
        return 130


def _tolerate_unencodable_output() -> None:
    # A model can emit characters the terminal's encoding lacks; show a
    # replacement character rather than crash mid-answer.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="replace")


def one_shot(client: LoomClient, settings: Settings, prompt: str) -> int:
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        print("loom chat: the prompt is empty", file=sys.stderr)
        return 2
    chat = Chat(client, settings, out=sys.stdout, info=sys.stderr, err=sys.stderr)
    try:
        answer = chat.ask(prompt, show_usage=False)
    except BrokenPipeError:
        # The reader went away (`| head`): nothing left to do, and nothing to complain about.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
        return 0
    if answer.interrupted:
        return 130
    return 1 if answer.error is not None else 0


def interactive(client: LoomClient, settings: Settings) -> int:
    out = sys.stdout
    paint = Painter(out, os.environ)
    try:
        health = client.health()
    except LoomError as exc:
        print(explain(exc, settings.url, settings.model), file=sys.stderr)
        return 1
    _enable_line_editing()
    model = settings.model or "the server's default model"
    out.write(paint.dim(f"loom chat · {settings.url} · {model} · /help for commands, Ctrl-D to leave") + "\n")
    if health.status != "healthy":
        out.write(paint.dim(f"warning: the server says it is {health.status}") + "\n")
    out.flush()

    chat = Chat(client, settings, out=out, info=out, err=sys.stderr)
    while True:
        try:
            # A plain prompt: escape codes in it would confuse readline's idea of the line width.
            line = input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if _command(chat, text, out, paint) == "quit":
                return 0
            continue
        chat.ask(line, show_usage=True)


def _enable_line_editing() -> None:
    try:
        import readline  # noqa: F401 - importing it is what turns on editing and history for input()
    except ImportError:
        pass


def _command(chat: Chat, text: str, out: TextIO, paint: Painter) -> str | None:
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
