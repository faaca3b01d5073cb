"""Rotary position embedding ("rotate half" convention, as HF Llama) and its scaling variants."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def inverse_frequencies(head_dim: int, rope: dict[str, Any]) -> torch.Tensor:
    """fp32 [head_dim // 2] inverse frequencies for `rope` (HF's `rope_parameters` dict: rope_type,
    rope_theta and the type's own keys). Computed on the CPU exactly as HF does, so the angles match
    HF's to the bit."""
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (float(rope["rope_theta"]) ** exponents)
    if rope_type == "linear":
        return inv_freq / rope["factor"]
    if rope_type == "llama3":
        return _llama3_scaled(inv_freq, rope)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, rope: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band in between
    interpolated smoothly."""
    factor = rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """RoPE angles for integer positions.

    cos/sin are tabulated once for every position below `max_positions`, in fp32 on the CPU, then
    cast to the default dtype and moved to the default device (the model is built under both): the
    values HF computes per step, without recomputing them each step.
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_positions: int, rope: dict[str, Any]) -> None:
        super().__init__()
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial rotary embeddings are not supported")
        inv_freq = inverse_frequencies(head_dim, rope)
        positions = torch.arange(max_positions, dtype=torch.float32, device="cpu")
        angles = torch.outer(positions, inv_freq)
        target: dict[str, Any] = {
            "device": torch.get_default_device(),
            "dtype": torch.get_default_dtype(),
        }
        # Non-persistent: derived from the config, never read from a checkpoint.
        self.register_buffer("cos", angles.cos().to(**target), persistent=False)
        self.register_buffer("sin", angles.sin().to(**target), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, head_dim // 2] for `positions` [T], ready for `apply_rotary`."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim]: x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), written
    on halves with the same roundings as HF."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
