"""The `loom` command: one entry point, one subcommand per process or tool.

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int`; modules are imported only when their subcommand runs so
that `loom chat` never pays for importing torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "serve": ("loom.launcher", "Run the whole stack (broker, workers, API) on this machine."),
    "broker": ("broker.main", "Run the broker: routes requests from API processes to workers."),
    "worker": ("workers.main", "Run one worker process on one device."),
    "api": ("api.main", "Run the HTTP API (FastAPI under uvicorn)."),
    "chat": ("loom.chat", "Chat with a Loom server in the terminal."),
    "keys": ("loom.keys", "Make CURVE key pairs for encrypted broker connections."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loom",
        description="Loom: a model server that streams tokens and hidden states.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        # Arguments are added lazily below, only for the chosen subcommand.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Find the subcommand first so only its module is imported.
    name = next((a for a in argv if not a.startswith("-")), None)
    if name in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[name][0])
        sub = parser._subparsers._group_actions[0].choices[name]  # type: ignore[union-attr]
        module.add_arguments(sub)
        args = parser.parse_args(argv)
        return int(module.run(args) or 0)
    parser.parse_args(argv)  # prints help or the error for an unknown command
    return 2


if __name__ == "__main__":
    sys.exit(main())
