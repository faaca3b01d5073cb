"""How one request wants its tokens chosen and when its generation ends.

`SamplingParams` is validated once, at construction, so the sampler and the engine can trust every
field: a bad value is reported to the caller as `InvalidRequestError` naming the field and its valid
range, instead of surfacing later as a NaN or a device-side assert in the middle of a batch that
other requests share.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

import msgspec

from omniserve.errors import InvalidRequestError

MAX_LOGPROBS = 20
"""Most alternatives a request may ask for per generated token (OpenAI's limit)."""

GREEDY_EPS = 1e-5
"""Temperatures below this are greedy: dividing logits by such a small number only risks
overflow to inf/NaN while the distribution is already argmax up to rounding (vLLM uses 1e-5 too)."""


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-request sampling and stopping options, with vLLM/OpenAI meanings.

    Construct it directly from Python, or with `SamplingParams.from_dict` from untrusted input
    (JSON bodies), which also checks types and unknown fields.
    """

    temperature: float = 1.0
    """Logits are divided by it before sampling; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability sums to at
    least top_p. 1 keeps everything."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 or -1 turns it off."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's."""
    repetition_penalty: float = 1.0
    """>1 discourages tokens already in the prompt or output: their positive logits are divided by
    it, negative ones multiplied."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token that already occurs in the output."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per occurrence in the output."""
    max_tokens: int = 16
    """Most tokens to generate."""
    min_tokens: int = 0
    """Stop tokens (and stop strings) are ignored until this many tokens were generated."""
    stop: str | tuple[str, ...] = ()
    """Stop strings; generation ends at the first one and the text is cut before it. A single
    string or a list is accepted; it is stored as a tuple."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation besides the tokenizer's eos token."""
    ignore_eos: bool = False
    """Keep generating past the eos token (benchmarks)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    skip_special_tokens: bool = True
    """Leave special tokens (bos, eos, chat markers) out of the text."""
    seed: int | None = None
    """Makes this request's sampling reproducible, whatever else runs in the same batch."""
    logprobs: int | None = None
    """Return the log-probability of each generated token and of this many most likely
    alternatives (0: only the chosen token's); None returns none."""
    prompt_logprobs: bool = False
    """Return the log-probability of every prompt token given the ones before it (scoring,
    perplexity); the first token has none."""

    def __post_init__(self) -> None:
        # Python callers may pass a list (msgspec does not type-check __init__); store tuples so
        # the struct stays hashable and immutable.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        msgspec.structs.force_setattr(self, "stop", stop)
        msgspec.structs.force_setattr(self, "stop_token_ids", tuple(self.stop_token_ids))
        # Comparisons are written `not (lo <= x <= hi)` so that NaN fails them too.
        if not self.temperature >= 0.0:
            _bad("temperature", "must be >= 0 (0 = greedy)", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            _bad("top_p", "must be in (0, 1]", self.top_p)
        if self.top_k < -1:
            _bad("top_k", "must be >= 1, or 0 or -1 to disable it", self.top_k)
        if not 0.0 <= self.min_p <= 1.0:
            _bad("min_p", "must be in [0, 1]", self.min_p)
        if not self.repetition_penalty > 0.0:
            _bad("repetition_penalty", "must be > 0 (1 = off)", self.repetition_penalty)
        if not -2.0 <= self.presence_penalty <= 2.0:
            _bad("presence_penalty", "must be in [-2, 2]", self.presence_penalty)
        if not -2.0 <= self.frequency_penalty <= 2.0:
            _bad("frequency_penalty", "must be in [-2, 2]", self.frequency_penalty)
        if self.max_tokens < 1:
            _bad("max_tokens", "must be >= 1", self.max_tokens)
        if not 0 <= self.min_tokens <= self.max_tokens:
            _bad("min_tokens", f"must be in [0, max_tokens={self.max_tokens}]", self.min_tokens)
        if any(not s for s in stop):
            _bad("stop", "must not contain empty strings", list(stop))
        if any(t < 0 for t in self.stop_token_ids):
            _bad("stop_token_ids", "must be >= 0", list(self.stop_token_ids))
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            _bad("logprobs", f"must be in [0, {MAX_LOGPROBS}] or None", self.logprobs)

    @property
    def greedy(self) -> bool:
        """Whether the argmax is taken instead of sampling (temperature below `GREEDY_EPS`)."""
        return self.temperature < GREEDY_EPS

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplingParams:
        """Build from untrusted input (e.g. a decoded JSON body). Wrong types, unknown fields and
        out-of-range values all raise InvalidRequestError with msgspec's path to the field."""
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise InvalidRequestError(f"invalid sampling parameters: {exc}") from None


def _bad(field: str, rule: str, value: object) -> NoReturn:
    raise InvalidRequestError(f"{field} {rule}, got {value!r}")
