"""Fused activation quantization ops (`cuda/fused_*.cu`) next to their torch references.

The functions here are the kernels alone (CUDA fp16/bf16 inputs); `activation_ops` hands a model
either them or their references (`omniserve.formats.activation`), as kernels/dispatch.py chose
when the model was built. The kernels reproduce the references' arithmetic (fp16 scale rounded
up, IEEE division, round half to even), so codes, scales and sums are equal to the reference's on
the same device; RMSNorm's sum of squares is reduced in another order than torch's, so a
normalized value can differ in its last bit and move a code by one (rarely). The residual add
before it rounds as torch's does: that residual equals `x + delta` bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from omniserve.formats import activation as reference
from omniserve.formats.activation import QuantizedActivation
from omniserve.kernels.build import Extension

EXTENSION = Extension(
    "omniserve_fused_quant",
    ("fused_quant.cu", "fused_rmsnorm_quant.cu", "fused_silu_mul_quant.cu", "fused_bindings.cpp"),
    fast_math=False,  # codes must match the references bit for bit
)

DTYPES = (torch.float16, torch.bfloat16)


def unsupported(dtype: torch.dtype) -> str | None:
    """Why the kernels cannot take activations of `dtype`, None if they can."""
    if dtype not in DTYPES:
        return f"dtype {dtype} not supported (float16, bfloat16)"
    return None


def quantize_per_token(x: torch.Tensor) -> QuantizedActivation:
    """Per-token int8 of x [T, K] with code sums (reference:
    `formats.activation.quantize_per_token`)."""
    return QuantizedActivation(*EXTENSION.load().quantize_per_token(x))


def rmsnorm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float) -> QuantizedActivation:
    """RMSNorm then per-token int8 (reference: `formats.activation.rmsnorm_quant`)."""
    return QuantizedActivation(*EXTENSION.load().rmsnorm_quant(x, weight, eps))


def add_rmsnorm_quant(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, QuantizedActivation]:
    """residual = x + delta, then RMSNorm + per-token int8 of it: (residual, quantized)
    (reference: `formats.activation.add_rmsnorm_quant`)."""
    residual, *quantized = EXTENSION.load().add_rmsnorm_quant(x, delta, weight, eps)
    return residual, QuantizedActivation(*quantized)


def silu_mul_quant(gate_up: torch.Tensor) -> QuantizedActivation:
    """silu(gate)·up of gate_up [T, 2I] then per-token int8 (reference:
    `formats.activation.silu_mul_quant`)."""
    return QuantizedActivation(*EXTENSION.load().silu_mul_quant(gate_up))


class ActivationOps(NamedTuple):
    """The int8-activation ops of a quantized model, with the references' signatures."""

    quantize_per_token: Callable[[torch.Tensor], QuantizedActivation]
    rmsnorm_quant: Callable[[torch.Tensor, torch.Tensor, float], QuantizedActivation]
    """x, norm weight, eps → quantized RMSNorm(x)."""
    add_rmsnorm_quant: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, QuantizedActivation]
    ]
    """x, delta, norm weight, eps → (x + delta, quantized RMSNorm(x + delta))."""
    silu_mul_quant: Callable[[torch.Tensor], QuantizedActivation]


def activation_ops(kernel: bool) -> ActivationOps:
    """The kernels above, or their references."""
    if kernel:
        return ActivationOps(quantize_per_token, rmsnorm_quant, add_rmsnorm_quant, silu_mul_quant)
    return ActivationOps(
        reference.quantize_per_token,
        reference.rmsnorm_quant,
        reference.add_rmsnorm_quant,
        reference.silu_mul_quant,
    )
