"""Engine configuration: one validated, frozen msgspec Struct per concern.

`EngineConfig.from_kwargs(**kw)` is what `Engine.from_pretrained(path, **kw)` and the CLI use: it
accepts the flat option names users type and reports unknown or invalid ones by name.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from omniserve._scheduler import SchedulerConfig
from omniserve.errors import ConfigError
from omniserve.formats.kv import KV_CACHE_BITS
from omniserve.formats.precision import PER_CHANNEL, Precision, parse

_SCHEDULER_DEFAULTS = SchedulerConfig.DEFAULTS

DType = Literal["auto", "float32", "float16", "bfloat16"]
Policy = Literal["fcfs", "priority"]
KVCacheDType = Literal["auto", "int8", "int4", "fp8"]


class EngineConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything the engine needs besides the checkpoint's own config.json."""

    model: str
    """Directory with config.json, safetensors weights and tokenizer files."""
    tokenizer: str | None = None
    """Tokenizer directory when it differs from `model`."""
    skip_tokenizer_init: bool = False
    """Run on token ids only (outputs carry no text); for checkpoints without tokenizer files."""
    load_format: Literal["auto", "dummy"] = "auto"
    """"dummy" builds the model from config.json with random weights (benchmarks, tests)."""
    dtype: DType = "auto"
    """Activation/weight dtype; "auto" is bfloat16 on GPU and float32 on CPU."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu", "cuda" or "cuda:N"."""
    seed: int = 0
    """Seed for requests without their own seed and for random-weight models."""
    tensor_parallel_size: int = 1
    """Ranks the model is split over (Megatron-style tensor parallelism): the engine process is
    rank 0 and starts the others as worker processes, one device each (cuda:i after the first;
    on the CPU, gloo processes). Attention heads, MLP channels and the vocabulary are split; the
    scheduler and the sampler stay on rank 0."""

    # KV cache
    page_size: int = _SCHEDULER_DEFAULTS["page_size"]
    """Tokens per physical KV page (a multiple of 16)."""
    num_kv_pages: int | None = None
    """Dense KV pages (including the null page 0). None: profile memory on GPU; on CPU size the
    cache from `cpu_kv_cache_gib`."""
    gpu_memory_utilization: float = 0.90
    """Fraction of total GPU memory the engine may hold (weights + activations + KV cache)."""
    cpu_kv_cache_gib: float = 1.0
    """KV cache size on CPU when `num_kv_pages` is None."""
    kv_cache_dtype: KVCacheDType = "auto"
    """How the KV cache stores keys and values: "auto" in the model dtype; "int8" (KV8) or "int4"
    (KV4, two values per byte) quantized per token and KV head, asymmetric, with an fp16 scale and
    zero per (token, head) (QServe's fine-grained format, `formats/kv.py`). Quantized pages take
    about 1/2 (int8) or 1/4 (int4) of fp16 pages (plus 4 bytes per token and head), so the same
    memory holds ~2x / ~4x the tokens; attention, prefill included, reads them dequantized to the
    model dtype. "auto" follows the precision (`precision`, else the checkpoint's); an explicit
    value must agree with the precision's KV bits wherever the precision is stated (w16a16 = the
    model dtype), and on an fp checkpoint served without `precision` it chooses freely."""

    attention_backend: Literal["auto", "torch"] = "auto"
    """"auto": decode attention runs the CUDA kernel (`kernels/attention.py`) where it applies (a
    Hopper GPU, head_dim 64/128, 1/2/4/8 query heads per KV head), and so does the fused RoPE + KV
    write (`kernels/rope_kv.py`; head_dim 64/128/256), else the torch path; "torch" always uses
    the torch path for both (for comparison). The runner logs each op's choice."""
    enforce_eager: bool = False
    """Run every step eagerly. By default, on the decode kernel, decode-only steps replay CUDA
    graphs captured at start-up (runner/decode_graphs.py), one per padded batch size up to
    `max_num_seqs`; their memory is reserved out of the KV cache's share."""

    # static sparsity: streaming heads (docs/architecture.md#sparse-attention)
    static_sparsity: float = 0.0
    """Fraction of all KV heads (one global quantile over layers and heads of the pattern's
    gates) that become streaming heads, which attend only to their sink and local tokens; 0 keeps
    every head dense. Needs a head pattern (`attn_pattern`)."""
    attn_pattern: str | None = None
    """Directory of a DuoAttention-format head pattern (`full_attention_heads.tsv` + config.json,
    `formats/head_pattern.py`; `omniserve calibrate-heads` makes one). None: the model
    directory's `attn_pattern/` (the bundled model ships one)."""
    prefill_sink_tokens: int = 128
    """Streaming heads' sink in prefill (the prompt's queries), rounded up to whole pages."""
    prefill_local_tokens: int = 8192
    """Streaming heads' local window in prefill, rounded up to whole pages; a query also sees the
    rest of its own page."""
    decode_sink_tokens: int = 128
    """Streaming heads' sink in decode, rounded up to whole pages."""
    decode_local_tokens: int = 256
    """Streaming heads' local window in decode, rounded up to whole pages."""
    num_stream_kv_pages: int | None = None
    """Streaming pool pages (including the null page 0). None: a table for every running request
    (`max_num_seqs`), but never more pages than a dense cache of the same memory would have, so
    that streaming never lowers how many requests fit; the dense pool gets the rest."""

    # dynamic sparsity: query-aware page selection at decode (docs/architecture.md#sparse-attention)
    sparse_decode: bool = False
    """Decode queries of dense heads attend only the pages whose keys may matter to them (an upper
    bound of q.k from per-page key statistics), `token_budget` tokens per request; a request
    whose context fits the budget attends all of it."""
    token_budget: int = 4096
    """Tokens a selected request's dense heads attend at decode, its newest page included;
    rounded up to whole pages, at least two."""
    page_selection: Literal["kv_head", "query_head"] = "kv_head"
    """Who selects: each KV head for the query heads of its GQA group together (every page is
    read once per group), or each query head on its own."""
    selector_interval: int = _SCHEDULER_DEFAULTS["selector_interval"]
    """Decode steps a selection is reused for (the first decode step after a prefill chunk
    always selects)."""
    logical_pages_per_page: int = _SCHEDULER_DEFAULTS["logical_pages_per_page"]
    """Logical pages per page: the key statistics' granularity (page_size / this tokens)."""

    # precision (docs/architecture.md#precisions-and-formats)
    precision: str | None = None
    """`w4a8kv4`, `w4a8kv8`, `w4a8`, `w8a8kv4`, `w8a8kv8`, `w8a8`, `w16a16kv4`, `w16a16kv8` or
    `w16a16`. None: what the checkpoint says (its quantization_config, else w16a16). A quantized
    checkpoint must hold exactly the requested precision and group size; w4a8/w8a8 need one
    (`omniserve quantize` / `convert`, a QServe-zoo checkpoint), except with `load_format="dummy"`,
    which fills the quantized linears with random weights of the precision's format."""
    group_size: int = PER_CHANNEL
    """-1 (per output channel) or 128 (W4A8 only); only meaningful with `precision`."""

    # scheduling: these fields, and `page_size`, are the Rust scheduler's options of the same
    # name, which own their defaults and checks; `scheduler_options()` hands them over.
    max_model_len: int | None = None
    """Longest sequence (prompt + output); None: the checkpoint's max_position_embeddings."""
    max_num_seqs: int = _SCHEDULER_DEFAULTS["max_num_seqs"]
    """Requests running at once (rows of the persistent batch)."""
    max_num_batched_tokens: int = _SCHEDULER_DEFAULTS["max_num_batched_tokens"]
    """Token budget of one step; at least `max_num_seqs`."""
    max_partial_prefills: int = _SCHEDULER_DEFAULTS["max_partial_prefills"]
    """Prefills that may be in progress (split over steps) at once."""
    long_prefill_token_threshold: int = _SCHEDULER_DEFAULTS["long_prefill_token_threshold"]
    """Per-request token cap for one prefill chunk; 0: only the step budget limits it."""
    watermark: float = _SCHEDULER_DEFAULTS["watermark"]
    """Fraction of the dense pool kept free at admission so running requests can grow."""
    scheduling_policy: Policy = _SCHEDULER_DEFAULTS["scheduling_policy"]
    """"fcfs", or "priority": lower `priority` values are admitted first and preempted last."""
    skip_limit: int = _SCHEDULER_DEFAULTS["skip_limit"]
    """How many later waiting requests may be admitted past a head that does not fit."""
    hol_age_steps: int = _SCHEDULER_DEFAULTS["hol_age_steps"]
    """Steps after which the head of the queue stops being skipped."""
    enable_prefix_caching: bool | None = None
    """Share the KV pages of identical prompt prefixes between requests: a request starts after
    the full pages whose tokens (and everything before them) another request computed, and pages
    stay cached after their requests end until the pool needs them (least recently used first).
    None: on, unless streaming heads are (their KV lives in per-request tables); True with
    streaming heads is an error."""
    async_scheduling: bool | None = None
    """Plan and launch step n+1 before step n's tokens are back on the host, so that the host's
    work (scheduling, inputs, outputs, detokenizing) hides behind the device's. A request that
    ends on a token (stop token or string) has then already been planned one more step, whose
    token is dropped; outputs are the same. None: on when the model runs on a CUDA device."""

    def __post_init__(self) -> None:
        sizes = {"num_dense_pages": self.num_kv_pages, "max_model_len": self.max_model_len}
        given = {name: value for name, value in sizes.items() if value is not None}
        SchedulerConfig.check(**self.scheduler_options(), **given)
        if self.page_size % 16:
            raise ConfigError(f"page_size must be a multiple of 16, got {self.page_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.cpu_kv_cache_gib <= 0:
            raise ConfigError(f"cpu_kv_cache_gib must be > 0, got {self.cpu_kv_cache_gib}")
        requested = self.requested_precision()  # validates precision and group_size
        if requested is None and self.group_size != PER_CHANNEL:
            raise ConfigError("group_size needs precision (it qualifies a w4a8 precision)")
        if requested is not None:
            check_kv_cache_dtype(self.kv_cache_dtype, requested)
        if not 0.0 <= self.static_sparsity <= 1.0:
            raise ConfigError(f"static_sparsity must be in [0, 1], got {self.static_sparsity}")
        windows = ("prefill_sink_tokens", "prefill_local_tokens", "decode_sink_tokens")
        for name in (*windows, "decode_local_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.sparse_decode and -(-self.token_budget // self.page_size) < 2:
            raise ConfigError(
                f"token_budget must cover at least two pages of {self.page_size} tokens, got "
                f"{self.token_budget}"
            )
        if self.enable_prefix_caching and self.static_sparsity > 0:
            raise ConfigError(
                "enable_prefix_caching needs static_sparsity 0: streaming heads keep their KV in "
                "per-request tables, which requests cannot share"
            )
        if self.num_stream_kv_pages is not None and self.num_stream_kv_pages < 2:
            raise ConfigError(f"num_stream_kv_pages must be >= 2, got {self.num_stream_kv_pages}")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(
                f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
            )

    def scheduler_options(self) -> dict[str, Any]:
        """The fields that are scheduler options and are set, by name."""
        options = {name: getattr(self, name) for name in SCHEDULER_OPTIONS}
        return {name: value for name, value in options.items() if value is not None}

    def requested_precision(self) -> Precision | None:
        """The parsed `precision` option (ConfigError naming the valid choices), None if unset."""
        return None if self.precision is None else parse(self.precision, self.group_size)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> EngineConfig:
        """Build from flat keyword options, turning msgspec's errors into ConfigError."""
        try:
            return msgspec.convert({"model": model, **kwargs}, cls)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"invalid engine option: {exc}") from None


SCHEDULER_OPTIONS: tuple[str, ...] = tuple(
    name for name in _SCHEDULER_DEFAULTS if name in EngineConfig.__struct_fields__
)
"""The scheduler options an engine user sets; the others stay at the scheduler's defaults."""


def check_kv_cache_dtype(kv_cache_dtype: KVCacheDType, precision: Precision) -> None:
    """ConfigError when an explicit `kv_cache_dtype` contradicts the precision's KV bits ("fp8"
    takes the place of a model-dtype cache only)."""
    if kv_cache_dtype == "auto":
        return
    fits = (
        precision.kv_bits is None
        if kv_cache_dtype == "fp8"
        else KV_CACHE_BITS[kv_cache_dtype] == precision.kv_bits
    )
    if not fits:
        kv = "the model dtype" if precision.kv_bits is None else f"int{precision.kv_bits}"
        raise ConfigError(
            f"kv_cache_dtype={kv_cache_dtype!r} contradicts precision {precision.name}, whose KV "
            f"cache is {kv}; leave kv_cache_dtype 'auto' or choose a precision with that KV mode"
        )


def kv_cache_bits(kv_cache_dtype: KVCacheDType, precision: Precision | None) -> int | None:
    """Bits of the KV cache (None: model dtype): an explicit kv_cache_dtype, else the precision's."""
    if kv_cache_dtype != "auto":
        return KV_CACHE_BITS[kv_cache_dtype]
    return None if precision is None else precision.kv_bits
