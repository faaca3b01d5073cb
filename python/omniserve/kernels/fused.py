"""Fused activation quantization ops (`cuda/fused_*.cu`) next to their torch references.

Each op runs the CUDA kernel for CUDA tensors on a GPU the kernels support and the reference
(`omniserve.quant.activation`) otherwise. The kernels reproduce the references' arithmetic (fp16
scale rounded up, IEEE division, round half to even), so codes, scales and sums are equal to the
reference's on the same device; RMSNorm's sum of squares is reduced in another order than
torch's, so a normalized value can differ in its last bit and move a code by one (rarely). The
residual add before it rounds as torch's does: that residual equals `x + delta` bit for bit.
"""

from __future__ import annotations

import torch

from omniserve.kernels.build import Extension, kernels_available
from omniserve.layers.norm import RMSNorm
from omniserve.quant import activation as reference
from omniserve.quant.activation import QuantizedActivation

EXTENSION = Extension(
    "omniserve_fused_quant",
    ("fused_quant.cu", "fused_rmsnorm_quant.cu", "fused_silu_mul_quant.cu", "fused_bindings.cpp"),
    fast_math=False,  # codes must match the references bit for bit
)


def _use_kernel(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and kernels_available(x.device)


def quantize_per_token(x: torch.Tensor) -> QuantizedActivation:
    """Per-token int8 of x [T, K] with code sums (reference: `quant.activation.quantize_per_token`)."""
    if not _use_kernel(x):
        return reference.quantize_per_token(x)
    return QuantizedActivation(*EXTENSION.load().quantize_per_token(x))


def rmsnorm_quant(x: torch.Tensor, norm: RMSNorm) -> QuantizedActivation:
    """RMSNorm then per-token int8 (reference: `quant.activation.rmsnorm_quant`)."""
    if not _use_kernel(x):
        return reference.rmsnorm_quant(x, norm)
    return QuantizedActivation(*EXTENSION.load().rmsnorm_quant(x, norm.weight, norm.eps))


def add_rmsnorm_quant(
    x: torch.Tensor, delta: torch.Tensor, norm: RMSNorm
) -> tuple[torch.Tensor, QuantizedActivation]:
    """residual = x + delta, then RMSNorm + per-token int8 of it: (residual, quantized)
    (reference: `quant.activation.add_rmsnorm_quant`)."""
    if not _use_kernel(x):
        return reference.add_rmsnorm_quant(x, delta, norm)
    residual, *quantized = EXTENSION.load().add_rmsnorm_quant(x, delta, norm.weight, norm.eps)
    return residual, QuantizedActivation(*quantized)


def silu_mul_quant(gate_up: torch.Tensor) -> QuantizedActivation:
    """silu(gate)·up of gate_up [T, 2I] then per-token int8 (reference:
    `quant.activation.silu_mul_quant`)."""
    if not _use_kernel(gate_up):
        return reference.silu_mul_quant(gate_up)
    return QuantizedActivation(*EXTENSION.load().silu_mul_quant(gate_up))
