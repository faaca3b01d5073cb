"""Per-token dynamic int8 activation quantization and the fused ops that produce it (study §2.6).

Every linear of a W4A8/W8A8 model reads int8 inputs quantized per token (row), symmetric:

    a_s[m] = fp16_ceil(max_k |x[m, k]| / 127)      x_q[m, k] = round(x[m, k] / a_s[m]) ∈ [−127, 127]
    |x − a_s · x_q| ≤ a_s / 2                       (rtn.py; QServe stores absmax/127 rounded to nearest)

plus, for the W4A8 per-channel epilogue (gemm.py), the row sums of the int8 values

    a_sum[m] = Σ_k x_q[m, k]        (int32, exact: |a_sum| ≤ 127·K)

QServe's kernels instead sum the *unquantized* row in fp16; summing the codes makes the GEMM
output equal (x̂ · Ŵᵀ) exactly before the float epilogue, which is what a reference should pin.
A CUDA kernel may return a_s·a_sum in fp16 if it keeps that identity within fp16 rounding.

The fused ops are the composition of the fp ops of `omniserve.layers` with this quantizer, so the
formulas of RMSNorm and SiLU·mul exist once (layers/norm.py, layers/activation.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from omniserve.layers.activation import SiluAndMul
from omniserve.layers.norm import RMSNorm
from omniserve.quant.rtn import quantize_symmetric

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


def quantize_per_token(x: torch.Tensor) -> QuantizedActivation:
    """Per-token symmetric int8 quantization of x [T, K] (any float dtype), with code row sums."""
    if x.dim() != 2:
        raise ValueError(f"expected activations of shape [tokens, features], got {tuple(x.shape)}")
    q, scales = quantize_symmetric(x, ACT_QMAX)
    return QuantizedActivation(q, scales, q.sum(dim=-1, dtype=torch.int32))


def rmsnorm_quant(x: torch.Tensor, norm: RMSNorm) -> QuantizedActivation:
    """RMSNorm (the engine's, in x's dtype) then per-token int8: QServe's rms_norm_general[_fuse_sum]."""
    return quantize_per_token(norm(x))


def add_rmsnorm_quant(
    x: torch.Tensor, delta: torch.Tensor, norm: RMSNorm
) -> tuple[torch.Tensor, QuantizedActivation]:
    """A decoder's residual add fused with the RMSNorm + quant after it: residual = x + delta
    (torch's add, rounded once to x's dtype) and rmsnorm_quant(residual)."""
    if delta.shape != x.shape or delta.dtype != x.dtype:
        raise ValueError(
            f"delta must have x's shape {tuple(x.shape)} and dtype {x.dtype}, got "
            f"{tuple(delta.shape)} {delta.dtype}"
        )
    residual = x + delta
    return residual, rmsnorm_quant(residual, norm)


def silu_mul_quant(gate_up: torch.Tensor) -> QuantizedActivation:
    """silu(gate)·up of the fused gate_up output [T, 2I] (in its dtype, as QServe's two-kernel path
    rounds to fp16 between them), then per-token int8 [T, I]."""
    return quantize_per_token(SiluAndMul()(gate_up))
