"""The app on uvicorn, shut down in the engine's order (`omniserve serve`).

On SIGINT/SIGTERM uvicorn stops accepting, waits for running requests, and past its
`timeout_graceful_shutdown` cancels their tasks: connections are cut mid-response. So the engine
drains first: in-flight requests get `drain` seconds, then it aborts what is left, and the aborted
requests' handlers still answer (a 503, or an SSE error event and `[DONE]`) within `GRACE_S`
seconds, before uvicorn's own limit (drain + GRACE_S, rounded up) cancels anything.
"""

from __future__ import annotations

import asyncio
import math
import socket

import uvicorn

from omniserve.engine.async_engine import AsyncEngine

GRACE_S = 5.0
"""Seconds the handlers of aborted requests have to write their last bytes."""


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, drain: float) -> None:
        # uvicorn takes whole seconds here.
        config.timeout_graceful_shutdown = math.ceil(drain + GRACE_S)
        super().__init__(config)
        self._engine, self._drain = engine, drain

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        draining = asyncio.create_task(self._engine.shutdown(self._drain))
        try:
            await super().shutdown(sockets)
        finally:
            await draining
