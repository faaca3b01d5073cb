"""Reference quantized GEMMs: exact integer cores, then one float epilogue
(docs/formats.md#reference-gemms).

These pin the semantics the CUDA kernels are tested against: a kernel's int32 accumulator must
equal `int_matmul` exactly, and its output must equal the epilogue below up to fp16 rounding.
All take a `QuantizedActivation` (x_q int8 [M, K], a_s fp16 [M], a_sum int32 [M]) and a stored
weight (weight.py) and return fp32 [M, N]; with x̂ = a_s · x_q and Ŵ the weight's dequantization,
each equals x̂ · Ŵᵀ in exact arithmetic:

W4A8 per-channel (the zero folded into a rank-1 correction, so the core multiplies raw codes):
    acc[m, n] = Σ_k x_q[m, k] · q[n, k]                        q ∈ [0, 15]
    y[m, n]   = a_s[m] · (s1[n] · acc[m, n] − s1_szeros[n] · a_sum[m])
    since x̂ · Ŵᵀ = a_s · Σ_k x_q · (s1 · q − s1_szeros) = a_s · (s1 · acc − s1_szeros · Σ_k x_q)

W4A8 g128 (the zero subtracted in the int8 intermediate, so no activation sum is needed):
    acc[m, n] = Σ_k x_q[m, k] · w8[n, k]                       w8 = q · s2 + s2_zeros ∈ [−127, 127]
    y[m, n]   = acc[m, n] · s1[n] · a_s[m]

W8A8:
    acc[m, n] = Σ_k x_q[m, k] · weight[n, k]
    y[m, n]   = acc[m, n] · dequant_scale[n] · a_s[m]

The epilogue runs in fp32 (acc converted once); the kernels' fp16 outputs round it once more.
"""

from __future__ import annotations

import torch

from omniserve.formats.activation import QuantizedActivation
from omniserve.formats.packing import unpack_w4
from omniserve.formats.weight import (
    QuantizedWeight,
    W4A8PerChannelWeight,
    W4A8PerGroupWeight,
)


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact Σ_k a[m, k] · b[n, k] of integer tensors a [M, K], b [N, K] (|values| ≤ 255): int64 [M, N].

    Computed as a float64 matmul, exact on any device and in any summation order: every operand,
    product and partial sum is an integer of magnitude ≤ 255 · 255 · K < 2^53 for K < 2^37, and
    float64 represents those exactly, so no FMA, blocking or reduction order can round. (torch's
    `_int_mm` is exact too but only for some shapes and devices; the GPU tests compare against it.)
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"int_matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not match on K"
        )
    if a.is_floating_point() or b.is_floating_point():
        raise ValueError(f"int_matmul takes integer tensors, got {a.dtype} and {b.dtype}")
    return (a.double() @ b.double().t()).to(torch.int64)


def quantized_linear(x: QuantizedActivation, w: QuantizedWeight) -> torch.Tensor:
    """The GEMM of w's format: fp32 [M, N] (module doc)."""
    return epilogue(accumulate(x, w), x, w)


def accumulate(x: QuantizedActivation, w: QuantizedWeight) -> torch.Tensor:
    """The exact integer core of w's GEMM: acc int64 [M, N] (module doc). Over a split of K (a
    row-parallel linear's ranks) the parts' accumulators, and their activations' code sums, add up
    exactly to the whole's, so that one `epilogue` of the sums is the whole GEMM."""
    if isinstance(w, W4A8PerChannelWeight):
        return int_matmul(x.q, unpack_w4(w.qweight))
    if isinstance(w, W4A8PerGroupWeight):
        return int_matmul(x.q, w.int8_weight())
    return int_matmul(x.q, w.weight)


def epilogue(acc: torch.Tensor, x: QuantizedActivation, w: QuantizedWeight) -> torch.Tensor:
    """fp32 [M, N] of w's GEMM from its integer core `acc` (module doc); of x it reads the
    per-token scales and code sums only."""
    a_s = x.scales.float().unsqueeze(1)
    if isinstance(w, W4A8PerChannelWeight):
        correction = w.s1_szeros.float().unsqueeze(0) * x.sums.float().unsqueeze(1)
        return a_s * (w.s1_scales.float().unsqueeze(0) * acc.float() - correction)
    w_scale = w.s1_scales if isinstance(w, W4A8PerGroupWeight) else w.dequant_scale
    return acc.float() * w_scale.float().unsqueeze(0) * a_s
