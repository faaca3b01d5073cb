"""Typed surface of the Rust scheduler core (`rust/scheduler`, built by maturin).

The scheduler owns request lifecycles, the token budget, admission, preemption, both KV page
pools, page tables and the sparse-attention page bookkeeping. It knows pages and tokens, never
tensors. One thread owns a `Scheduler`; other threads reach it only through an `AbortHandle`.

Per-step I/O goes through flat buffers the scheduler allocates once (`buffers()`): Python makes
typed views of them once (`torch.frombuffer` / `numpy.frombuffer`) and reads them after each
`schedule()`; it writes sampled tokens into `sampled` before `update()`. No per-request Python
object crosses the boundary on the hot path.

Buffers (name: dtype [capacity]); S = max_num_seqs, B = max_num_batched_tokens:
    req_ids:        int64 [S]    request id of each scheduled request, in schedule order
    rows:           int32 [S]    persistent batch row in [0, S), stable while the request runs
    pos0:           int32 [S]    tokens already in the KV cache (= first position this step)
    num_new:        int32 [S]    tokens computed this step
    qstart:         int32 [S+1]  prefix sums of num_new (cu_seqlens_q)
    flags:          int32 [S]    bit set of FLAG_* below
    n_sel_pages:    int32 [S]    complete logical pages after this step (selectable for top-k)
    input_ids:      int32 [B]    token ids of every scheduled token, in schedule order
    page_updates:   int32 [3*num_dense_pages]   (row, column, page) triples for the dense table
    stream_updates: int32 [3*max(num_stream_pages,1)]  (row, column, page) for the streaming table
    aborted_ids:    int64 [S]    requests aborted at this step boundary (their pages are free);
                                 at most S aborts are applied per step, the rest on the next
    preempted_ids:  int64 [S]    requests preempted this step (back to waiting, pages free)
    sampled:        int32 [S]    written by Python: the token sampled for schedule index i
    out_req_ids:    int64 [S]    update(): request that received a token
    out_tokens:     int32 [S]    update(): the token appended
    out_sched_idx:  int32 [S]    update(): schedule index i the token came from
    out_finish:     int32 [S]    update(): FINISH_* code (FINISH_NONE while still running)

A new or resumed row gets its whole page table as updates; afterwards only pages allocated in
that step are emitted. Columns are page indices within the request (position // page_size).

Besides max_model_len, a sequence is capped at the longest prompt the dense pool admits (the pool
minus the watermark) plus one token, so that a request preempted at any length fits again.
"""

from collections.abc import Sequence
from typing import Literal

FLAG_PREFILL: int  # bit 0: this chunk computes prompt (or recompute) tokens
FLAG_NEEDS_LOGITS: int  # bit 1: the chunk ends at the last known token: sample one
FLAG_RESELECT: int  # bit 2: refresh the sparse page selection for this request
FLAG_NEW_ROW: int  # bit 3: the row was (re)assigned this step: reset per-row state

FINISH_NONE: int  # 0
FINISH_STOP: int  # 1: a stop token (eos or stop_token_ids) after min_tokens
FINISH_LENGTH: int  # 2: max_tokens, max_model_len or the dense pool's sequence limit reached

class OmniserveError(Exception):
    """Base of every error the project raises."""

class InvalidRequestError(OmniserveError, ValueError):
    """The request is malformed: duplicate id, empty prompt, bad limits."""

class RequestRejectedError(OmniserveError):
    """The request can never be served: its prompt exceeds the model or the KV cache."""

class SchedulerInternalError(OmniserveError):
    """An invariant broke inside the scheduler (a bug); the scheduler should be discarded."""

class SchedulerConfig:
    page_size: int
    num_dense_pages: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    max_partial_prefills: int
    long_prefill_token_threshold: int
    watermark: float
    skip_limit: int
    hol_age_steps: int
    policy: Literal["fcfs", "priority"]
    num_stream_pages: int
    stream_sink_pages: int
    stream_local_pages: int
    logical_pages_per_page: int
    select_interval: int
    def __init__(
        self,
        *,
        num_dense_pages: int,
        max_model_len: int,
        page_size: int = 64,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        max_partial_prefills: int = 4,
        long_prefill_token_threshold: int = 0,
        watermark: float = 0.01,
        skip_limit: int = 8,
        hol_age_steps: int = 64,
        policy: Literal["fcfs", "priority"] = "fcfs",
        num_stream_pages: int = 0,
        stream_sink_pages: int = 0,
        stream_local_pages: int = 0,
        logical_pages_per_page: int = 4,
        select_interval: int = 4,
    ) -> None:
        """Validate and freeze a configuration; raises InvalidRequestError (a ValueError) on
        nonsense, including max_num_batched_tokens < max_num_seqs (every running request's decode
        token must fit in one step). Page 0 of each pool is the null page, so `num_dense_pages`
        counts it.
        `long_prefill_token_threshold` 0 means no per-request cap below the budget. The streaming
        pool is on when `num_stream_pages > 0`: each running request then owns
        `stream_sink_pages + stream_local_pages + 1` pages of it."""

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
    ) -> None:
        """Queue a request. Raises InvalidRequestError for a duplicate id, an empty prompt, a
        negative token id, max_tokens < 1, a negative min_tokens or min_tokens > max_tokens;
        RequestRejectedError when the prompt can never fit (longer than
        max_model_len - 1 or than the dense pool minus the watermark, or the streaming pool is
        smaller than one table). Lower `priority` values run first under policy "priority"."""
    def schedule(self) -> tuple[int, int, int, int, int, int]:
        """Apply pending aborts, then plan one step into the buffers. Returns
        (num_reqs, num_tokens, num_page_updates, num_stream_updates, num_aborted, num_preempted);
        update counts are triples. A step with num_reqs > 0 must be followed by update(); calling
        schedule() again first raises OmniserveError."""
    def update(self) -> int:
        """Consume `sampled` for the last schedule: append tokens for requests flagged
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
        stream_pages_total, num_preemptions, num_steps, num_finished. Page totals exclude the null
        page; num_finished counts requests ended by update() or finish(), not aborts."""
    def check_invariants(self) -> None:
        """Raises SchedulerInternalError naming the first broken invariant."""
