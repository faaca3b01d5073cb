"""Per-token dynamic int8 activation quantization and the fused ops that produce it
(docs/formats.md#activation-quantization).

Every linear of a W4A8/W8A8 model reads int8 inputs quantized per token (row), symmetric:

    a_s[m] = fp16_ceil(max_k |x[m, k]| / 127)      x_q[m, k] = round(x[m, k] / a_s[m]) ∈ [−127, 127]
    |x − a_s · x_q| ≤ a_s / 2                       (rtn.py; QServe stores absmax/127 rounded to nearest)

plus, for the W4A8 per-channel epilogue (gemm.py), the row sums of the int8 values

    a_sum[m] = Σ_k x_q[m, k]        (int32, exact: |a_sum| ≤ 127·K)

QServe's kernels instead sum the *unquantized* row in fp16; summing the codes makes the GEMM
output equal (x̂ · Ŵᵀ) exactly before the float epilogue, which is what a reference should pin.
A CUDA kernel may return a_s·a_sum in fp16 if it keeps that identity within fp16 rounding.

The fused ops are the composition of the fp ops with this quantizer. Those fp ops, RMSNorm and
SiLU·mul, are written here once, as functions of plain tensors: layers/norm.py and
layers/activation.py are modules around them, and kernels/fused.py must match their composition.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from omniserve.formats.rtn import quantize_symmetric

ACT_QMAX = 127
"""Symmetric int8 range [−127, 127]: −128 is never produced, so negation cannot overflow."""


class QuantizedActivation(NamedTuple):
    q: torch.Tensor
    """int8 [T, K] codes."""
    scales: torch.Tensor
    """fp16 [T] per-token scales a_s."""
    sums: torch.Tensor
    """int32 [T] per-token sums of the codes, Σ_k q[m, k]."""

    def dequantize(self) -> torch.Tensor:
        """fp32 [T, K]: x̂ = a_s · x_q."""
        return self.q.float() * self.scales.float().unsqueeze(-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., hidden] with `weight` [hidden], computed as HF Llama does so that
    fp16/bf16 outputs match it bit for bit."""
    # Statistics in fp32, then back to the activation dtype *before* the weight multiply: the
    # order HF uses, which matters for bf16 equality.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, where gate_up is [..., 2 * d] = concat(gate, up)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def quantize_per_token(x: torch.Tensor) -> QuantizedActivation:
    """Per-token symmetric int8 quantization of x [T, K] (any float dtype), with code row sums."""
    return _per_token(x, None)


def quantize_per_token_across(
    x: torch.Tensor, all_reduce_max: Callable[[torch.Tensor], torch.Tensor]
) -> QuantizedActivation:
    """`quantize_per_token` of x [T, K], one rank's columns of rows split over ranks (the input
    of a row-parallel linear under tensor parallelism): each row's scale comes from its absmax
    over every rank (`all_reduce_max` of the local one), so each rank's codes are exactly those
    columns of the whole row's codes, and its code sums are its part of the whole row's."""
    return _per_token(x, all_reduce_max)


def _per_token(
    x: torch.Tensor, reduce_absmax: Callable[[torch.Tensor], torch.Tensor] | None
) -> QuantizedActivation:
    if x.dim() != 2:
        raise ValueError(f"expected activations of shape [tokens, features], got {tuple(x.shape)}")
    q, scales = quantize_symmetric(x, ACT_QMAX, reduce_absmax=reduce_absmax)
    return QuantizedActivation(q, scales, q.sum(dim=-1, dtype=torch.int32))


def rmsnorm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float) -> QuantizedActivation:
    """RMSNorm (`rms_norm`, in x's dtype) then per-token int8: QServe's
    rms_norm_general[_fuse_sum]."""
    return quantize_per_token(rms_norm(x, weight, eps))


def add_rmsnorm_quant(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, QuantizedActivation]:
    """A decoder's residual add fused with the RMSNorm + quant after it: residual = x + delta
    (torch's add, rounded once to x's dtype) and rmsnorm_quant(residual)."""
    if delta.shape != x.shape or delta.dtype != x.dtype:
        raise ValueError(
            f"delta must have x's shape {tuple(x.shape)} and dtype {x.dtype}, got "
            f"{tuple(delta.shape)} {delta.dtype}"
        )
    residual = x + delta
    return residual, rmsnorm_quant(residual, weight, eps)


def silu_mul_quant(gate_up: torch.Tensor) -> QuantizedActivation:
    """silu(gate)·up of the fused gate_up output [T, 2I] (in its dtype, as QServe's two-kernel path
    rounds to fp16 between them), then per-token int8 [T, I]."""
    return quantize_per_token(silu_and_mul(gate_up))
