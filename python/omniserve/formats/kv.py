"""KV cache quantization: QServe's "fine-grained" per-token, per-head asymmetric format.

Every (token, KV head) row x of head_dim values gets its own fp16 scale s and zero z
(docs/formats.md#kv-cache-quantization; dequantization as in QServe's kernels,
`scale · (q − zero)`), with b = 8 (KV8) or b = 4 (KV4) bits and Q = 2^b − 1:

    lo = min(min(x), 0)            hi = max(max(x), 0)
    s  = fp16(max((hi − lo) / Q, 2^-14))
    z  = fp16(−lo / s)                                  # in [0, Q]
    q  = clamp(round(x / s + z), 0, Q)                  # computed with the stored fp16 s and z
    x̂  = s · (q − z)

Two choices on top of QServe's formula, both for a guarantee rather than an approximation:
- The range includes 0. QServe uses [min, max]; for a row that does not straddle 0 its zero
  −min/s can be large (e.g. −25500 for values in [100, 101] at 8 bits) and fp16 cannot hold it
  exactly. With 0 inside the range, z ∈ [0, Q] and every row meets the bound below. Post-RoPE keys
  and values straddle 0 over head_dim in practice, so the result is QServe's in practice.
- q is computed from the stored (fp16-rounded) s and z, not the fp32 ones, so that rounding to
  the nearest code is exact with respect to what dequantization uses. Then |x̂ − x| ≤ s / 2 for
  every element (up to fp32 rounding of the arithmetic): x / s + z lies in [−0.07, Q + 0.25]
  after fp16 rounding of s and z, so clamping never moves a value by more than rounding would.
  The floor 2^-14 (fp16's smallest normal) keeps 1 / s finite for an all-zero row.

KV4 packs two consecutive channels in one byte, the low nibble holding the even channel and the
high nibble the odd one (QServe's `cast_to_packed_uint4`); head_dim is even (RoPE rotates pairs).

Per-tensor static KV8 (LServe's default, `kv_granularity: "per_tensor"`): one fp32 scale per
layer for K and one for V, fixed ahead of time from calibration maxima of the post-RoPE keys and of
the values (`kv_scale_quant_orig` = [k_absmax / 127, v_absmax / 127], quantize/kv_calibration.py);
symmetric, signed, no zero, nothing stored per row:

    q = clamp(round(x / s), −127, 127)  (int8)          x̂ = s · q

|x̂ − x| ≤ s / 2 wherever |x| ≤ 127.5 · s (the calibrated range); values beyond it are clamped to
±127 · s, an error of |x| − 127 · s. KV4 has no per-tensor form: a symmetric 4-bit grid without a
zero point is too coarse, and QServe refuses it too.

Per-tensor FP8 (`kv_cache_dtype` "fp8", vLLM's and TensorRT-LLM's FP8 KV cache): e4m3 codes
(formats/fp8.py) under one fp32 scale per layer for K and one for V, nothing stored per row:

    q = e4m3(x / s)  (clamped to ±448)                  x̂ = s · q

The scales are 1 (vLLM's default without calibrated scales): keys and values of these models stay
far inside ±448, and e4m3 keeps 3 mantissa bits at any magnitude above 2^-6, so
|x̂ − x| ≤ 2^-4 · |x| there (half the subnormal step, 2^-10 · s, below).
"""

from __future__ import annotations

from typing import Protocol

import torch

from omniserve.formats.fp8 import to_fp8

KV_CACHE_BITS: dict[str, int] = {"int8": 8, "int4": 4, "fp8": 8}
"""Bits per cached value of each quantized `kv_cache_dtype`."""

PER_TOKEN_HEAD = "per_token_head"
"""`kv_granularity` of the fine-grained format: a scale and zero per (token, KV head)."""
PER_TENSOR = "per_tensor"
"""`kv_granularity` of static KV8: one scale per layer for K and one for V."""
KV_GRANULARITIES = (PER_TOKEN_HEAD, PER_TENSOR)

STATIC_KV_QMAX = 127
"""Largest code of per-tensor static KV8 (symmetric int8)."""

_MIN_SCALE = 2.0**-14


def packed_dim(head_dim: int, bits: int) -> int:
    """Bytes one quantized row of `head_dim` values takes."""
    return head_dim * bits // 8


def quantize_kv(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] (any float dtype) -> (codes uint8 [..., packed_dim], params fp16 [..., 2])
    with params[..., 0] the scale and params[..., 1] the zero of each row."""
    levels = (1 << bits) - 1
    x = x.float()
    lo = x.amin(-1, keepdim=True).clamp_max(0.0)
    hi = x.amax(-1, keepdim=True).clamp_min(0.0)
    scale = ((hi - lo) / levels).clamp_min(_MIN_SCALE).half().float()
    zero = (-lo / scale).half().float()
    q = (x / scale + zero).round_().clamp_(0, levels).to(torch.uint8)
    if bits == 4:
        q = pack_int4(q)
    return q, torch.cat([scale, zero], -1).half()


def dequantize_kv(
    codes: torch.Tensor, params: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of `quantize_kv`: x̂ = scale · (q − zero) in fp32, returned as `dtype`."""
    q = unpack_int4(codes) if bits == 4 else codes
    p = params.float()
    # In place on the one fp32 copy: reads of the cache are the largest decode transients.
    return q.float().sub_(p[..., 1:]).mul_(p[..., :1]).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15] [..., 2n] -> bytes [..., n]: low nibble = even channel, high = odd."""
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: bytes [..., n] -> uint8 codes [..., 2n]."""
    return torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2)


def static_kv_scales(absmax: torch.Tensor) -> torch.Tensor:
    """Per-tensor scales absmax / 127 (fp32, any shape; the floor keeps 1 / s finite for a layer
    whose calibration saw only zeros)."""
    return (absmax.float() / STATIC_KV_QMAX).clamp_min(_MIN_SCALE)


def quantize_kv_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., head_dim] (any float dtype), scale a 0-d fp32 tensor -> codes int8 [..., head_dim]."""
    q = (x.float() / scale).round_().clamp_(-STATIC_KV_QMAX, STATIC_KV_QMAX)
    return q.to(torch.int8)


def dequantize_kv_static(
    codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of `quantize_kv_static`: x̂ = scale · q in fp32, returned as `dtype`."""
    return codes.float().mul_(scale).to(dtype)


def quantize_kv_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., head_dim] (any float dtype), scale a 0-d fp32 tensor -> e4m3 codes [..., head_dim]."""
    return to_fp8(x, scale)


def dequantize_kv_fp8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_kv_fp8`: x̂ = scale · q in fp32, returned as `dtype`."""
    return codes.float().mul_(scale).to(dtype)


def row_params_or_scale(
    params: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A cache's kernel operand beside its rows (`CacheRows.kernel_operands`) as the kernels'
    bindings take it, (per-row params, per-tensor scale): fp16 (scale, zero) rows are params, a
    static KV8 cache's fp32 scale is the scale, and a dense cache has neither."""
    if params is not None and params.dtype == torch.float32:
        return None, params
    return params, None


class CacheRows(Protocol):
    """One layer's K (or V) cache rows, [num_kv_heads * num_slots] rows of head_dim values, in
    whatever storage format the cache uses. Here, beside the formats, because both sides meet on
    it: runner/kv_cache.py implements it, the attention layer and the kernels read and write it."""

    def store(self, index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Store rows x [*index.shape, head_dim] at cache rows `index`; returns them as reads will
        see them (x itself when the cache is not quantized)."""
        ...

    def read(self, index: torch.Tensor) -> torch.Tensor:
        """The rows at `index`, [*index.shape, head_dim] in the compute dtype."""
        ...

    def kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The storage as the CUDA kernels take it (the decode kernel reads it, the fused RoPE + KV
        write, `kernels/rope_kv.py`, writes it): (rows [num_rows, width], params), values in the
        compute dtype (params None), `quantize_kv` codes with fp16 (scale, zero) per row (params
        [num_rows, 2]), or per-tensor static KV8's int8 codes with the layer's fp32 scale (params
        0-d)."""
        ...
