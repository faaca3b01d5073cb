"""Typed surface of the Rust scheduler core (`rust/scheduler`, built by maturin).

The scheduler owns request lifecycles, the token budget, admission, preemption, both KV page
pools, page tables and the sparse-attention page bookkeeping. It knows pages and tokens, never
tensors. One thread owns a `Scheduler`; other threads reach it only through an `AbortHandle`.

Per-step I/O goes through flat buffers the scheduler allocates once (`buffers()`) and describes
in `STEP_BUFFERS`: each buffer's name, dtype, when it is written (`schedule()`, `update()`, or by
the caller), who reads it, which count sizes its filled part and what it holds. Python makes
typed views of them once (`torch.frombuffer` / `numpy.frombuffer`) and reads the filled parts
after each call; it writes sampled tokens into `sampled` before `update()`. No per-request Python
object crosses the boundary on the hot path. `print(*STEP_BUFFERS, sep="\n")` lists them.

A new or resumed row gets its whole page table as updates; afterwards only pages allocated in
that step are emitted. Columns are page indices within the request (position // page_size).

Besides max_model_len, a sequence is capped at the longest prompt the dense pool admits (the pool
minus the watermark) plus one token, so that a request preempted at any length fits again.
"""

from collections.abc import Sequence
from typing import Any, Literal

FLAG_PREFILL: int  # bit 0: this chunk computes prompt (or recompute) tokens
FLAG_NEEDS_LOGITS: int  # bit 1: the chunk ends at the last known token: sample one
FLAG_RESELECT: int  # bit 2: refresh the sparse page selection (first decode after a prefill chunk, then every selector_interval)
FLAG_NEW_ROW: int  # bit 3: the row was (re)assigned this step: reset per-row state

FINISH_NONE: int  # 0
FINISH_STOP: int  # 1: a stop token (eos or stop_token_ids) after min_tokens
FINISH_LENGTH: int  # 2: max_tokens, max_model_len or the dense pool's sequence limit reached
FINISH_REASONS: dict[int, str]  # every code but FINISH_NONE -> "stop" / "length"

class BufferSpec:
    """One step buffer. Its filled part is `count * width + extra` elements, `count` naming a
    `StepCounts` field (`num_outputs`: what `update()` returns)."""

    name: str
    dtype: Literal["int32", "int64"]
    phase: Literal["schedule", "update", "input"]
    reader: Literal["runner", "engine"]
    count: str
    width: int
    extra: int
    doc: str
    def capacity(self, config: SchedulerConfig) -> int:
        """Elements the buffer holds under `config`."""

STEP_BUFFERS: tuple[BufferSpec, ...]

class OmniserveError(Exception):
    """Base of every error the project raises."""

class ConfigError(OmniserveError, ValueError):
    """An engine, model, scheduler or CLI option is invalid; the message names the option."""

class InvalidRequestError(OmniserveError, ValueError):
    """The request is malformed: duplicate id, empty prompt, bad limits."""

class RequestRejectedError(OmniserveError):
    """The request can never be served: its prompt exceeds the model or the KV cache."""

class SchedulerInternalError(OmniserveError):
    """An invariant broke inside the scheduler (a bug); the scheduler should be discarded."""

class SchedulerConfig:
    """Validated, frozen. `num_dense_pages` and `max_model_len` are sizes the engine derives;
    every other field is an option with a default (`DEFAULTS`). Page 0 of each pool is the null
    page, so `num_dense_pages` counts it. `long_prefill_token_threshold` 0 means no per-request
    cap below the budget. The streaming pool is on when `num_stream_pages > 0`: each running
    request then owns `stream_sink_pages + stream_local_pages + 1` pages of it.
    `enable_prefix_caching` (a bool, on by default) needs the streaming pool off.
    `async_scheduling` (a bool, off by default) lets `schedule()` plan a step while the previous
    one awaits `update()`; a decode whose input that step is still sampling then has the input id
    `-(row + 1)`."""

    FIELDS: tuple[str, ...]
    DEFAULTS: dict[str, Any]  # each value has its field's type
    num_dense_pages: int
    max_model_len: int
    page_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_partial_prefills: int
    long_prefill_token_threshold: int
    watermark: float
    skip_limit: int
    hol_age_steps: int
    scheduling_policy: Literal["fcfs", "priority"]
    num_stream_pages: int
    stream_sink_pages: int
    stream_local_pages: int
    logical_pages_per_page: int
    selector_interval: int
    enable_prefix_caching: bool
    async_scheduling: bool
    def __init__(
        self, *, num_dense_pages: int, max_model_len: int, **options: bool | int | float | str
    ) -> None:
        """Raises ConfigError (a ValueError) for an unknown option, a value of the wrong type,
        or nonsense, including max_num_batched_tokens < max_num_seqs (every running request's
        decode token must fit in one step)."""
    @staticmethod
    def check(**fields: bool | int | float | str) -> None:
        """Validate the given fields as `__init__` would (options not given at their defaults,
        sizes not given at 2); raises ConfigError."""

class StepCounts:
    """What `schedule()` returns; the filled length of each schedule buffer is one of these.
    Update counts are triples."""

    FIELDS: tuple[str, ...]
    num_reqs: int
    num_tokens: int
    num_page_updates: int
    num_stream_updates: int
    num_aborted: int
    num_preempted: int
    def __init__(self, **counts: int) -> None:
        """Counts of a hand-made step; fields not named are 0."""

class AbortHandle:
    """Thread-safe; clones share one queue. Aborts are applied at the next `schedule()`."""
    def abort(self, req_id: int) -> None:
        """Idempotent; unknown or finished ids are ignored when applied."""

class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None: ...
    @property
    def config(self) -> SchedulerConfig: ...
    def buffers(self) -> dict[str, bytearray]:
        """The step buffers described in the module docstring; the same objects every call."""
    def abort_handle(self) -> AbortHandle: ...
    def add_request(
        self,
        req_id: int,
        prompt: Sequence[int],
        *,
        max_tokens: int,
        min_tokens: int = 0,
        stop_token_ids: Sequence[int] = (),
        priority: int = 0,
        cache_prefix: bool = True,
    ) -> None:
        """Queue a request. Raises InvalidRequestError for a duplicate id, an empty prompt, a
        negative token id, max_tokens < 1, a negative min_tokens or min_tokens > max_tokens;
        RequestRejectedError when the prompt can never fit (longer than
        max_model_len - 1 or than the dense pool minus the watermark, or the streaming pool is
        smaller than one table). Lower `priority` values run first under scheduling_policy "priority".
        With the prefix cache on, the request starts after the cached full pages its tokens begin
        with and publishes the pages it fills, unless `cache_prefix` is False (a request that
        needs every prompt token's logits)."""
    def schedule(self) -> StepCounts:
        """Apply pending aborts, then plan one step into the buffers. A step with num_reqs > 0
        must be followed by update(); calling schedule() again first raises OmniserveError
        (with async_scheduling, once two such steps await update())."""
    def update(self) -> int:
        """Consume `sampled` for the oldest step awaiting it (indexed by that step's schedule
        order; requests it planned that have ended since get nothing): append tokens for requests flagged
        FLAG_NEEDS_LOGITS, check stop tokens / max_tokens / max_model_len, free finished
        requests. Returns how many `out_*` entries were written (one per sampled token); 0 when no
        step is pending."""
    def finish(self, req_id: int) -> bool:
        """Finish a request now (e.g. a stop string matched) and free its pages; False if
        unknown. Owner thread only."""
    def has_unfinished(self) -> bool: ...
    def num_unfinished(self) -> int: ...
    def stats(self) -> dict[str, int]:
        """Keys: running, waiting, dense_pages_used, dense_pages_total, stream_pages_used,
        stream_pages_total, num_preemptions, num_steps, num_finished, prefix_cache_queries,
        prefix_cache_hits (prompt tokens of admissions that could use the cache, and those it
        held), prefix_cache_pages (pages it holds, in use or free). Page totals exclude the null
        page; num_finished counts requests ended by update() or finish(), not aborts."""
    def check_invariants(self) -> None:
        """Raises SchedulerInternalError naming the first broken invariant."""
