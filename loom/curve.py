"""CURVE encryption and authentication for broker connections between hosts.

A key directory made by `loom keys DIR` holds the broker's key pair
(broker.key, broker.key_secret), one client key pair per name
(NAME.key, NAME.key_secret) and `authorized/`, the public keys the broker
lets in. The broker encrypts both of its sockets and refuses any peer whose
public key is not authorized; workers and API processes need the broker's
public key and a client key pair.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from loom.config import env

log = logging.getLogger("loom.curve")


def add_curve_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--curve-keys", type=Path, default=env("LOOM_CURVE_KEYS"),
                        help="key directory from `loom keys`: encrypt and authenticate the broker connection "
                             "(env LOOM_CURVE_KEYS; default: plain TCP, fine on loopback)")
    parser.add_argument("--curve-name", default=env("LOOM_CURVE_NAME", "client"),
                        help="which client key pair in --curve-keys to use (default %(default)s)")


def apply_curve_client(sock: zmq.Socket, args: argparse.Namespace) -> None:
    keys = getattr(args, "curve_keys", None)
    if not keys:
        return
    keys = Path(keys)
    server_public, _ = zmq.auth.load_certificate(keys / "broker.key")
    public, secret = zmq.auth.load_certificate(keys / f"{args.curve_name}.key_secret")
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def start_curve_server(ctx: zmq.Context, keys: Path) -> ThreadAuthenticator:
    """Authenticator that admits only the public keys in keys/authorized."""
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys / "authorized"))
    return auth


def apply_curve_server(sock: zmq.Socket, keys: Path) -> None:
    public, secret = zmq.auth.load_certificate(keys / "broker.key_secret")
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_server = True


def make_keys(directory: Path, clients: list[str]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "authorized").mkdir(exist_ok=True)
    made = []
    if not (directory / "broker.key_secret").exists():
        zmq.auth.create_certificates(directory, "broker")
        made.append(directory / "broker.key_secret")
    for name in clients:
        if (directory / f"{name}.key_secret").exists():
            continue
        public, _ = zmq.auth.create_certificates(directory, name)
        (directory / "authorized" / f"{name}.key").write_bytes(Path(public).read_bytes())
        made.append(directory / f"{name}.key_secret")
    for secret in directory.glob("*.key_secret"):
        secret.chmod(0o600)
    return made
