"""One decoder for the Llama family: Llama-2/3/3.1, Mistral, Qwen2 and Yi.

The members differ only in what config.json says: RoPE scaling, biases, tied embeddings, sliding
windows and head_dim. Module and parameter names follow HF's `*ForCausalLM`, so checkpoints load by
name; q/k/v and gate/up are fused into one matmul each, filled slice by slice at load time.

Under tensor parallelism each rank builds the decoder with its share (`RankShare`, Megatron-style):
column-parallel q/k/v (its query heads and their KV heads) and gate/up (its MLP channels),
row-parallel o_proj and down_proj (one all-reduce each), a vocabulary-parallel embedding (one
all-reduce) and LM head (one all-gather of the logits). The residual stream, the norms and RoPE
are whole on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from omniserve.distributed import ParallelGroup
from omniserve.errors import ConfigError
from omniserve.formats.activation import QuantizedActivation, quantize_per_token_across
from omniserve.formats.precision import Precision
from omniserve.formats.weight import Fp8Weight, StoredWeight, weight_format
from omniserve.kernels.dispatch import KernelChoices, ModelShape
from omniserve.kernels.fused import ActivationOps
from omniserve.layers.activation import SiluAndMul
from omniserve.layers.attention import AttentionMetadata, PagedAttention
from omniserve.layers.embedding import VocabParallelEmbedding
from omniserve.layers.fp8_linear import Fp8Linear
from omniserve.layers.linear import Linear, ParallelSplit, Part
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


@dataclass(frozen=True)
class RankShare:
    """What one rank of `group` holds of the decoder: query heads [first_head, + num_heads),
    KV heads [first_kv_head, + num_kv_heads) (those its query heads read: a KV head is on every
    rank whose query heads use it when there are fewer KV heads than ranks), MLP channels
    [first_channel, + intermediate) and `vocab` rows of the vocabulary from rank · vocab (the
    vocabulary padded to a multiple of the ranks). One rank alone holds everything."""

    group: ParallelGroup
    num_heads: int
    first_head: int
    num_kv_heads: int
    first_kv_head: int
    head_dim: int
    intermediate: int
    first_channel: int
    vocab: int

    @property
    def parallel(self) -> bool:
        return self.group.world_size > 1

    @property
    def kv_heads(self) -> range:
        """The model's KV heads this rank holds."""
        return range(self.first_kv_head, self.first_kv_head + self.num_kv_heads)

    def split(self, name: str, config: PretrainedConfig) -> ParallelSplit | None:
        """How projection `name` is split over the ranks; None for one rank."""
        if not self.parallel:
            return None
        num_heads, num_kv_heads, head_dim = head_dims(config)
        q = Part(0, self.first_head * head_dim, self.num_heads * head_dim, num_heads * head_dim)
        kv = Part(
            0, self.first_kv_head * head_dim, self.num_kv_heads * head_dim, num_kv_heads * head_dim
        )
        inter = config.intermediate_size
        mlp = Part(0, self.first_channel, self.intermediate, inter)
        if name == "qkv_proj":
            return ParallelSplit(self.group, rows=(q, kv, kv))
        if name == "gate_up_proj":
            return ParallelSplit(self.group, rows=(mlp, mlp))
        if name == "o_proj":
            return ParallelSplit(self.group, columns=Part(1, q.start, q.size, q.full))
        if name == "down_proj":
            return ParallelSplit(self.group, columns=Part(1, mlp.start, mlp.size, mlp.full))
        raise KeyError(name)

    def vocab_part(self, vocab_size: int) -> Part:
        """The embedding's and the LM head's rows on this rank."""
        return Part(0, self.group.rank * self.vocab, self.vocab, vocab_size)


def rank_share(config: PretrainedConfig, group: ParallelGroup | None = None) -> RankShare:
    """This rank's share of the decoder (everything for one rank); ConfigError naming the model
    sizes that do not split over `group.world_size` ranks."""
    group = group or ParallelGroup()
    n, rank = group.world_size, group.rank
    num_heads, num_kv_heads, head_dim = head_dims(config)
    inter = config.intermediate_size
    if num_heads % n or inter % n or (num_kv_heads % n and n % num_kv_heads):
        raise ConfigError(
            f"tensor_parallel_size={n} must divide the model's {num_heads} attention heads and "
            f"{inter} MLP channels, and divide or be a multiple of its {num_kv_heads} KV heads"
        )
    heads = num_heads // n
    kv_heads = max(num_kv_heads // n, 1)
    # With fewer KV heads than ranks, the one KV head a rank's query heads read.
    first_kv = rank * kv_heads if num_kv_heads >= n else rank * num_kv_heads // n
    return RankShare(
        group=group,
        num_heads=heads,
        first_head=rank * heads,
        num_kv_heads=kv_heads,
        first_kv_head=first_kv,
        head_dim=head_dim,
        intermediate=inter // n,
        first_channel=rank * inter // n,
        vocab=-(-config.vocab_size // n),
    )


def projection_shapes(
    config: PretrainedConfig, share: RankShare | None = None
) -> dict[str, ProjectionShape]:
    """Every decoder layer's projections, by module name: what they are built with and what their
    GEMM kernel choice is made for; on one rank of tensor parallelism (`share`) its parts."""
    share = share or rank_share(config)
    hidden, inter = config.hidden_size, share.intermediate
    q_size, kv_size = share.num_heads * share.head_dim, share.num_kv_heads * share.head_dim
    return {
        "qkv_proj": ((q_size, kv_size, kv_size), hidden),
        "o_proj": ((hidden,), q_size),
        "gate_up_proj": ((inter, inter), hidden),
        "down_proj": ((hidden,), inter),
    }


def check_shares(config: PretrainedConfig, fmt: WeightFormat, group: ParallelGroup) -> None:
    """ConfigError unless every rank's projections fit the weight format's layout: under tensor
    parallelism a shard must hold whole tiles along N and whole tiles or groups along K."""
    if fmt is None or group.world_size == 1:
        return
    for name, (out_sizes, k) in projection_shapes(config, rank_share(config, group)).items():
        for n in out_sizes:
            try:
                fmt.check_shape(n, k)
            except ValueError as exc:
                raise ConfigError(
                    f"tensor_parallel_size={group.world_size}: {name}'s shard [{n}, {k}] does "
                    f"not split the {fmt.__name__} layout ({exc})"
                ) from None


def kernel_shape(
    config: PretrainedConfig, precision: Precision | None, share: RankShare | None = None
) -> ModelShape:
    """What the model's kernel choices depend on (kernels/dispatch.py `decide`): its attention
    shape, and its projections where `precision` quantizes the weights to integers (FP8 ones run
    cuBLAS at any shape); one rank's (`share`) under tensor parallelism."""
    share = share or rank_share(config)
    quantized = precision is not None and precision.quantized_weights
    fp8 = quantized and precision is not None and precision.float8
    return ModelShape(
        share.num_heads,
        share.num_kv_heads,
        share.head_dim,
        projections=projection_shapes(config, share) if quantized and not fp8 else {},
        fp8=fp8,
    )


def _projection(
    name: str,
    config: PretrainedConfig,
    bias: bool,
    fmt: WeightFormat,
    kernels: KernelChoices,
    share: RankShare,
    shard_names: tuple[str, ...] | None = None,
) -> Linear | QuantizedLinear | Fp8Linear:
    out_sizes, in_features = projection_shapes(config, share)[name]
    split = share.split(name, config)
    if fmt is None:
        return Linear(in_features, out_sizes, bias, shard_names, split)
    if issubclass(fmt, Fp8Weight):
        kernel = kernels.fp8_gemm is not None and kernels.fp8_gemm.kernel
        return Fp8Linear(in_features, out_sizes, bias, shard_names, kernel=kernel, split=split)
    quantize = kernels.activation_ops().quantize_per_token
    if split is not None and split.row_parallel:
        group = share.group

        def quantize(x: torch.Tensor) -> QuantizedActivation:
            return quantize_per_token_across(x, group.all_reduce_max)

    return QuantizedLinear(
        in_features,
        out_sizes,
        fmt,
        bias,
        shard_names,
        kernel=kernels.gemm[name].kernel,
        quantize=quantize,
        split=split,
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
        share: RankShare,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = share.num_heads, share.num_kv_heads
        self.head_dim = share.head_dim
        self.qkv_sizes = list(projection_shapes(config, share)["qkv_proj"][0])
        # Qwen2 puts biases on q/k/v only; Llama's attention_bias covers o_proj too.
        if config.model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = _projection(
            "qkv_proj", config, qkv_bias, fmt, kernels, share, ("q_proj", "k_proj", "v_proj")
        )
        self.o_proj = _projection("o_proj", config, o_bias, fmt, kernels, share)
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
    def __init__(
        self,
        config: PretrainedConfig,
        fmt: WeightFormat,
        kernels: KernelChoices,
        share: RankShare,
    ) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only 'silu')")
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = _projection(
            "gate_up_proj", config, bias, fmt, kernels, share, ("gate_proj", "up_proj")
        )
        # Split over ranks, down_proj's input is quantized by the scale of the whole row, which
        # the fused SiLU·mul quantizer cannot see: it then gets the float product.
        self.act: Callable[[torch.Tensor], ProjectionInput] = (
            SiluAndMul()
            if share.parallel
            else projection_input_ops(fmt, kernels.activation_ops()).act
        )
        self.down_proj = _projection("down_proj", config, bias, fmt, kernels, share)

    def forward(self, x: ProjectionInput) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        sliding_window: int | None,
        fmt: WeightFormat,
        kernels: KernelChoices,
        share: RankShare,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, sliding_window, fmt, kernels, share)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, fmt, kernels, share)
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
        share: RankShare,
    ) -> None:
        super().__init__()
        self.embed_tokens: nn.Embedding | VocabParallelEmbedding
        if share.parallel:
            self.embed_tokens = VocabParallelEmbedding(
                share.vocab_part(config.vocab_size), config.hidden_size, share.group
            )
        else:
            # `_weight` skips nn.Embedding's random init: the loader fills the table.
            table = torch.empty(config.vocab_size, config.hidden_size)
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=table)
        windows = layer_windows(config, max_positions)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, w, fmt, kernels, share) for w in windows
        )
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
    ops run CUDA kernels (kernels/dispatch.py, decided for `kernel_shape(config, precision)`).
    `group`: the ranks of tensor parallelism, of which this one builds its share (`RankShare`);
    None: one rank."""

    def __init__(
        self,
        config: PretrainedConfig,
        max_positions: int,
        precision: Precision | None,
        kernels: KernelChoices,
        group: ParallelGroup | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        fmt = (
            weight_format(precision)
            if precision is not None and precision.quantized_weights
            else None
        )
        self.share = rank_share(config, group)
        self.model = LlamaModel(config, max_positions, fmt, kernels, self.share)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None
        if not self.tie_word_embeddings:
            vocab = self.share.vocab_part(config.vocab_size)
            split = ParallelSplit(self.share.group, rows=(vocab,)) if self.share.parallel else None
            self.lm_head = Linear(config.hidden_size, [vocab.size], split=split)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] of the step's tokens."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [k, vocab] of the given final hidden states (computed in the model dtype,
        as HF does)."""
        if self.lm_head is None:
            logits = F.linear(hidden, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
        if self.share.parallel:  # each rank's vocabulary rows, the padding cut off
            logits = self.share.group.all_gather(logits)[:, : self.config.vocab_size]
        return logits.float()

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
