"""FP8 e4m3 quantization: the `fp8` precision's weights and activations and its reference GEMM
(docs/formats.md#fp8).

This is the configuration vLLM and TensorRT-LLM serve on Hopper, written down once so the engine
can run it beside the integer precisions. Both operands are e4m3 (OCP "fn": no infinities, largest
finite ±448) under fp32 scales, symmetric, with the scale making the row's absmax the largest code:

    weight, per output channel:  s_w[n] = max_k |W[n, k]| / 448     W_q = e4m3(W / s_w)
    activation, per token:       s_a[m] = max_k |x[m, k]| / 448     x_q = e4m3(x / s_a)
    y[m, n] = s_a[m] · s_w[n] · Σ_k x_q[m, k] · W_q[n, k]

e4m3(v) rounds to the nearest representable value (ties to even) after clamping to ±448 (the
division can land a hair past 448 in fp32; e4m3fn has no infinity, so an unclamped overflow would
be NaN). Normal values keep 3 mantissa bits, so |v − e4m3(v)| ≤ 2^-4 · |v|; below 2^-6 the spacing
is the subnormal step 2^-9, so small entries of a row with a large absmax lose relative precision,
which is FP8's known cost. An all-zero row gets the floor scale and zero codes.

The reference sums the products in float64. Every product of two e4m3 values is exact in fp32 and
the float64 sum of K of them is exact for the K of any model, so the reference is the exact
x̂ · Ŵᵀ; cuBLAS (`torch._scaled_mm`, layers/fp8_linear.py) accumulates in fp32 on the tensor cores,
so it equals this up to fp32 accumulation rounding, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
"""Largest finite e4m3fn value."""
_MIN_ABSMAX = 1e-12
"""Floor of a row's absmax, so an all-zero row has a finite, non-zero scale."""


def fp8_scales(
    x: torch.Tensor,
    clip: torch.Tensor | None = None,
    reduce_absmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """fp32 scales [rows] of x [rows, cols]: each row's absmax / 448, the absmax first shrunk by
    `clip` [rows] in (0, 1] where given (weight clipping; codes beyond it saturate at ±448), or
    mapped by `reduce_absmax` (rows split over ranks: the maximum over every rank's part)."""
    absmax = x.float().abs().amax(-1)
    if clip is not None:
        absmax = absmax * clip.float()
    if reduce_absmax is not None:
        absmax = reduce_absmax(absmax)
    return absmax.clamp_min(_MIN_ABSMAX) / FP8_MAX


def to_fp8(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """e4m3 codes of x [..., cols] under fp32 `scales` [...] (a scale per row; 0-d: one for
    all): e4m3(x / s), clamped to ±448."""
    return (x.float() / scales.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


class Fp8Activation(NamedTuple):
    q: torch.Tensor
    """e4m3 [T, K] codes."""
    scales: torch.Tensor
    """fp32 [T] per-token scales s_a."""

    def dequantize(self) -> torch.Tensor:
        """fp32 [T, K]: x̂ = s_a · x_q."""
        return self.q.float() * self.scales.unsqueeze(-1)


def quantize_per_token_fp8(x: torch.Tensor) -> Fp8Activation:
    """Per-token dynamic e4m3 quantization of x [T, K] (any float dtype)."""
    return _per_token_fp8(x, None)


def quantize_per_token_fp8_across(
    x: torch.Tensor, all_reduce_max: Callable[[torch.Tensor], torch.Tensor]
) -> Fp8Activation:
    """`quantize_per_token_fp8` of x [T, K], one rank's columns of rows split over ranks (the
    input of a row-parallel linear under tensor parallelism): each row's scale comes from its
    absmax over every rank (`all_reduce_max` of the local one), so each rank's codes are exactly
    those columns of the whole row's codes."""
    return _per_token_fp8(x, all_reduce_max)


def _per_token_fp8(
    x: torch.Tensor, reduce_absmax: Callable[[torch.Tensor], torch.Tensor] | None
) -> Fp8Activation:
    if x.dim() != 2:
        raise ValueError(f"expected activations of shape [tokens, features], got {tuple(x.shape)}")
    scales = fp8_scales(x, reduce_absmax=reduce_absmax)
    return Fp8Activation(to_fp8(x, scales), scales)


def accumulate_fp8(x: Fp8Activation, weight: torch.Tensor) -> torch.Tensor:
    """float64 [M, N] = Σ_k x_q · W_q of e4m3 weight codes [N, K], exact (the module doc: e4m3
    values are multiples of 2⁻⁹ below 2⁹, so a product takes 36 bits and a sum of K < 2¹⁷ of
    them 53), so the sums of K parts under tensor parallelism add up to the whole's."""
    if x.q.shape[1] != weight.shape[1]:
        raise ValueError(
            f"gemm_fp8: activations [{x.q.shape[0]}, {x.q.shape[1]}] and weight "
            f"[{weight.shape[0]}, {weight.shape[1]}] do not match on K"
        )
    return x.q.double() @ weight.double().t()


def epilogue_fp8(
    acc: torch.Tensor, scales: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    """fp32 [M, N] = s_a[m] · s_w[n] · acc of `accumulate_fp8`'s sums."""
    return acc.float() * scales.unsqueeze(1) * weight_scale.unsqueeze(0)


def gemm_fp8(x: Fp8Activation, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """Reference FP8 GEMM: fp32 [M, N] = s_a[m] · s_w[n] · Σ_k x_q · W_q of e4m3 weight codes
    [N, K] with fp32 scales [N] (the module doc)."""
    return epilogue_fp8(accumulate_fp8(x, weight), x.scales, weight_scale)
