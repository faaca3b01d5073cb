"""OpenAI-compatible HTTP server over `AsyncEngine`; `create_app` gives the ASGI app to mount or
serve (`omniserve serve` runs it on uvicorn)."""

from omniserve.server.app import create_app

__all__ = ["create_app"]
