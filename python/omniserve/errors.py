"""The project's one exception hierarchy, rooted in the Rust core's `OmniserveError`."""

from omniserve._scheduler import (
    ConfigError,
    InvalidRequestError,
    OmniserveError,
    RequestRejectedError,
    SchedulerInternalError,
)


class CheckpointError(OmniserveError):
    """A checkpoint directory is missing files or holds tensors of the wrong name, dtype or shape."""


class EngineDeadError(OmniserveError):
    """The engine failed and can no longer serve; every pending request receives this."""


class EngineOverloadedError(OmniserveError):
    """More requests wait for a slot than the queue limit allows; retry later."""


__all__ = [
    "CheckpointError",
    "ConfigError",
    "EngineDeadError",
    "EngineOverloadedError",
    "InvalidRequestError",
    "OmniserveError",
    "RequestRejectedError",
    "SchedulerInternalError",
]
