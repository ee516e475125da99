"""`loom chat`'s two modes: one-shot (`-p TEXT`) and the interactive prompt."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from loom.chat.commands import COMMANDS_HELP, run_command
from loom.chat.render import Painter, explain
from loom.chat.session import Chat
from loom.chat.settings import DEFAULT_CONFIG, DEFAULT_MAX_TOKENS, Settings, UsageError, resolve_settings
from loom.client import DEFAULT_URL, LoomClient, LoomError

PROMPT = "you> "

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
            if run_command(chat, text, out, paint) == "quit":
                return 0
            continue
        chat.ask(line, show_usage=True)


def _enable_line_editing() -> None:
    try:
        import readline  # noqa: F401 - importing it is what turns on editing and history for input()
    except ImportError:
        pass
