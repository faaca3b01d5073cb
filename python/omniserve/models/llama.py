"""One decoder for the Llama family: Llama-2/3/3.1, Mistral, Qwen2 and Yi.

The members differ only in what config.json says: RoPE scaling, biases, tied embeddings, sliding
windows and head_dim. Module and parameter names follow HF's `*ForCausalLM`, so checkpoints load by
name; q/k/v and gate/up are fused into one matmul each, filled slice by slice at load time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from omniserve.formats.activation import QuantizedActivation
from omniserve.formats.precision import Precision
from omniserve.formats.weight import Fp8Weight, StoredWeight, weight_format
from omniserve.kernels.dispatch import KernelChoices, ModelShape
from omniserve.kernels.fused import ActivationOps
from omniserve.layers.activation import SiluAndMul
from omniserve.layers.attention import AttentionMetadata, PagedAttention
from omniserve.layers.fp8_linear import Fp8Linear
from omniserve.layers.linear import Linear
from omniserve.layers.norm import RMSNorm
from omniserve.layers.quantized_linear import QuantizedLinear
from omniserve.layers.rotary import RotaryEmbedding

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MODEL_TYPES = ("llama", "mistral", "qwen2")
"""Yi checkpoints are `llama` with LlamaForCausalLM."""


def rope_parameters(config: PretrainedConfig) -> dict[str, Any]:
    """RoPE settings as one flat dict (rope_type, rope_theta, the type's keys).

    transformers 5 stores them in `rope_parameters`; 4.x in `rope_theta` + `rope_scaling`, whose
    type key was once `type`.
    """
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = {
            **(getattr(config, "rope_scaling", None) or {}),
            "rope_theta": getattr(config, "rope_theta", 10000.0),
        }
    params = dict(params)
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def sliding_windows(config: PretrainedConfig) -> list[int | None]:
    """Per-layer sliding window (None: full attention), as HF's modeling code applies it."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral":
        return [window] * n  # every layer; HF's Mistral ignores layer_types
    if config.model_type == "qwen2":
        types = getattr(config, "layer_types", None)
        if types is None:  # transformers 4.x: the rule Qwen2Config now turns into layer_types
            sliding = getattr(config, "use_sliding_window", False) and window is not None
            first = getattr(config, "max_window_layers", n)
            types = [
                "sliding_attention" if sliding and i >= first else "full_attention"
                for i in range(n)
            ]
        return [window if t == "sliding_attention" else None for t in types]
    return [None] * n


def layer_windows(config: PretrainedConfig, max_positions: int) -> list[int | None]:
    """Each layer's sliding window as served: a window no shorter than the longest sequence cuts
    nothing, so it is full attention (None)."""
    return [w if w is not None and w < max_positions else None for w in sliding_windows(config)]


WeightFormat = type[StoredWeight] | None
"""The stored format of the decoder's projections, None for fp weights (`Linear`); `Fp8Weight`
makes them `Fp8Linear`, the integer formats `QuantizedLinear`."""

StoredWeightLinear = QuantizedLinear | Fp8Linear
"""A projection whose weights are a stored format (formats/weight.py), which the loader places
slice by slice (`quantized_slots`, `set_weight`) rather than as parameters."""

ProjectionShape = tuple[tuple[int, ...], int]
"""(output sizes of a projection's shards, in_features)."""


def head_dims(config: PretrainedConfig) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of every attention layer."""
    num_heads = config.num_attention_heads
    num_kv_heads = config.num_key_value_heads or num_heads
    return (
        num_heads,
        num_kv_heads,
        getattr(config, "head_dim", None) or config.hidden_size // num_heads,
    )


def projection_shapes(config: PretrainedConfig) -> dict[str, ProjectionShape]:
    """Every decoder layer's projections, by module name: what they are built with and what their
    GEMM kernel choice is made for."""
    hidden, inter = config.hidden_size, config.intermediate_size
    num_heads, num_kv_heads, head_dim = head_dims(config)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    return {
        "qkv_proj": ((q_size, kv_size, kv_size), hidden),
        "o_proj": ((hidden,), q_size),
        "gate_up_proj": ((inter, inter), hidden),
        "down_proj": ((hidden,), inter),
    }


def kernel_shape(config: PretrainedConfig, precision: Precision | None) -> ModelShape:
    """What the model's kernel choices depend on (kernels/dispatch.py `decide`): its attention
    shape, and its projections where `precision` quantizes the weights to integers (FP8 ones run
    cuBLAS at any shape)."""
    quantized = precision is not None and precision.quantized_weights
    fp8 = quantized and precision is not None and precision.float8
    return ModelShape(
        *head_dims(config),
        projections=projection_shapes(config) if quantized and not fp8 else {},
        fp8=fp8,
    )


def _projection(
    name: str,
    config: PretrainedConfig,
    bias: bool,
    fmt: WeightFormat,
    kernels: KernelChoices,
    shard_names: tuple[str, ...] | None = None,
) -> Linear | QuantizedLinear | Fp8Linear:
    out_sizes, in_features = projection_shapes(config)[name]
    if fmt is None:
        return Linear(in_features, out_sizes, bias, shard_names)
    if issubclass(fmt, Fp8Weight):
        kernel = kernels.fp8_gemm is not None and kernels.fp8_gemm.kernel
        return Fp8Linear(in_features, out_sizes, bias, shard_names, kernel=kernel)
    return QuantizedLinear(
        in_features,
        out_sizes,
        fmt,
        bias,
        shard_names,
        kernel=kernels.gemm[name].kernel,
        quantize=kernels.activation_ops().quantize_per_token,
    )


ProjectionInput = torch.Tensor | QuantizedActivation
"""What a decoder projection reads: float activations, or per-token int8 (`QuantizedLinear`)."""


class ProjectionInputOps(NamedTuple):
    """The ops whose outputs the decoder's projections read."""

    norm: Callable[[torch.Tensor, RMSNorm], ProjectionInput]
    """x, norm → the normalized residual stream, before the first layer's qkv_proj."""
    add_norm: Callable[[torch.Tensor, torch.Tensor, RMSNorm], tuple[torch.Tensor, ProjectionInput]]
    """x, delta, norm → (x + delta, the normalized sum): a residual add and the norm after it,
    before every other qkv_proj and every gate_up_proj."""
    act: Callable[[torch.Tensor], ProjectionInput]
    """silu(gate)·up of gate_up_proj's output, before down_proj."""


def projection_input_ops(fmt: WeightFormat, quantized: ActivationOps) -> ProjectionInputOps:
    """Quantized projections read per-token int8, so the ops before them emit it: RMSNorm (with
    the residual add before it) and SiLU·mul fused with the quantizer (`quantized`: the kernels
    of kernels/fused.py or their references, as chosen for the model), one launch each where the
    float ops take several and the projection's quantizer one more. Their references are exactly
    that composition, so outputs do not change. o_proj reads the attention output, which stays
    float. Fp weights and FP8 ones (`Fp8Linear` quantizes its own input) read float."""
    if fmt is None or fmt is Fp8Weight:
        return ProjectionInputOps(norm=_rmsnorm, add_norm=_add_rmsnorm, act=SiluAndMul())

    def norm(x: torch.Tensor, n: RMSNorm) -> QuantizedActivation:
        return quantized.rmsnorm_quant(x, n.weight, n.eps)

    def add_norm(
        x: torch.Tensor, delta: torch.Tensor, n: RMSNorm
    ) -> tuple[torch.Tensor, QuantizedActivation]:
        return quantized.add_rmsnorm_quant(x, delta, n.weight, n.eps)

    return ProjectionInputOps(norm=norm, add_norm=add_norm, act=quantized.silu_mul_quant)


def _rmsnorm(x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    return norm(x)


def _add_rmsnorm(
    x: torch.Tensor, delta: torch.Tensor, norm: RMSNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    residual = x + delta
    return residual, norm(residual)


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        sliding_window: int | None,
        fmt: WeightFormat,
        kernels: KernelChoices,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = head_dims(config)
        self.qkv_sizes = list(projection_shapes(config)["qkv_proj"][0])
        # Qwen2 puts biases on q/k/v only; Llama's attention_bias covers o_proj too.
        if config.model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = _projection(
            "qkv_proj", config, qkv_bias, fmt, kernels, ("q_proj", "k_proj", "v_proj")
        )
        self.o_proj = _projection("o_proj", config, o_bias, fmt, kernels)
        self.attn = PagedAttention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            sliding_window,
            fused_rope_kv=kernels.rope_kv.kernel,
        )

    def forward(
        self, x: ProjectionInput, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k, v = (t.view(-1, self.num_kv_heads, self.head_dim) for t in (k, v))
        o = self.attn.rotate_and_attend(q, k, v, rope, meta)  # RoPE here, with the KV write
        return self.o_proj(o.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, fmt: WeightFormat, kernels: KernelChoices) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only 'silu')")
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = _projection(
            "gate_up_proj", config, bias, fmt, kernels, ("gate_proj", "up_proj")
        )
        self.act = projection_input_ops(fmt, kernels.activation_ops()).act
        self.down_proj = _projection("down_proj", config, bias, fmt, kernels)

    def forward(self, x: ProjectionInput) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        sliding_window: int | None,
        fmt: WeightFormat,
        kernels: KernelChoices,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, sliding_window, fmt, kernels)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, fmt, kernels)
        ops = projection_input_ops(fmt, kernels.activation_ops())
        self.normalize, self.add_normalize = ops.norm, ops.add_norm

    def forward(
        self,
        residual: torch.Tensor,
        delta: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer on the residual stream `residual + delta` (delta: the previous layer's MLP
        output, None for the first layer). Each residual add is left to the norm after it, so that
        the quantized path fuses the two: returns the stream after attention and this layer's MLP
        output, which the next layer's input norm (or the model's final norm) adds."""
        if delta is None:
            h = self.normalize(residual, self.input_layernorm)
        else:
            residual, h = self.add_normalize(residual, delta, self.input_layernorm)
        attn_out = self.self_attn(h, rope, meta)
        residual, h = self.add_normalize(residual, attn_out, self.post_attention_layernorm)
        return residual, self.mlp(h)


class LlamaModel(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        max_positions: int,
        fmt: WeightFormat,
        kernels: KernelChoices,
    ) -> None:
        super().__init__()
        # `_weight` skips nn.Embedding's random init: the loader fills the table.
        table = torch.empty(config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=table)
        windows = layer_windows(config, max_positions)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, w, fmt, kernels) for w in windows)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # nn.ModuleList is untyped: its items are the LlamaDecoderLayers built above.
        head_dim = cast(LlamaDecoderLayer, self.layers[0]).self_attn.head_dim
        self.rotary = RotaryEmbedding(head_dim, max_positions, rope_parameters(config))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        rope = self.rotary(positions)  # once per step, shared by every layer
        residual, delta = self.embed_tokens(input_ids), None
        for layer in self.layers:
            residual, delta = layer(residual, delta, rope, meta)
        assert delta is not None  # a model has layers
        return self.norm(residual + delta)  # the last layer's MLP add, then the float norm


class LlamaForCausalLM(nn.Module):
    """Built under the loader's default device and dtype, with uninitialised parameters.

    `precision` with quantized weights makes every decoder projection a `QuantizedLinear` of its
    format (an `Fp8Linear` for fp8); embeddings, norms and lm_head stay in the model dtype, as in QServe. `kernels`: which
    ops run CUDA kernels (kernels/dispatch.py, decided for `kernel_shape(config, precision)`)."""

    def __init__(
        self,
        config: PretrainedConfig,
        max_positions: int,
        precision: Precision | None,
        kernels: KernelChoices,
    ) -> None:
        super().__init__()
        self.config = config
        fmt = (
            weight_format(precision)
            if precision is not None and precision.quantized_weights
            else None
        )
        self.model = LlamaModel(config, max_positions, fmt, kernels)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = (
            None if self.tie_word_embeddings else Linear(config.hidden_size, [config.vocab_size])
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] of the step's tokens."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [k, vocab] of the given final hidden states (computed in the model dtype,
        as HF does)."""
        if self.lm_head is None:
            return F.linear(hidden, self.model.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    @property
    def attention_layers(self) -> list[PagedAttention]:
        # nn.ModuleList is untyped: its items are LlamaDecoderLayers.
        return [cast(LlamaDecoderLayer, layer).self_attn.attn for layer in self.model.layers]

    def skips_checkpoint_tensor(self, name: str) -> bool:
        """Checkpoint tensors that may be present but are not read: RoPE tables some old
        checkpoints store, and lm_head.weight when it is tied to the embeddings."""
        return name.endswith("rotary_emb.inv_freq") or (
            self.tie_word_embeddings and name == "lm_head.weight"
        )
