"""The fp model the QoQ quantizer transforms: an HF Llama-family checkpoint as plain tensors.

The quantizer never builds the serving model: it reads one decoder layer's tensors at a time
(safetensors are memory-mapped), transforms them in fp32 on the calibration device, runs that
layer's forward on the calibration activations, and writes the result. So an 8B model needs one
layer and one layer's activations on the GPU, not the whole model.

`layer_forward` is the decoder layer of models/llama.py written over a batch of whole sequences
(causal attention, sliding windows, GQA, RoPE via layers/rotary.py), with hooks that see every
linear's input: the quantizer's calibration statistics come from there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import PretrainedConfig

from omniserve.errors import CheckpointError
from omniserve.formats.checkpoint import CONFIG_FILE
from omniserve.layers.activation import SiluAndMul
from omniserve.layers.rotary import RotaryEmbedding, apply_rotary
from omniserve.models.llama import rope_parameters, sliding_windows
from omniserve.models.loader import load_hf_config

# Decoder-layer tensor names, relative to `model.layers.{i}.`.
Q, K, V, O = (f"self_attn.{p}_proj" for p in "qkvo")  # noqa: E741 (the paper's names)
GATE, UP, DOWN = (f"mlp.{p}_proj" for p in ("gate", "up", "down"))
PROJECTIONS = (Q, K, V, O, GATE, UP, DOWN)
INPUT_NORM, POST_NORM = "input_layernorm.weight", "post_attention_layernorm.weight"
EMBED, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"

# Where `layer_forward` reports a linear's input: the point name → the linears that read it.
QKV_INPUT, O_INPUT, GATE_UP_INPUT, DOWN_INPUT = "qkv", "o", "gate_up", "down"
KEYS = "keys"
"""The post-RoPE keys [tokens, kv_heads, head_dim]: what the KV cache stores, and what
SmoothAttention flattens."""
VALUES = "values"
"""The values [tokens, kv_heads, head_dim], as the KV cache stores them (static KV8 scales)."""
READERS: dict[str, tuple[str, ...]] = {
    QKV_INPUT: (Q, K, V),
    O_INPUT: (O,),
    GATE_UP_INPUT: (GATE, UP),
    DOWN_INPUT: (DOWN,),
}

Observer = Callable[[str, torch.Tensor], None]
"""Called with (point, activations [tokens, channels]) during `layer_forward`."""

Layer = dict[str, torch.Tensor]
"""One decoder layer's tensors by relative name (`self_attn.q_proj.weight`, ...)."""


@dataclass(frozen=True)
class Geometry:
    """The shapes and constants a decoder layer's forward needs, from the HF config."""

    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    windows: tuple[int | None, ...]
    """Per-layer sliding window (None: full attention)."""

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> Geometry:
        heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            num_heads=heads,
            num_kv_heads=config.num_key_value_heads or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            eps=config.rms_norm_eps,
            windows=tuple(sliding_windows(config)),
        )

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads


class SourceModel:
    """An HF fp checkpoint directory, read tensor by tensor (memory-mapped safetensors)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{path} is not a directory (expected an HF model directory)")
        self.config = load_hf_config(str(self.path))
        self.raw_config: dict[str, Any] = json.loads((self.path / CONFIG_FILE).read_text())
        if "quantization_config" in self.raw_config:
            raise CheckpointError(f"{path} is already quantized; QoQ needs an fp checkpoint")
        self.geometry = Geometry.from_config(self.config)
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False))
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path} holds no *.safetensors file")
        self._stack = ExitStack()
        self._files: dict[str, Any] = {}
        for file in files:
            handle = self._stack.enter_context(safe_open(str(file), framework="pt"))
            for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                self._files[name] = handle
        self._check_names()

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> SourceModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def names(self) -> list[str]:
        """Every tensor the model reads (RoPE tables some checkpoints store are left out)."""
        return [n for n in self._files if not n.endswith("rotary_emb.inv_freq")]

    def tensor(self, name: str) -> torch.Tensor:
        """The stored tensor (its own dtype, on the CPU)."""
        if name not in self._files:
            raise CheckpointError(f"{self.path}: tensor {name} is missing")
        return self._files[name].get_tensor(name)

    def layer(self, index: int, device: torch.device) -> Layer:
        """Layer `index`'s tensors in fp32 on `device`."""
        prefix = f"model.layers.{index}."
        return {
            n.removeprefix(prefix): self.tensor(n).to(device=device, dtype=torch.float32)
            for n in self.names()
            if n.startswith(prefix)
        }

    def _check_names(self) -> None:
        required = [EMBED, FINAL_NORM] + ([] if self.tied else [LM_HEAD])
        for i in range(self.num_layers):
            required += [f"model.layers.{i}.{n}" for n in (INPUT_NORM, POST_NORM)]
            required += [f"model.layers.{i}.{p}.weight" for p in PROJECTIONS]
        missing = [n for n in required if n not in self._files]
        if missing:
            shown = ", ".join(missing[:8]) + (
                f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            )
            raise CheckpointError(f"{self.path}: missing tensors: {shown}")


def rope_tables(
    config: PretrainedConfig, seq_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos, sin [seq_len, 1, head_dim / 2] for positions 0..seq_len−1 (layers/rotary.py)."""
    geometry = Geometry.from_config(config)
    with torch.device(device):
        rotary = RotaryEmbedding(geometry.head_dim, seq_len, rope_parameters(config))
    return rotary(torch.arange(seq_len, device=device))


def layer_forward(
    geometry: Geometry,
    index: int,
    layer: Layer,
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    observe: Observer | None = None,
) -> torch.Tensor:
    """Decoder layer `index` over x [batch, seq, hidden] (whole sequences from position 0), fp32.

    `observe(point, activations)` sees each linear's input flattened to [tokens, channels], the
    post-RoPE keys (KEYS) and the values (VALUES), both [tokens, kv_heads, head_dim].
    """
    b, s, _ = x.shape
    g = geometry

    def linear(name: str, inp: torch.Tensor) -> torch.Tensor:
        return F.linear(inp, layer[f"{name}.weight"], layer.get(f"{name}.bias"))

    def seen(point: str, inp: torch.Tensor) -> None:
        if observe is not None:
            observe(point, inp.reshape(-1, *inp.shape[2:]))

    h = F.rms_norm(x, (g.hidden,), layer[INPUT_NORM], g.eps)
    seen(QKV_INPUT, h)
    q = apply_rotary(linear(Q, h).view(b, s, g.num_heads, g.head_dim), *rope)
    k = apply_rotary(linear(K, h).view(b, s, g.num_kv_heads, g.head_dim), *rope)
    v = linear(V, h).view(b, s, g.num_kv_heads, g.head_dim)
    seen(KEYS, k)
    seen(VALUES, v)
    mask = _attention_mask(s, g.windows[index], x.device)
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2).repeat_interleave(g.group, dim=1),
        v.transpose(1, 2).repeat_interleave(g.group, dim=1),
        attn_mask=mask,
    )
    o = o.transpose(1, 2).reshape(b, s, g.num_heads * g.head_dim)
    seen(O_INPUT, o)
    x = x + linear(O, o)
    h = F.rms_norm(x, (g.hidden,), layer[POST_NORM], g.eps)
    seen(GATE_UP_INPUT, h)
    act = SiluAndMul()(torch.cat((linear(GATE, h), linear(UP, h)), dim=-1))
    seen(DOWN_INPUT, act)
    return x + linear(DOWN, act)


def _attention_mask(seq: int, window: int | None, device: torch.device) -> torch.Tensor:
    """bool [seq, seq]: query i sees key j iff 0 ≤ i − j (< window when there is one)."""
    distance = torch.arange(seq, device=device)[:, None] - torch.arange(seq, device=device)[None]
    allowed = distance >= 0
    return allowed if window is None else allowed & (distance < window)
