"""What the engine hands back to users, per request and per step."""

from __future__ import annotations

from typing import Literal

import msgspec

FinishReason = Literal["stop", "length", "abort", "error"]
OutputKind = Literal["final", "delta", "cumulative"]
"""How a request reports progress: only once when finished ("final", what `Engine.generate`
uses), every step with the new tokens ("delta", for streaming), or every step with everything so
far ("cumulative")."""


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """Log-probability of one generated token and, if asked, of the most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token id, logprob) pairs, most likely first."""


class RequestOutput(msgspec.Struct, kw_only=True):
    """One request's progress. In "delta" mode `token_ids`, `text` and `logprobs` hold only what
    is new since the previous output; otherwise they hold everything generated so far."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[float | None] | None = None
    """Log-probability of each prompt token given the ones before it (None for the first); set
    on the final output of requests that asked for it."""
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the request, if one did."""
    error: str | None = None
    """Why the request failed, when finish_reason is "error"."""
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    """Tokens generated so far in total (also in "delta" mode)."""
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
