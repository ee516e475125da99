"""`loom api`: the HTTP front end under uvicorn."""
from __future__ import annotations

import argparse
from pathlib import Path

from loom.config import DEFAULT_FRONTEND, add_common_arguments, env, setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=env("LOOM_HOST", "127.0.0.1"),
                        help="address to listen on (default %(default)s: this machine only)")
    parser.add_argument("--port", type=int, default=int(env("LOOM_PORT", "8080") or 8080), help="default %(default)s")
    parser.add_argument("--broker", default=env("LOOM_BROKER_FRONTEND", DEFAULT_FRONTEND),
                        help="the broker's API address (env LOOM_BROKER_FRONTEND; default %(default)s)")
    parser.add_argument("--default-model", default=env("LOOM_DEFAULT_MODEL"),
                        help='model used when a request says "model": "" (env LOOM_DEFAULT_MODEL)')
    parser.add_argument("--api-key-file", default=env("LOOM_API_KEY_FILE"),
                        help="require `Authorization: Bearer <key>` with the key in this file "
                             "(or set LOOM_API_KEY); /health stays open")
    parser.add_argument("--curve-keys", type=Path, default=env("LOOM_CURVE_KEYS"),
                        help="key directory from `loom keys` for an encrypted broker connection")
    parser.add_argument("--curve-name", default=env("LOOM_CURVE_NAME", "client"), help="client key pair name")
    parser.add_argument("--require-model", action="append", default=None,
                        help="a model named at start: /health answers 503 \"starting\" until a live worker holds it "
                             "(repeatable; env LOOM_REQUIRE_MODELS, comma-separated)")
    parser.add_argument("--drain-timeout", type=float, default=float(env("LOOM_DRAIN_TIMEOUT", "30") or 30),
                        help="on SIGTERM, seconds running requests get to finish before they are ended "
                             "(env LOOM_DRAIN_TIMEOUT; default %(default)g)")
    parser.add_argument("--no-direct-replies", dest="direct_replies", action="store_false",
                        default=env("LOOM_DIRECT_REPLIES", "1") != "0",
                        help="take every frame through the broker, even from workers on this host, which otherwise "
                             "send a generation's frames straight to this process (env LOOM_DIRECT_REPLIES=0)")
    parser.add_argument("--fd", type=int, default=None,
                        help="serve on this inherited listening socket instead of binding --host/--port "
                             "(loom serve passes one to each API process)")
    parser.add_argument("--wait-for-broker", type=float, default=0.0, metavar="SECONDS",
                        help="before accepting connections, wait up to this long for the broker to answer, so a "
                             "(re)started process does not answer its first requests 503 (default %(default)g)")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    setup_logging("api", args.log_level, args.log_format)
    import uvicorn

    from api.app import create_app
    from api.drain import DrainingServer
    from api.settings import Settings, read_api_key, required_models_from_env

    settings = Settings(
        broker=args.broker,
        default_model=args.default_model,
        api_key=read_api_key(env("LOOM_API_KEY"), args.api_key_file),
        curve=argparse.Namespace(curve_keys=args.curve_keys, curve_name=args.curve_name) if args.curve_keys else None,
        required_models=args.require_model or required_models_from_env(),
        drain_timeout=args.drain_timeout,
        broker_wait_s=args.wait_for_broker,
        direct_replies=args.direct_replies,
    )
    app = create_app(settings)
    # log_config=None: uvicorn's own lines go through Loom's handler (text or JSON, with request ids).
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=(args.log_level or "info").lower(),
                            access_log=False, timeout_graceful_shutdown=3, log_config=None)
    if args.fd is not None:
        from loom.listeners import inherited

        DrainingServer(config, app).run(sockets=[inherited(args.fd)])
    else:
        DrainingServer(config, app).run()
    return 0
