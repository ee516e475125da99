"""`loom keys DIR`: make CURVE key pairs for a multi-host deployment."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, help="where to write the keys (created if missing)")
    parser.add_argument("--client", action="append", default=None,
                        help="client key pair to make and authorize (repeatable; default: client)")


def run(args: argparse.Namespace) -> int:
    from loom.curve import make_keys

    made = make_keys(args.directory, args.client or ["client"])
    for path in made:
        print(f"wrote {path}")
    print(f"broker: loom broker --curve-keys {args.directory}")
    print(f"workers and API: --curve-keys {args.directory} (copy broker.key and a client key pair to each host)")
    return 0
