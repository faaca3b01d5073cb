"""`omniserve serve`: the OpenAI-compatible HTTP server (Starlette app on uvicorn)."""

from __future__ import annotations

import argparse
import os

from omniserve.cli.engine_args import add_engine_args, engine_kwargs


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
        help="the model name clients send (default: the --model argument)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("OMNISERVE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every endpoint but /health "
        "(default: $OMNISERVE_API_KEY; none: no check)",
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


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from omniserve.engine.async_engine import AsyncEngine
    from omniserve.server.app import create_app

    limit = None if args.max_queued_requests < 0 else args.max_queued_requests
    engine = AsyncEngine.from_pretrained(
        args.model, max_queued_requests=limit, **engine_kwargs(args)
    )
    name = args.served_model_name or args.model or engine.config.model
    app = create_app(engine, model_name=name, api_key=args.api_key or None)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.shutdown_timeout,
    )
    uvicorn.Server(config).run()
    return 0
