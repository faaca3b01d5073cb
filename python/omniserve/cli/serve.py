"""`omniserve serve`: the OpenAI-compatible HTTP server (Starlette app on uvicorn)."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from omniserve.cli.engine_args import add_engine_args, engine_kwargs
from omniserve.errors import ConfigError
from omniserve.server.protocol import DEFAULT_MAX_REQUEST_BYTES

BUNDLED_MODEL_NAME = "omniserve-small"
"""The served name of the bundled model (`engine.bundled_model_path`)."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API",
        description="OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, "
        "/v1/models, /health and /metrics (Prometheus).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send (default: the --model directory's name, or "
        f"{BUNDLED_MODEL_NAME!r} for the bundled model)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("OMNISERVE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every endpoint but /health "
        "(default: $OMNISERVE_API_KEY; neither set: no check; an empty key is an error)",
    )
    p.add_argument(
        "--allow-unknown-fields",
        action="store_true",
        help="drop request fields the server does not know, with a warning in the log, instead "
        "of answering 400 (clients that send newer OpenAI fields)",
    )
    p.add_argument(
        "--chat-template",
        type=Path,
        default=None,
        metavar="FILE",
        help="a Jinja chat template for /v1/chat/completions, replacing the tokenizer's (for "
        "models that ship none)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help=f"larger request bodies get 413 (default: {DEFAULT_MAX_REQUEST_BYTES})",
    )
    p.add_argument(
        "--max-queued-requests",
        type=int,
        default=1024,
        help="requests waiting for a slot beyond which new ones get 503 (default: 1024; "
        "-1: no limit)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGINT/SIGTERM, seconds to let in-flight requests finish before aborting them "
        "(default: 30)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn's log level (default: info)",
    )
    add_engine_args(p)
    p.set_defaults(func=run)


def served_model_name(args: argparse.Namespace) -> str:
    """What /v1/models lists and requests must name: short, never an install path."""
    if args.served_model_name:
        return str(args.served_model_name)
    return Path(args.model).name if args.model else BUNDLED_MODEL_NAME


def api_key(args: argparse.Namespace) -> str | None:
    """The key to require; None to run without one. An empty or blank key (`--api-key ""`, an
    empty $OMNISERVE_API_KEY) would silently turn authentication off, so it is refused."""
    if args.api_key is None:
        return None
    if not args.api_key.strip():
        raise ConfigError(
            "the API key is empty (--api-key or $OMNISERVE_API_KEY): pass a key, or set neither "
            "to serve without authentication"
        )
    return str(args.api_key)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from omniserve.engine.async_engine import AsyncEngine
    from omniserve.server.app import create_app
    from omniserve.server.serving import DrainingServer

    key, name = api_key(args), served_model_name(args)
    template = None
    if args.chat_template is not None:
        try:
            template = args.chat_template.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read --chat-template {args.chat_template}: {exc}") from None
    limit = None if args.max_queued_requests < 0 else args.max_queued_requests
    engine = AsyncEngine.from_pretrained(
        args.model, max_queued_requests=limit, **engine_kwargs(args)
    )
    app = create_app(
        engine,
        model_name=name,
        api_key=key,
        allow_unknown_fields=args.allow_unknown_fields,
        chat_template=template,
        max_request_bytes=args.max_request_bytes,
    )
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
    # uvicorn re-raises SIGINT once its (graceful) shutdown is done: not an error here.
    with contextlib.suppress(KeyboardInterrupt):
        DrainingServer(config, engine, drain=args.shutdown_timeout).run()
    return 0
