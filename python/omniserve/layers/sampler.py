"""Batched next-token sampling with persistent per-row state, on any torch device.

The runner owns one `Sampler` with a row per scheduler row (`max_num_seqs`). A request's options
are bound to its row once, when the request gets the row (`bind_row`, also after a preemption);
each step `sample` takes the logits of the rows that need a token and returns their tokens.

Per step, for each row (vLLM's order and meanings):

1. raw logprobs: log_softmax of the model's logits, if the row asked for logprobs;
2. penalties: repetition over prompt + output tokens, presence and frequency over output tokens;
3. min_tokens: the row's stop ids get -inf until it has generated `min_tokens` tokens;
4. greedy rows take the argmax here;
5. temperature, then top-k, top-p, min-p as -inf masks, then one draw from the softmax.

Per-row options live in host (numpy) arrays: each step gathers the batch's rows there, decides on
the host which stages any row needs (no device sync to find out) and sends the batch's values to
the device in small copies. Every stage is vectorised over the batch; a row whose options turn a
stage off gets neutral values (top_k = V, top_p = 1, min_p = 0) that leave its distribution
bit-for-bit unchanged, so a row's token never depends on which other rows share the batch.

Randomness is one uniform number per row and step, turned into a token by inverse-CDF sampling.
Unseeded rows draw it from the sampler's own generator; a seeded row's number is a hash of
(seed, index of the output token), so it needs no generator state at all: the same request gives
the same tokens whatever it is batched with, after a preemption (its row is re-bound with the
outputs so far, which restores the index), and on CPU and GPU alike up to float rounding.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

if TYPE_CHECKING:
    from omniserve.sampling_params import SamplingParams

# Columns of the per-row option table `Sampler._params`. It travels to the device as float32,
# which holds every top_k exactly (vocabularies are far below 2^24 tokens).
_TEMP, _TOP_K, _TOP_P, _MIN_P, _REP, _PRES, _FREQ = range(7)
_NUM_COLS = 7
_MASK64 = (1 << 64) - 1

logger = logging.getLogger(__name__)


class SampleResult(NamedTuple):
    """Tokens of one `Sampler.sample` call, in the order of its `rows`, on the sampler's device
    (`to_host` brings them over)."""

    token_ids: torch.Tensor
    """int32 [k]: the sampled tokens."""
    logprobs: torch.Tensor | None = None
    """float32 [k]: log_softmax of the raw logits at the sampled token (before penalties,
    temperature and filters); present when any row of the call asked for logprobs."""
    top_ids: torch.Tensor | None = None
    """int32 [k, n]: the n most likely tokens under the raw logits, most likely first, where n is
    the largest `logprobs` asked for in the call; a row that asked for fewer uses a prefix."""
    top_logprobs: torch.Tensor | None = None
    """float32 [k, n]: their raw logprobs."""

    def to_host(self) -> SampleResult:
        """The result on the CPU. From CUDA the copies go to pinned memory without waiting: the
        caller synchronises (an event recorded after this call) before reading them."""
        token_ids, *rest = self
        return SampleResult(
            _host_copy(token_ids), *(None if t is None else _host_copy(t) for t in rest)
        )


class Sampler:
    """Samples one token per row from a batch of logits; see the module docstring.

    Penalty bookkeeping: rows that use a penalty get a *slot* in two device tables, a prompt
    bitmap `[P, V]` (bool) and output token counts `[P, V]` (int32), updated in place with the
    step's tokens. Rows without penalties hold no slot and no V-sized state; the tables grow
    (doubling, at most `max_num_seqs` slots) only as penalty rows appear. The alternative, a
    bincount of each row's whole history every step, would move O(generated tokens) to the device
    per step; the tables cost O(k) per step to update, and reading them costs the same O(k·V) as
    applying the penalties does anyway.
    """

    def __init__(self, max_num_seqs: int, vocab_size: int, device: torch.device, seed: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._rng = np.random.Generator(np.random.Philox(seed & _MASK64))
        neutral = np.zeros(_NUM_COLS)
        neutral[[_TEMP, _TOP_K, _TOP_P, _REP]] = (1.0, vocab_size, 1.0, 1.0)
        self._params = np.tile(neutral, (max_num_seqs, 1))
        self._greedy = np.ones(max_num_seqs, dtype=bool)
        self._num_out = np.zeros(max_num_seqs, dtype=np.int64)
        self._min_tokens = np.zeros(max_num_seqs, dtype=np.int64)
        self._seeded = np.zeros(max_num_seqs, dtype=bool)
        self._seed = np.zeros(max_num_seqs, dtype=np.uint64)
        self._num_logprobs = np.full(max_num_seqs, -1, dtype=np.int64)
        # Stop ids masked during min_tokens: row r has `_num_stop[r]` ids, padded to the table's
        # width with its own first id, so that one scatter of -inf can cover all rows at once.
        self._stop = np.zeros((max_num_seqs, 1), dtype=np.int64)
        self._num_stop = np.zeros(max_num_seqs, dtype=np.int64)
        self._slot = np.full(max_num_seqs, -1, dtype=np.int64)
        self._free_slots: list[int] = []
        self._prompt_seen = torch.zeros((0, vocab_size), dtype=torch.bool, device=self.device)
        self._out_counts = torch.zeros((0, vocab_size), dtype=torch.int32, device=self.device)

    def bind_row(
        self,
        row: int,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        output_ids: Sequence[int],
        stop_ids: Sequence[int],
    ) -> None:
        """Give `row` to a request, replacing whatever the row held before.

        Called when a request is admitted and again when it resumes after a preemption, with the
        tokens it generated so far in `output_ids`: penalties and min_tokens then count them, and a
        seeded request continues its random sequence where it stopped. `stop_ids` are the ids
        masked while fewer than `params.min_tokens` tokens exist (eos + stop_token_ids, without
        eos under ignore_eos).
        """
        vocab = self.vocab_size
        stops = _checked_ids(stop_ids, vocab, "stop_ids")
        greedy = params.greedy
        top_k = params.top_k if 0 < params.top_k < vocab else vocab
        row_params = self._params[row]
        # Greedy rows keep neutral filter values so that they never switch a filter on for the
        # batch; penalties apply to them (before the argmax) as to every row.
        row_params[_TEMP] = 1.0 if greedy else params.temperature
        row_params[_TOP_K] = vocab if greedy else top_k
        row_params[_TOP_P] = 1.0 if greedy else params.top_p
        row_params[_MIN_P] = 0.0 if greedy else params.min_p
        row_params[_REP] = params.repetition_penalty
        row_params[_PRES] = params.presence_penalty
        row_params[_FREQ] = params.frequency_penalty
        self._greedy[row] = greedy
        self._num_out[row] = len(output_ids)
        self._min_tokens[row] = params.min_tokens
        self._seeded[row] = params.seed is not None
        self._seed[row] = (params.seed or 0) & _MASK64
        self._num_logprobs[row] = -1 if params.logprobs is None else params.logprobs
        self._set_stop_ids(row, np.unique(stops))
        uses_penalties = (
            params.repetition_penalty != 1.0
            or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0
        )
        if uses_penalties:
            self._bind_penalty_slot(row, prompt_ids, output_ids)
        else:
            self.release_row(row)

    def release_row(self, row: int) -> None:
        """Free the row's penalty slot, if it has one (call when its request finishes)."""
        slot = int(self._slot[row])
        if slot >= 0:
            self._free_slots.append(slot)
            self._slot[row] = -1

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: torch.Tensor) -> SampleResult:
        """Sample one token for each of `rows` (distinct, bound rows) from `logits` [k, V] (any
        float dtype, on the sampler's device), and count the tokens as the rows' next outputs."""
        rows_np = rows.cpu().numpy().astype(np.int64, copy=False)
        if logits.shape != (len(rows_np), self.vocab_size):
            raise ValueError(
                f"logits must be [{len(rows_np)}, {self.vocab_size}] for {len(rows_np)} rows, "
                f"got {list(logits.shape)}"
            )
        x = logits.to(torch.float32, copy=True)
        num_logprobs = int(self._num_logprobs[rows_np].max(initial=-1))
        raw_logprobs = torch.log_softmax(x, dim=-1) if num_logprobs >= 0 else None
        params = self._params[rows_np]
        greedy = self._greedy[rows_np]
        slots = self._slot[rows_np]
        pen_pos = np.flatnonzero(slots >= 0)
        if pen_pos.size:
            pen_idx = self._to_device(pen_pos)
            pen_slots = self._to_device(slots[pen_pos])
            self._apply_penalties(x, params[pen_pos], pen_idx, pen_slots)
        self._mask_stop_ids(x, rows_np)
        if greedy.all():
            tokens = x.argmax(dim=-1)
        else:
            tokens = self._sample_random(x, rows_np, params, greedy)

        self._num_out[rows_np] += 1
        if pen_pos.size:
            ones = torch.ones(pen_pos.size, dtype=torch.int32, device=self.device)
            self._out_counts.index_put_((pen_slots, tokens[pen_idx]), ones, accumulate=True)

        token_ids = tokens.to(torch.int32)
        if raw_logprobs is None:
            return SampleResult(token_ids)
        chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
        top = raw_logprobs.topk(num_logprobs, dim=-1)
        return SampleResult(token_ids, chosen, top.indices.to(torch.int32), top.values)

    def sample_isolating_failures(
        self, logits: torch.Tensor, rows: torch.Tensor
    ) -> tuple[SampleResult, dict[int, Exception]]:
        """`sample`, but an error confined to some rows fails only those: when the batch raises,
        each row is sampled alone. Returns the result (token 0 and NaN logprobs for a failed row)
        and the error of each failed row, by its index in `rows`. `sample` changes a row's state
        only once its token exists, so a retried row is sampled as if for the first time."""
        try:
            return self.sample(logits, rows), {}
        except Exception:
            logger.exception("sampling %d rows failed; sampling each row alone", len(rows))
        results: list[SampleResult | None] = []
        failed: dict[int, Exception] = {}
        for i in range(len(rows)):
            try:
                results.append(self.sample(logits[i : i + 1], rows[i : i + 1]))
            except Exception as exc:
                results.append(None)
                failed[i] = exc
        return _merge(results), failed

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        """`a` on the sampler's device without waiting for it: a blocking copy from pageable
        memory synchronises the stream, which would make the host wait for the step in flight
        (async scheduling) every time a row samples, filters or penalises. The pinned staging
        buffer is kept by torch's host allocator until the copy is done."""
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _set_stop_ids(self, row: int, stops: np.ndarray) -> None:
        if stops.size > self._stop.shape[1]:
            wider = np.repeat(self._stop[:, :1], stops.size, axis=1)
            wider[:, : self._stop.shape[1]] = self._stop
            self._stop = wider
        self._stop[row] = stops[0] if stops.size else 0
        self._stop[row, : stops.size] = stops
        self._num_stop[row] = stops.size

    def _bind_penalty_slot(
        self, row: int, prompt_ids: Sequence[int], output_ids: Sequence[int]
    ) -> None:
        prompt = _checked_ids(prompt_ids, self.vocab_size, "prompt_ids")
        outputs = _checked_ids(output_ids, self.vocab_size, "output_ids")
        slot = int(self._slot[row])
        if slot < 0:
            slot = self._acquire_slot()
            self._slot[row] = slot
        seen = self._prompt_seen[slot]
        seen.zero_()
        seen.index_put_((self._to_device(prompt),), seen.new_ones(()))  # no host value: no wait
        self._out_counts[slot].copy_(
            self._to_device(np.bincount(outputs, minlength=self.vocab_size))
        )

    def _acquire_slot(self) -> int:
        if not self._free_slots:
            # The caller's row holds no slot, so fewer than max_num_seqs are in use: room exists.
            old = self._prompt_seen.shape[0]
            new = min(max(2 * old, 4), self.max_num_seqs)
            self._prompt_seen = _grow_rows(self._prompt_seen, new)
            self._out_counts = _grow_rows(self._out_counts, new)
            self._free_slots.extend(range(new - 1, old - 1, -1))
        return self._free_slots.pop()

    def _apply_penalties(
        self, x: torch.Tensor, params: np.ndarray, idx: torch.Tensor, slots: torch.Tensor
    ) -> None:
        """Penalise rows `idx` of `x` in place; `params` and `slots` are those rows'."""
        counts = self._out_counts[slots]
        in_output = counts > 0
        seen = self._prompt_seen[slots] | in_output
        p = self._to_device(params[:, [_REP, _PRES, _FREQ]].astype(np.float32))
        rep, pres, freq = p[:, 0, None], p[:, 1, None], p[:, 2, None]
        z = x[idx]
        # Repetition (CTRL, as HF/vLLM): for tokens seen in prompt or output,
        #   z' = z / r if z > 0 else z * r   (r > 1 makes them less likely either way).
        z = torch.where(seen, torch.where(z > 0, z / rep, z * rep), z)
        # OpenAI: z' = z - frequency * count(output) - presence * [count(output) > 0].
        z -= freq * counts + pres * in_output
        x[idx] = z

    def _mask_stop_ids(self, x: torch.Tensor, rows_np: np.ndarray) -> None:
        active = (self._num_out[rows_np] < self._min_tokens[rows_np]) & (
            self._num_stop[rows_np] > 0
        )
        pos = np.flatnonzero(active)
        if pos.size:
            ids = self._to_device(self._stop[rows_np[pos]])
            # A device value: assigning the Python float copies it from pageable memory, a wait.
            x.index_put_((self._to_device(pos)[:, None], ids), x.new_full((), float("-inf")))

    def _sample_random(
        self,
        x: torch.Tensor,
        rows_np: np.ndarray,
        params_np: np.ndarray,
        greedy: np.ndarray,
    ) -> torch.Tensor:
        """Temperature, filters and one draw per row; greedy rows get the argmax of `x` as it
        comes in (penalised, unscaled)."""
        vocab = self.vocab_size
        argmax = x.argmax(dim=-1) if greedy.any() else None
        params = self._to_device(params_np.astype(np.float32))
        x.div_(params[:, _TEMP, None])
        top_k = params_np[:, _TOP_K]
        uses_top_k = top_k < vocab
        if (params_np[:, _TOP_P] < 1.0).any():
            _top_k_top_p(x, params[:, _TOP_K].long(), params[:, _TOP_P], bool(uses_top_k.any()))
        elif uses_top_k.any():
            _top_k(x, params[:, _TOP_K].long(), int(top_k[uses_top_k].max()))
        if (params_np[:, _MIN_P] > 0.0).any():
            # p_i >= min_p * p_max  <=>  z_i >= z_max + log(min_p); log(0) = -inf keeps all.
            floor = x.amax(dim=-1, keepdim=True) + params[:, _MIN_P, None].log()
            x.masked_fill_(x < floor, float("-inf"))

        u = self._rng.random(len(rows_np))
        seeded = self._seeded[rows_np]
        if seeded.any():
            seeded_rows = rows_np[seeded]
            u[seeded] = _counter_uniforms(self._seed[seeded_rows], self._num_out[seeded_rows])
        # Inverse CDF: the token is the first i with cdf_i > u * cdf_V. The float64 cdf keeps the
        # resolution of u (2^-53) so even tiny probabilities are sampled at their rate; masked
        # tokens (p = 0) never start a new cdf step, so they can never be chosen. The target is
        # kept strictly below the total so that a token always exists.
        cdf = x.softmax(dim=-1).cumsum(dim=-1, dtype=torch.float64)
        total = cdf[:, -1:]
        target = torch.minimum(
            self._to_device(u)[:, None] * total,
            torch.nextafter(total, torch.zeros_like(total)),
        )
        # The clamp only matters for NaN logits (a broken model), which searchsorted maps past V.
        tokens = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=vocab - 1)
        if argmax is None:
            return tokens
        return torch.where(self._to_device(greedy), argmax, tokens)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


def _merge(results: Sequence[SampleResult | None]) -> SampleResult:
    """One result (on the CPU) of single-row results; a missing row (None) gets token 0 and
    NaN/-inf logprobs, and rows with fewer top logprobs than the widest are padded as a prefix
    is read."""
    k = len(results)
    token_ids = torch.zeros(k, dtype=torch.int32)
    for i, r in enumerate(results):
        if r is not None:
            token_ids[i] = r.token_ids[0]
    scored = [(i, r) for i, r in enumerate(results) if r is not None and r.top_ids is not None]
    if not scored:
        return SampleResult(token_ids)
    n = max(len(r.top_ids[0]) for _, r in scored)  # type: ignore[index]
    logprobs = torch.full((k,), math.nan)
    top_ids = torch.zeros((k, n), dtype=torch.int32)
    top_logprobs = torch.full((k, n), -math.inf)
    for i, r in scored:
        assert r.logprobs is not None and r.top_ids is not None and r.top_logprobs is not None
        width = r.top_ids.shape[1]
        logprobs[i] = r.logprobs[0]
        top_ids[i, :width] = r.top_ids[0]
        top_logprobs[i, :width] = r.top_logprobs[0]
    return SampleResult(token_ids, logprobs, top_ids, top_logprobs)


def _top_k(x: torch.Tensor, k: torch.Tensor, k_max: int) -> None:
    """Keep each row's k largest logits (k = V: all), with ties of the k-th kept too; `topk` of
    the batch's largest k is much cheaper than a full sort when no row needs top-p."""
    kth = x.topk(k_max, dim=-1).values.gather(1, k.clamp(max=k_max)[:, None] - 1)
    kth = torch.where(k[:, None] < x.shape[1], kth, float("-inf"))
    x.masked_fill_(x < kth, float("-inf"))


def _top_k_top_p(x: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor, uses_top_k: bool) -> None:
    """Top-k then top-p with one ascending sort, as vLLM does: top-p renormalises over the top-k
    survivors. Token i (ascending order) is dropped when the mass of it and all less likely
    tokens is <= 1 - top_p, which keeps the smallest set whose mass is >= top_p; the most likely
    token always survives. For top_p = 1 this drops only tokens whose probability is exactly 0."""
    ascending, order = x.sort(dim=-1)
    if uses_top_k:
        kth = ascending.gather(1, x.shape[1] - k[:, None])
        ascending.masked_fill_(ascending < kth, float("-inf"))
    mass_below = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = mass_below <= 1.0 - top_p[:, None]
    drop[:, -1] = False
    ascending.masked_fill_(drop, float("-inf"))
    x.scatter_(1, order, ascending)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele et al. 2014): a bijective 64-bit mixer whose
    outputs for consecutive inputs pass BigCrush; uint64 arithmetic wraps, as intended."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _counter_uniforms(seeds: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """u = top 53 bits of splitmix64(splitmix64(seed) + counter) / 2^53, in [0, 1): a
    counter-based stream per seed, so any output index can be drawn without replaying the ones
    before it. Hashing the seed first keeps the streams of nearby seeds apart."""
    with np.errstate(over="ignore"):
        bits = _splitmix64(_splitmix64(seeds) + counters.astype(np.uint64))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _checked_ids(ids: Sequence[int], vocab_size: int, what: str) -> np.ndarray:
    """Token ids as int64, refusing ids outside the vocabulary: on CUDA they would become a
    device-side assert that takes every other request down with this one."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if arr.size and not (arr.min() >= 0 and arr.max() < vocab_size):
        raise ValueError(
            f"{what} must be token ids in [0, {vocab_size}), got {arr.min()}..{arr.max()}"
        )
    return arr


def _grow_rows(table: torch.Tensor, rows: int) -> torch.Tensor:
    extra = table.new_zeros((rows - table.shape[0], table.shape[1]))
    return torch.cat([table, extra])
