"""OpenAI-compatible HTTP server over `AsyncEngine`; `create_app` gives the ASGI app to mount or
serve (`omniserve serve` runs it on uvicorn)."""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the app pulls in the engine (seconds), which the command line's
    # parser, reading the wire format's limits, must not wait for.
    if name == "create_app":
        from omniserve.server.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
