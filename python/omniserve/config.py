"""Engine configuration: one validated, frozen msgspec Struct per concern.

`EngineConfig.from_kwargs(**kw)` is what `Engine.from_pretrained(path, **kw)` and the CLI use: it
accepts the flat option names users type and reports unknown or invalid ones by name.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from omniserve.errors import ConfigError
from omniserve.quant.kv import KV_CACHE_BITS
from omniserve.quant.precision import PER_CHANNEL, Precision, parse

DType = Literal["auto", "float32", "float16", "bfloat16"]
Policy = Literal["fcfs", "priority"]
KVCacheDType = Literal["auto", "int8", "int4"]


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

    # KV cache
    page_size: int = 64
    """Tokens per physical KV page."""
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
    zero per (token, head) (QServe's fine-grained format, `quant/kv.py`). Quantized pages take
    about 1/2 (int8) or 1/4 (int4) of fp16 pages (plus 4 bytes per token and head), so the same
    memory holds ~2x / ~4x the tokens; attention, prefill included, reads them dequantized to the
    model dtype. "auto" follows the precision (`precision`, else the checkpoint's); an explicit
    value must agree with the precision's KV bits wherever the precision is stated (w16a16 = the
    model dtype), and on an fp checkpoint served without `precision` it chooses freely."""

    attention_backend: Literal["auto", "torch"] = "auto"
    """"auto": decode attention runs the CUDA kernel (`kernels/attention.py`) where it applies (a
    Hopper GPU, head_dim 64/128, 1/2/4/8 query heads per KV head), else the torch path; "torch"
    always uses the torch path (for comparison)."""
    enforce_eager: bool = False
    """Run every step eagerly. By default, on the decode kernel, decode-only steps replay CUDA
    graphs captured at start-up (runner/decode_graphs.py), one per padded batch size up to
    `max_num_seqs`; their memory is reserved out of the KV cache's share."""

    # precision (DESIGN.md §5)
    precision: str | None = None
    """`w4a8kv4`, `w4a8kv8`, `w4a8`, `w8a8kv4`, `w8a8kv8`, `w8a8`, `w16a16kv4`, `w16a16kv8` or
    `w16a16`. None: what the checkpoint says (its quantization_config, else w16a16). A quantized
    checkpoint must hold exactly the requested precision and group size; w4a8/w8a8 need one
    (`omniserve quantize` / `convert`, a QServe-zoo checkpoint), except with `load_format="dummy"`,
    which fills the quantized linears with random weights of the precision's format."""
    group_size: int = PER_CHANNEL
    """-1 (per output channel) or 128 (W4A8 only); only meaningful with `precision`."""

    # scheduling
    max_model_len: int | None = None
    """Longest sequence (prompt + output); None: the checkpoint's max_position_embeddings."""
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_partial_prefills: int = 4
    long_prefill_token_threshold: int = 0
    """Per-request token cap for one prefill chunk; 0: only the step budget limits it."""
    watermark: float = 0.01
    """Fraction of the dense pool kept free at admission so running requests can grow."""
    scheduling_policy: Policy = "fcfs"
    skip_limit: int = 8
    """How many later waiting requests may be admitted past a head that does not fit."""
    hol_age_steps: int = 64
    """Steps after which the head of the queue stops being skipped."""

    def __post_init__(self) -> None:
        positive = {
            "page_size": self.page_size,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_partial_prefills": self.max_partial_prefills,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Every running request decodes one token per step; the budget must cover them all.
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs})"
            )
        if self.page_size % 16:
            raise ConfigError(f"page_size must be a multiple of 16, got {self.page_size}")
        if self.num_kv_pages is not None and self.num_kv_pages < 2:
            raise ConfigError(
                f"num_kv_pages must be >= 2 (page 0 is reserved), got {self.num_kv_pages}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.cpu_kv_cache_gib <= 0:
            raise ConfigError(f"cpu_kv_cache_gib must be > 0, got {self.cpu_kv_cache_gib}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.long_prefill_token_threshold < 0:
            raise ConfigError("long_prefill_token_threshold must be >= 0")
        if not 0.0 <= self.watermark < 1.0:
            raise ConfigError(f"watermark must be in [0, 1), got {self.watermark}")
        if self.skip_limit < 0 or self.hol_age_steps < 0:
            raise ConfigError("skip_limit and hol_age_steps must be >= 0")
        requested = self.requested_precision()  # validates precision and group_size
        if requested is None and self.group_size != PER_CHANNEL:
            raise ConfigError("group_size needs precision (it qualifies a w4a8 precision)")
        if requested is not None:
            check_kv_cache_dtype(self.kv_cache_dtype, requested)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(
                f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
            )

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


def check_kv_cache_dtype(kv_cache_dtype: KVCacheDType, precision: Precision) -> None:
    """ConfigError when an explicit `kv_cache_dtype` contradicts the precision's KV bits."""
    if kv_cache_dtype != "auto" and KV_CACHE_BITS[kv_cache_dtype] != precision.kv_bits:
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
