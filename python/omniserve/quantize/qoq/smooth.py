"""Smoothing (SmoothQuant-style) of the block-output linears and SmoothAttention (QoQ).

Both divide some channels of an activation by s and multiply the weights that read them by s,
folding 1/s into the layer that produced the activation, so the fp model is unchanged:

down_proj inputs  silu(gate) · up:   up rows (and bias) ÷ s,  down columns × s.
o_proj inputs     attention output:  v rows (and bias) ÷ s,   o columns × s.
    Attention output channel (head h, dim d) is a mix of v channel (h's KV head, d), so with GQA
    one s per KV channel serves every query head of its group.
SmoothAttention   keys:              k rows (and bias) ÷ λ,   q rows (and bias) × λ,
    so q · k is unchanged while key outlier channels, which per-token KV4 quantization handles
    worst, shrink. λ is shared by the two channels (d, d + D/2) that RoPE rotates together
    ("rotate half"), which makes the scaling commute with RoPE.

Scales: s_j = max|X_j|^α / max|W_j|^(1−α) (SmoothQuant); λ_d = max|K_d|^α (QoQ's β = 0), α = 0.5.
The quantizer picks the smoothing α per layer by measuring the quantized output error (the weight
of the producer is scaled by rows, which per-row quantization does not notice).
"""

from __future__ import annotations

import torch

from omniserve.quantize.qoq.model import DOWN, UP, Geometry, K, Layer, O, Q, V

MIN_STAT = 1e-5
"""Floor of activation and weight maxima, so that a dead channel gets a finite scale."""


def smoothing_scale(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float
) -> torch.Tensor:
    """s = max|X|^α / max|W|^(1−α) per input channel (both [K])."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    return act_absmax.clamp_min(MIN_STAT).pow(alpha) / weight_absmax.clamp_min(MIN_STAT).pow(
        1.0 - alpha
    )


def kv_to_query_channels(per_kv: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """A per-KV-channel vector [kv_heads · D] repeated for the query heads of each group."""
    g = geometry
    return per_kv.view(g.num_kv_heads, 1, g.head_dim).expand(-1, g.group, -1).reshape(-1)


def query_to_kv_max(per_query: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """A per-query-channel vector [heads · D] reduced by max over each group: [kv_heads · D]."""
    g = geometry
    return per_query.view(g.num_kv_heads, g.group, g.head_dim).amax(dim=1).reshape(-1)


def down_weight_absmax(layer: Layer) -> torch.Tensor:
    """max|W_down| per input channel [intermediate]."""
    return layer[f"{DOWN}.weight"].abs().amax(dim=0)


def out_weight_absmax(layer: Layer, geometry: Geometry) -> torch.Tensor:
    """max|W_o| per KV channel [kv_heads · D] (over the columns of the group's query heads)."""
    return query_to_kv_max(layer[f"{O}.weight"].abs().amax(dim=0), geometry)


def fold_down(layer: Layer, scale: torch.Tensor) -> None:
    """Divide the down_proj inputs by `scale` [intermediate] (in place)."""
    _scale_rows(layer, UP, 1.0 / scale)
    layer[f"{DOWN}.weight"] = layer[f"{DOWN}.weight"] * scale.unsqueeze(0)


def fold_out(layer: Layer, kv_scale: torch.Tensor, geometry: Geometry) -> None:
    """Divide the o_proj inputs by `kv_scale` [kv_heads · D] of their KV channel (in place)."""
    _scale_rows(layer, V, 1.0 / kv_scale)
    layer[f"{O}.weight"] = layer[f"{O}.weight"] * kv_to_query_channels(kv_scale, geometry)


def smooth_attention_scale(
    key_absmax: torch.Tensor, alpha: float, geometry: Geometry
) -> torch.Tensor:
    """λ [kv_heads · D] from the post-RoPE key maxima [kv_heads, D], shared by RoPE pairs."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"SmoothAttention alpha must be in (0, 1], got {alpha}")
    half = geometry.head_dim // 2
    pair = torch.maximum(key_absmax[:, :half], key_absmax[:, half:])
    lam = pair.clamp_min(MIN_STAT).pow(alpha)
    return torch.cat((lam, lam), dim=1).reshape(-1)


def fold_smooth_attention(layer: Layer, lam: torch.Tensor, geometry: Geometry) -> None:
    """Keys ÷ λ, queries × λ of their KV channel (in place)."""
    _scale_rows(layer, K, 1.0 / lam)
    _scale_rows(layer, Q, kv_to_query_channels(lam, geometry))


def _scale_rows(layer: Layer, name: str, factor: torch.Tensor) -> None:
    layer[f"{name}.weight"] = layer[f"{name}.weight"] * factor.unsqueeze(1)
    if f"{name}.bias" in layer:
        layer[f"{name}.bias"] = layer[f"{name}.bias"] * factor
