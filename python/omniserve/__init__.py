"""omniserve: W4A8KV4-quantized and sparse-attention serving for Llama-family models.

Names are imported on first use so that `import omniserve` (and `omniserve --help`) stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "omniserve.engine.engine",
    "EngineStats": "omniserve.engine.engine",
    "AsyncEngine": "omniserve.engine.async_engine",
    "EngineConfig": "omniserve.config",
    "SamplingParams": "omniserve.sampling_params",
    "RequestOutput": "omniserve.outputs",
    "TokenLogprob": "omniserve.outputs",
}

if TYPE_CHECKING:
    from omniserve.config import EngineConfig
    from omniserve.engine.async_engine import AsyncEngine
    from omniserve.engine.engine import Engine, EngineStats
    from omniserve.outputs import RequestOutput, TokenLogprob
    from omniserve.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'omniserve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "AsyncEngine",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
]
