"""The model runner: owns the model, the KV cache and the sampler, and executes step plans.

Under tensor parallelism every rank has a runner over its share of the model and its own KV
cache (its heads' pages). Rank 0's runner is the engine's: it sends each step's plan to the other
ranks (runner/step_messages.py) before running it, and only it samples. The others run `serve`
on the plans they receive (runner/worker.py); the collectives inside the model keep them in step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import transformers

from omniserve.config import EngineConfig, check_kv_cache_dtype, kv_cache_bits
from omniserve.distributed import ParallelGroup
from omniserve.errors import ConfigError
from omniserve.formats.kv import PER_TENSOR, PER_TOKEN_HEAD
from omniserve.formats.page_selection import PageSelection
from omniserve.formats.precision import Precision
from omniserve.formats.weight import weight_format
from omniserve.kernels import dispatch
from omniserve.layers.sampler import Sampler, SampleResult
from omniserve.models.llama import (
    StoredWeightLinear,
    check_shares,
    head_dims,
    kernel_shape,
    layer_windows,
    rank_share,
)
from omniserve.models.loader import load_hf_config, load_model, resolve_precision
from omniserve.runner.decode_graphs import DecodeGraphs
from omniserve.runner.kv_cache import KVCache, KVCacheSpec, StreamPool
from omniserve.runner.memory import cuda_memory_for_kv_cache
from omniserve.runner.selection import selection_from_config
from omniserve.runner.step_inputs import StepInputBuilder, StepInputs, StreamInputs
from omniserve.runner.step_messages import Span, StepMessage, send_step
from omniserve.runner.step_plan import FLAG_NEEDS_LOGITS, StepPlan
from omniserve.runner.streaming import StreamingSetup
from omniserve.sampling_params import SamplingParams


class StepOutput(NamedTuple):
    sampled_idx: torch.Tensor
    """int64 CPU [k]: plan indices of the requests that got a token."""
    sample: SampleResult
    """Their sampled tokens (and logprobs when asked), on the CPU."""
    prompt_scores: list[tuple[int, torch.Tensor]]
    """(plan index, logprobs of the prompt tokens from pos0 + 1) for prompt-logprob requests."""
    failed: dict[int, Exception]
    """Requests whose sampling failed (`Sampler.sample_isolating_failures`), by their index in
    `sampled_idx`; their tokens are placeholders."""


class PendingStep:
    """A launched step whose sampled tokens may still be on their way to the host."""

    def __init__(self, output: StepOutput, copied: torch.cuda.Event | None) -> None:
        self._output = output
        self._copied = copied

    @property
    def prompt_scores(self) -> list[tuple[int, torch.Tensor]]:
        """`StepOutput.prompt_scores`, on the host already (scoring waits for the device)."""
        return self._output.prompt_scores

    def wait(self) -> StepOutput:
        """The step's output, once its device-to-host copies are done."""
        if self._copied is not None:
            self._copied.synchronize()
        return self._output


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_GIB = 1 << 30

logger = logging.getLogger(__name__)


class ModelRunner:
    hf_config: transformers.PretrainedConfig
    device: torch.device
    dtype: torch.dtype
    num_kv_pages: int
    """Dense KV pages, including the null page 0."""
    num_stream_pages: int
    """Streaming KV pages, including the null page 0; 0 without streaming heads."""
    streaming: StreamingSetup | None
    """Which heads stream and what they see; None when every head is dense."""
    max_model_len: int
    vocab_size: int
    precision: Precision | None
    """The served precision: the requested one or the checkpoint's; None for an fp checkpoint
    served without one (w16a16, KV cache per kv_cache_dtype)."""
    kernels: dispatch.KernelChoices
    """Which ops run CUDA kernels and which their torch references, decided once for the model."""
    group: ParallelGroup
    """The ranks of tensor parallelism (one rank alone without it)."""

    def __init__(self, config: EngineConfig, group: ParallelGroup | None = None) -> None:
        self.config = config
        self.group = group or ParallelGroup()
        self.device = resolve_device(config.device, self.group.rank)
        self.dtype = _DTYPES.get(
            config.dtype, torch.bfloat16 if self.device.type == "cuda" else torch.float32
        )
        self.hf_config = load_hf_config(config.model)
        model_limit = self.hf_config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or model_limit, model_limit)
        self.vocab_size = self.hf_config.vocab_size
        self.precision = resolve_precision(
            config.model, config.requested_precision(), dummy=config.load_format == "dummy"
        )
        if self.precision is not None:  # the checkpoint's precision binds kv_cache_dtype too
            check_kv_cache_dtype(config.kv_cache_dtype, self.precision)
        share = rank_share(self.hf_config, self.group)
        if self.precision is not None and self.precision.quantized_weights:
            check_shares(self.hf_config, weight_format(self.precision), self.group)
        shape = kernel_shape(self.hf_config, self.precision, share)
        windows = layer_windows(self.hf_config, self.max_model_len)
        self.streaming = StreamingSetup.from_config(
            config, head_dims(self.hf_config)[1], windows, share.kv_heads
        )
        self.selection = selection_from_config(config, windows, self.max_model_len)
        kv_fp8 = config.kv_cache_dtype == "fp8"
        self.kernels = dispatch.decide(
            device=self.device,
            dtype=self.dtype,
            attention_backend=config.attention_backend,
            shape=dataclasses.replace(shape, streaming=self.streaming is not None),
        )
        for op, reason in self.kernels.summary():
            logger.info("%s: %s", op, reason)
        if fallbacks := self.kernels.fallbacks():
            # Correct but slower (quantized GEMMs run as exact float64 matmuls): say so, once.
            logger.warning(
                "CUDA kernels not used (the torch reference runs instead) for %s",
                "; ".join(f"{op} ({reason})" for op, reason in fallbacks),
            )
        self.model, self._kv_scales = load_model(
            config.model,
            self.hf_config,
            device=self.device,
            dtype=self.dtype,
            max_positions=self.max_model_len,
            kernels=self.kernels,
            precision=self.precision,
            dummy_seed=config.seed if config.load_format == "dummy" else None,
            group=self.group,
        )
        attn = self.model.attention_layers
        if kv_fp8:  # unit scales: vLLM's FP8 cache without calibrated scales (formats/kv.py)
            self._kv_scales = torch.ones(len(attn), 2)
        self._kv_spec = KVCacheSpec(
            num_layers=len(attn),
            page_size=config.page_size,
            num_kv_heads=attn[0].num_kv_heads,
            head_dim=attn[0].head_dim,
            dtype=self.dtype,
            kv_bits=kv_cache_bits(config.kv_cache_dtype, self.precision),
            # A per-tensor KV8 checkpoint (static scales) selects static KV8.
            kv_granularity=PER_TOKEN_HEAD if self._kv_scales is None else PER_TENSOR,
            kv_fp8=kv_fp8,
            stream_heads=() if self.streaming is None else self.streaming.stream_heads,
            stat_tokens=None if self.selection is None else self.selection.logical_tokens,
        )
        self._max_pages_per_seq = math.ceil(self.max_model_len / config.page_size)
        # Most tokens one decode group gathers from the cache (its padded [g, L] block): a few
        # times the step's token budget bounds the per-layer transient (the memory profile runs
        # a full group), while a batch of short contexts still runs as one group.
        self._gather_budget = max(self.max_model_len, 8 * config.max_num_batched_tokens)
        self.sampler = Sampler(config.max_num_seqs, self.vocab_size, self.device, config.seed)
        self._peak_activation_bytes = 0
        self._graph_reserve_bytes = 0
        """Memory set aside for the decode graphs' pool: the largest decode step's activations."""
        self._graphs: DecodeGraphs | None = None
        self._prompt_targets: dict[int, list[int]] = {}
        """Prompt ids of the rows whose requests asked for prompt logprobs."""
        self._prompt_lens = torch.zeros(config.max_num_seqs, dtype=torch.int32)
        """Prompt length of the request bound to each row (streaming heads' window choice)."""
        self.num_kv_pages, self.num_stream_pages = self._count_kv_pages()
        self.kv_cache, self._inputs = self._make_cache(self.num_kv_pages, self.num_stream_pages)
        if self._uses_graphs(self._inputs):
            with torch.inference_mode():
                self._graphs = DecodeGraphs(
                    self.model,
                    self.kv_cache,
                    self._inputs.windows,
                    config.max_num_seqs,
                    self._graph_context_len(),
                    self.selection,
                )

    def bind_row(
        self,
        row: int,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        output_ids: Sequence[int],
        stop_ids: Sequence[int],
    ) -> None:
        self.sampler.bind_row(row, params, prompt_ids, output_ids, stop_ids)
        self._prompt_lens[row] = len(prompt_ids)
        if params.prompt_logprobs:
            self._prompt_targets[row] = list(prompt_ids)
        else:
            self._prompt_targets.pop(row, None)

    def execute(self, plan: StepPlan) -> StepOutput:
        """Run one step and wait for its output (`launch`, then `wait`)."""
        return self.launch(plan).wait()

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> PendingStep:
        """Queue one step on the device: sample for the requests flagged FLAG_NEEDS_LOGITS and
        score the prompt tokens of requests that asked for prompt logprobs. It waits for the
        device only where the host needs values (prompt logprobs), so the host can go on
        planning the next step while the device computes this one; the next step's placeholder
        input ids read the tokens sampled here on the device."""
        spans = self._score_spans(plan)
        self._send(plan, spans, samples=True)
        step, hidden = self._forward(plan, self._inputs)
        logits = self.model.compute_logits(hidden[step.logits_idx])
        rows = plan.rows[step.sampled_idx].long()
        sample, failed = self.sampler.sample_isolating_failures(logits, rows)
        # The other ranks replace the next step's placeholder ids by these tokens too.
        self._inputs.record_sampled(step.sampled_rows, self.group.broadcast(sample.token_ids))
        scores = self._score_prompt_tokens(plan, hidden, spans)
        host = StepOutput(step.sampled_idx, sample.to_host(), scores, failed)
        copied = None
        if self.device.type == "cuda":
            copied = torch.cuda.Event()
            copied.record()
        return PendingStep(host, copied)

    @torch.inference_mode()
    def compute_logits(
        self, plan: StepPlan, inputs: StepInputBuilder | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model over the plan's tokens (writing their KV); returns the plan indices of the
        requests flagged FLAG_NEEDS_LOGITS (int64 CPU [k]) and the fp32 logits [k, vocab] of
        their last scheduled token. `inputs` overrides the step-input builder (and so the cache)
        the step runs against; the start-up memory profile uses it (on every rank at once)."""
        if inputs is None:
            self._send(plan, [], samples=False)
        step, hidden = self._forward(plan, inputs or self._inputs)
        return step.sampled_idx, self.model.compute_logits(hidden[step.logits_idx])

    @torch.inference_mode()
    def serve(self, message: StepMessage) -> None:
        """Run a step rank 0 sent (ranks > 0 of tensor parallelism): the same forward, logits
        and collectives as rank 0's `launch` or `compute_logits`, without sampling."""
        plan, spans, samples = message
        step, hidden = self._forward(plan, self._inputs)
        self.model.compute_logits(hidden[step.logits_idx])
        if samples:
            tokens = torch.empty(len(step.sampled_idx), dtype=torch.int32, device=self.device)
            self._inputs.record_sampled(step.sampled_rows, self.group.broadcast(tokens))
        self._span_logits(hidden, spans)

    def _send(self, plan: StepPlan, spans: list[Span], *, samples: bool) -> None:
        """Rank 0 of tensor parallelism: hand the step to the other ranks before running it."""
        if self.group.world_size > 1:
            send_step(self.group, plan, spans, samples)

    def _forward(self, plan: StepPlan, inputs: StepInputBuilder) -> tuple[StepInputs, torch.Tensor]:
        step = inputs.build(plan)
        if self._graphs is not None and inputs is self._inputs and self._graphs.fits(step):
            return step, self._graphs.run(step)
        return step, self.model(step.input_ids, step.positions, step.attn)

    def _graph_context_len(self) -> int:
        """The most positions a decode query attends, which sizes the graphs' attention launch:
        with page selection its view's bound (and the streaming heads' table), else
        max_model_len."""
        if self.selection is None:
            return self.max_model_len
        bound = self.selection.max_visible(self.max_model_len)
        if self.streaming is not None:
            bound = max(bound, self._stream_table_pages() * self.config.page_size)
        return bound

    def _uses_graphs(self, inputs: StepInputBuilder) -> bool:
        """Decode-only steps replay CUDA graphs where they run on the decode kernel (a CUDA
        device; the torch decode path's grouping depends on the step's lengths), unless
        `enforce_eager`."""
        return inputs.decode_kernel and not self.config.enforce_eager

    def _score_spans(self, plan: StepPlan) -> list[Span]:
        """The step's prompt tokens scored for prompt logprobs: for rows that asked, those whose
        next token is in the prompt.

        The targets come from the prompt bound to the row, so a chunk boundary needs no state
        from the previous step, and a recompute after preemption scores the same positions
        again (the engine writes them by position)."""
        if not self._prompt_targets:
            return []
        spans = []
        for i, row in enumerate(plan.rows.tolist()):
            targets = self._prompt_targets.get(row)
            if targets is None:
                continue
            pos0 = int(plan.pos0[i])
            end = min(pos0 + int(plan.num_new[i]), len(targets) - 1)
            if end > pos0:
                spans.append((i, int(plan.qstart[i]), end - pos0))
        return spans

    def _span_logits(self, hidden: torch.Tensor, spans: list[Span]) -> list[torch.Tensor]:
        """fp32 logits of each span's tokens (one LM head, and its gather, per span)."""
        return [self.model.compute_logits(hidden[start : start + n]) for _, start, n in spans]

    def _score_prompt_tokens(
        self, plan: StepPlan, hidden: torch.Tensor, spans: list[Span]
    ) -> list[tuple[int, torch.Tensor]]:
        """(plan index, fp32 CPU logprobs of prompt tokens pos0+1 .. ) for each span."""
        scores = []
        for (i, _, n), logits in zip(spans, self._span_logits(hidden, spans)):
            pos0 = int(plan.pos0[i])
            targets = self._prompt_targets[int(plan.rows[i])]
            want = torch.tensor(targets[pos0 + 1 : pos0 + 1 + n], device=logits.device)
            logprobs = torch.log_softmax(logits, -1).gather(1, want[:, None]).squeeze(1)
            scores.append((i, logprobs.cpu()))
        return scores

    def memory_report(self) -> dict[str, float]:
        """GiB held by the weights and the KV cache, and the activation peak measured at start-up
        (0 on CPU, where nothing is profiled)."""
        weights = sum(p.nbytes for p in self.model.parameters()) + sum(
            m.quantized_nbytes for m in self.model.modules() if isinstance(m, StoredWeightLinear)
        )
        return {
            "weights": weights / _GIB,
            "kv_cache": self.kv_cache.nbytes / _GIB,
            "peak_activations": self._peak_activation_bytes / _GIB,
        }

    def scheduler_options(self) -> dict[str, int]:
        """The scheduler's streaming-pool options (its pages and table layout); {} without
        streaming heads."""
        if self.streaming is None:
            return {}
        table = self.streaming.table
        return {
            "num_stream_pages": self.num_stream_pages,
            "stream_sink_pages": table.sink_pages,
            "stream_local_pages": table.ring_pages - 1,
        }

    def _make_cache(
        self, num_pages: int, num_stream_pages: int
    ) -> tuple[KVCache, StepInputBuilder]:
        setup = self.streaming
        cache = KVCache(
            self._kv_spec,
            num_pages,
            self.config.max_num_seqs,
            self._max_pages_per_seq,
            self.device,
            self._kv_scales,
            None if setup is None else StreamPool(num_stream_pages, setup.table),
            self._selection_lists(),
        )
        cache.bind(self.model.attention_layers)
        stream = None
        if setup is not None:
            stream = StreamInputs(
                setup.windows,
                setup.table,
                self._prompt_lens,
                "flex" if self.kernels.stream_prefill.kernel else "dense",
            )
        inputs = StepInputBuilder(
            cache,
            frozenset(layer.sliding_window for layer in self.model.attention_layers),
            self.config.max_num_seqs,
            self.config.max_num_batched_tokens,
            self._gather_budget,
            self.device,
            decode_kernel=self.kernels.decode_attention.kernel,
            stream=stream,
            selection=self.selection,
        )
        return cache, inputs

    def _selection_lists(self) -> tuple[PageSelection, int] | None:
        """Page selection and how many heads keep a selected list (KV or query heads)."""
        if self.selection is None:
            return None
        layer = self.model.attention_layers[0]
        return (
            self.selection,
            layer.num_heads if self.selection.per_query_head else layer.num_kv_heads,
        )

    def _count_kv_pages(self) -> tuple[int, int]:
        """(dense pages, streaming pages), both including their null page."""
        config, spec = self.config, self._kv_spec
        table_pages = 0 if self.streaming is None else self._stream_table_pages()
        if config.num_kv_pages is not None and (
            self.streaming is None or config.num_stream_kv_pages is not None
        ):
            num_stream = 0 if self.streaming is None else config.num_stream_kv_pages or 0
            self._check_stream_pages(num_stream, table_pages, "num_stream_kv_pages")
            return config.num_kv_pages, num_stream
        if self.device.type == "cuda":
            self._peak_activation_bytes = self._profile_activations()
            available = cuda_memory_for_kv_cache(
                self.device,
                config.gpu_memory_utilization,
                self._peak_activation_bytes + self._graph_reserve_bytes,
            )
            source = f"gpu_memory_utilization={config.gpu_memory_utilization}"
        else:
            available = int(config.cpu_kv_cache_gib * _GIB)
            source = f"cpu_kv_cache_gib={config.cpu_kv_cache_gib}"
        available = max(available, 0)
        num_stream = 0
        if self.streaming is not None:
            num_stream = config.num_stream_kv_pages or self._default_stream_pages(
                available, table_pages
            )
            num_stream = self._fewest_over_ranks(num_stream)
            self._check_stream_pages(num_stream, table_pages, source)
            available -= num_stream * spec.bytes_per_stream_page
        if config.num_kv_pages is not None:
            return config.num_kv_pages, num_stream
        if spec.bytes_per_page == 0:  # every head streams: dense pages only count positions
            return config.max_num_seqs * self._max_pages_per_seq + 1, num_stream
        num_pages = self._fewest_over_ranks(max(available, 0) // spec.bytes_per_page)
        if num_pages - 1 < self._max_pages_per_seq:  # page 0 holds no tokens
            raise ConfigError(
                f"the KV cache fits {max(num_pages - 1, 0)} pages of {config.page_size} tokens "
                f"({source}), but one sequence of max_model_len={self.max_model_len} needs "
                f"{self._max_pages_per_seq}; raise the memory, lower max_model_len, "
                "max_num_batched_tokens or max_num_seqs, or set num_kv_pages"
            )
        return num_pages, num_stream

    def _fewest_over_ranks(self, pages: int) -> int:
        """The smallest of every rank's page count: each rank's pages hold its own heads, and the
        scheduler's one page id (dense or streaming) names a page on every rank."""
        fits = torch.tensor([-pages], device=self.device)
        return int(-self.group.all_reduce_max(fits))

    def _check_stream_pages(self, num_stream: int, table_pages: int, source: str) -> None:
        if self.streaming is not None and num_stream - 1 < table_pages:
            raise ConfigError(
                f"the streaming pool has {max(num_stream - 1, 0)} pages ({source}), but one "
                f"request's streaming table needs {table_pages}; raise the memory or "
                "num_stream_kv_pages, or lower the streaming windows"
            )

    def _stream_table_pages(self) -> int:
        """Pages of the longest streaming table a request can have."""
        assert self.streaming is not None
        return min(self.streaming.table.width, self._max_pages_per_seq)

    def _default_stream_pages(self, available: int, table_pages: int) -> int:
        """A table for every running request, but never more pages than an all-dense cache of
        the same memory would have: a request's table is never longer than its dense pages, so
        streaming then never lowers how many requests fit, and the memory it saves at long
        contexts goes to the dense pool."""
        spec = self._kv_spec
        all_dense = available // (spec.bytes_per_page + spec.bytes_per_stream_page)
        return min(self.config.max_num_seqs * table_pages, max(all_dense - 1, table_pages)) + 1

    def _profile_activations(self) -> int:
        """Peak bytes above the weights of the most demanding steps the scheduler can plan, run
        against a cache holding only the null page (every slot maps there; values don't matter).
        Also sets `_graph_reserve_bytes` to the decode step's peak when decode graphs will be
        captured: their pool keeps that much while eager steps need their own peak beside it."""
        config, max_len = self.config, self.max_model_len
        cache, inputs = self._make_cache(1, 1)
        # A throwaway sampler, so that the real one's random stream does not depend on profiling.
        sampler = Sampler(config.max_num_seqs, self.vocab_size, self.device, config.seed)
        # Every filter and penalty on: the sampler's largest temporaries and tables.
        params = SamplingParams(temperature=1.0, top_p=0.9, top_k=5, repetition_penalty=1.1)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(self.device)
        # (1) The longest prefill chunk at the end of the longest context: the largest
        # activations and the largest prefill gather. (2) The largest decode batch, sampling every
        # request (the largest logits and sampler temporaries), with as many requests at the
        # longest context as fill one decode group (the largest decode gather; groups run one
        # after the other, so one full group is the peak).
        chunk = min(config.max_num_batched_tokens, max_len)
        num_decodes = min(config.max_num_seqs, config.max_num_batched_tokens)
        num_long = min(num_decodes, max(1, self._gather_budget // max_len))
        decode_pos0 = [max_len - 1] * num_long + [0] * (num_decodes - num_long)
        worst_steps = (([max_len - chunk], [chunk]), (decode_pos0, [1] * num_decodes))
        peaks = []
        for pos0, num_new in worst_steps:
            torch.cuda.reset_peak_memory_stats(self.device)
            for row in range(len(pos0)):
                sampler.bind_row(row, params, [0], [], [])
            plan = _synthetic_plan(pos0, num_new)
            sampled_idx, logits = self.compute_logits(plan, inputs)
            sampler.sample(logits, plan.rows[sampled_idx].long())
            peaks.append(torch.cuda.max_memory_allocated(self.device) - before)
        peak = max(peaks)
        if self._uses_graphs(inputs):
            self._graph_reserve_bytes = peaks[-1]
        del cache, inputs, sampler
        torch.cuda.empty_cache()
        return peak


def _synthetic_plan(pos0: list[int], num_new: list[int]) -> StepPlan:
    """A plan of requests in rows 0..n-1 that all sample, with token id 0 everywhere."""
    n = len(pos0)
    counts = torch.tensor(num_new, dtype=torch.int32)
    qstart = torch.zeros(n + 1, dtype=torch.int32)
    torch.cumsum(counts, 0, out=qstart[1:])
    return StepPlan.of(
        rows=torch.arange(n, dtype=torch.int32),
        pos0=torch.tensor(pos0, dtype=torch.int32),
        num_new=counts,
        qstart=qstart,
        flags=torch.full((n,), FLAG_NEEDS_LOGITS, dtype=torch.int32),
        input_ids=torch.zeros(int(qstart[-1]), dtype=torch.int32),
    )


def resolve_device(name: str, rank: int = 0) -> torch.device:
    """The device of tensor-parallel rank `rank`: the configured one for rank 0, the CUDA devices
    after it for the others."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available")
    device = torch.device(name)
    index = (torch.cuda.current_device() if device.index is None else device.index) + rank
    if index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        need = f"rank {rank} of tensor parallelism needs cuda:{index}, " if rank else ""
        raise ConfigError(f"device={name!r} but {need}only {count} CUDA devices exist")
    return torch.device("cuda", index)
