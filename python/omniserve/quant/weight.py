"""Quantized linear-weight formats and their round-to-nearest (RTN) quantizers (study §2.3–2.5).

A linear y = x · Wᵀ has W [N, K] (N output, K input channels). Each format is a frozen record of
exactly the tensors a checkpoint stores for that linear, under QServe's names, so that the zoo's
tensors drop in (qweight bytes reinterpreted as uint8, packing.py):

W4A8 per-channel (`W4A8PerChannelWeight`), uint4 with a per-channel scale and scaled zero:
    q = clamp(round(W / s1) + z, 0, 15)        s1_szeros = fp16(z · s1)
    Ŵ = s1 · q − s1_szeros                     (QoQ's "PostScale" zero)
    |W − Ŵ| ≤ s1 / 2 + 2^-11 · |s1_szeros|     (RTN, rtn.py, plus fp16 rounding of z · s1)

W4A8 g128, progressive (`W4A8PerGroupWeight`):
    level 1, per channel, symmetric int8 in the protective range ±119:
        q1 = round(W / s1) ∈ [−119, 119]                                      s1 fp16 [N]
    level 2, per 128 input channels of q1, uint4 with integer scale and zero:
        s2 = max(ceil((hi − lo) / 15), 1) ≤ ceil(238 / 15) = 16   (lo, hi: group range ∪ {0})
        z = round(−lo / s2),  q = clamp(round(q1 / s2) + z, 0, 15)
        s2_scales = s2, s2_zeros = −z · s2                                     int8 [K/128, N]
    int8 intermediate, "subtraction after multiplication":
        w8 = q · s2 + s2_zeros = s2 · (q − z)
    Ŵ = s1 · w8,    |W − Ŵ| ≤ s1 / 2 + s1 · s2 / 2
    Why ±119: |w8 − q1| ≤ s2 / 2 ≤ 8, so |w8| ≤ 127 and the intermediate is int8; likewise
    z · s2 ≤ −lo + s2 / 2 ≤ 127 fits s2_zeros, and q · s2 ≤ 240 fits a byte, which lets the kernel
    do the multiply four lanes per 32-bit word and add the zero with byte-wise (mod 256) adds.
    s2_* are stored transposed (group-major) with QServe's column permutation (packing.py).

W8A8 (`W8A8Weight`): symmetric int8 per channel,
    weight = round(W / s) ∈ [−127, 127],  s = dequant_scale fp16 [N],  Ŵ = s · weight,  |W − Ŵ| ≤ s / 2.

The QoQ quantizer (clipping, smoothing, rotation, GPTQ) changes W and the ranges before these
formulas; the stored formats and dequantization stay these.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from omniserve.quant.packing import (
    pack_w4,
    permute_group_columns,
    unpack_w4,
    unpermute_group_columns,
)
from omniserve.quant.precision import GROUP_SIZE_128, Precision
from omniserve.quant.rtn import asymmetric_codes, asymmetric_range, fp16_ceil, quantize_symmetric

W4_LEVELS = 15
"""uint4 codes span [0, 15]."""
PROTECTIVE_QMAX = 119
"""Level-1 int8 range of g128 weights, so that the level-2 intermediate stays within int8."""
W8_QMAX = 127

TensorSpec = tuple[torch.dtype, tuple[int, ...]]
"""(dtype, shape) a stored tensor must have."""


class _StoredWeight(abc.ABC):
    """Shared checks of the formats: every field is a stored tensor with a spec from (N, K)."""

    N_MULTIPLE: ClassVar[int]
    """N must be a multiple of this (the packed tile)."""
    K_MULTIPLE: ClassVar[int]
    """K must be a multiple of this (the packed tile or the group)."""

    @classmethod
    def check_shape(cls, n: int, k: int) -> None:
        """ValueError unless a [N, K] weight fits this format's layout."""
        if n <= 0 or k <= 0 or n % cls.N_MULTIPLE or k % cls.K_MULTIPLE:
            raise ValueError(
                f"{cls.__name__} needs N a positive multiple of {cls.N_MULTIPLE} and K of "
                f"{cls.K_MULTIPLE}; got [{n}, {k}]"
            )

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, int]:
        """(N, K) of the unquantized weight."""

    @classmethod
    @abc.abstractmethod
    def tensor_specs(cls, n: int, k: int) -> dict[str, TensorSpec]:
        """The stored tensors' (dtype, shape) for a weight [N, K], by name."""

    @abc.abstractmethod
    def dequantize(self) -> torch.Tensor:
        """Ŵ in fp32 [N, K]."""

    def __post_init__(self) -> None:
        lead = dataclasses.fields(self)[0].name  # type: ignore[arg-type]
        if getattr(self, lead).dim() != 2:
            raise ValueError(f"{type(self).__name__}.{lead} must be 2-D")
        self.check_shape(*self.shape)
        for name, (dtype, shape) in self.tensor_specs(*self.shape).items():
            t = getattr(self, name)
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(
                    f"{type(self).__name__}.{name}: expected {dtype} {shape}, "
                    f"got {t.dtype} {tuple(t.shape)}"
                )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by checkpoint name (suffix after the linear's prefix)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class W4A8PerChannelWeight(_StoredWeight):
    qweight: torch.Tensor
    """uint8 [N, K/2], packed uint4 codes (packing.py)."""
    s1_scales: torch.Tensor
    """fp16 [N]."""
    s1_szeros: torch.Tensor
    """fp16 [N], z · s1."""

    N_MULTIPLE: ClassVar[int] = 32
    K_MULTIPLE: ClassVar[int] = 32

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * 2

    @classmethod
    def tensor_specs(cls, n: int, k: int) -> dict[str, TensorSpec]:
        return {
            "qweight": (torch.uint8, (n, k // 2)),
            "s1_scales": (torch.float16, (n,)),
            "s1_szeros": (torch.float16, (n,)),
        }

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K]: Ŵ = s1 · q − s1_szeros."""
        q = unpack_w4(self.qweight).float()
        return self.s1_scales.float().unsqueeze(1) * q - self.s1_szeros.float().unsqueeze(1)


@dataclass(frozen=True)
class W4A8PerGroupWeight(_StoredWeight):
    qweight: torch.Tensor
    """uint8 [N, K/2], packed uint4 codes (packing.py)."""
    s1_scales: torch.Tensor
    """fp16 [N], level-1 scale."""
    s2_scales: torch.Tensor
    """int8 [K/128, N], group scales in QServe's column order."""
    s2_zeros: torch.Tensor
    """int8 [K/128, N], −z · s2 in QServe's column order."""

    N_MULTIPLE: ClassVar[int] = 32
    K_MULTIPLE: ClassVar[int] = GROUP_SIZE_128

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * 2

    @classmethod
    def tensor_specs(cls, n: int, k: int) -> dict[str, TensorSpec]:
        groups = (k // GROUP_SIZE_128, n)
        return {
            "qweight": (torch.uint8, (n, k // 2)),
            "s1_scales": (torch.float16, (n,)),
            "s2_scales": (torch.int8, groups),
            "s2_zeros": (torch.int8, groups),
        }

    def int8_weight(self) -> torch.Tensor:
        """The level-1 intermediate w8 = q · s2 + s2_zeros, int8 [N, K] (exact integers)."""
        n, k = self.shape
        q = unpack_w4(self.qweight).to(torch.int32).reshape(n, k // GROUP_SIZE_128, GROUP_SIZE_128)
        s2 = unpermute_group_columns(self.s2_scales).t().to(torch.int32).unsqueeze(-1)
        sz = unpermute_group_columns(self.s2_zeros).t().to(torch.int32).unsqueeze(-1)
        return (q * s2 + sz).reshape(n, k).to(torch.int8)

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K]: Ŵ = s1 · w8."""
        return self.s1_scales.float().unsqueeze(1) * self.int8_weight().float()


@dataclass(frozen=True)
class W8A8Weight(_StoredWeight):
    weight: torch.Tensor
    """int8 [N, K], symmetric codes in [−127, 127]."""
    dequant_scale: torch.Tensor
    """fp16 [N]."""

    N_MULTIPLE: ClassVar[int] = 1
    K_MULTIPLE: ClassVar[int] = 1

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape[0], self.weight.shape[1]

    @classmethod
    def tensor_specs(cls, n: int, k: int) -> dict[str, TensorSpec]:
        return {"weight": (torch.int8, (n, k)), "dequant_scale": (torch.float16, (n,))}

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K]: Ŵ = s · weight."""
        return self.dequant_scale.float().unsqueeze(1) * self.weight.float()


QuantizedWeight = W4A8PerChannelWeight | W4A8PerGroupWeight | W8A8Weight


def weight_format(precision: Precision) -> type[QuantizedWeight]:
    """The stored format of a quantized-weight precision; ValueError for w16."""
    if precision.weight_bits == 8:
        return W8A8Weight
    if precision.weight_bits == 4:
        return (
            W4A8PerGroupWeight if precision.group_size == GROUP_SIZE_128 else W4A8PerChannelWeight
        )
    raise ValueError(f"{precision.name} keeps the model's fp weights; there is no quantized format")


def quantize_w4a8_per_channel(w: torch.Tensor) -> W4A8PerChannelWeight:
    """RTN uint4 per output channel of W [N, K] (N, K multiples of 32)."""
    _check_weight(w, W4A8PerChannelWeight)
    lo, hi = asymmetric_range(w.float())
    s1 = fp16_ceil((hi - lo) / W4_LEVELS)
    q, z = asymmetric_codes(w, s1, lo, W4_LEVELS)
    return W4A8PerChannelWeight(pack_w4(q), s1, (z.float() * s1.float()).half())


def quantize_w4a8_g128(w: torch.Tensor) -> W4A8PerGroupWeight:
    """Progressive RTN of W [N, K] (N multiple of 32, K multiple of 128); see the module doc."""
    _check_weight(w, W4A8PerGroupWeight)
    n, k = w.shape
    q1, s1 = quantize_symmetric(w, PROTECTIVE_QMAX)
    groups = q1.to(torch.int32).reshape(n, k // GROUP_SIZE_128, GROUP_SIZE_128)
    lo, hi = asymmetric_range(groups)
    s2 = torch.div(hi - lo + W4_LEVELS - 1, W4_LEVELS, rounding_mode="floor").clamp_(min=1)
    q, z = asymmetric_codes(groups, s2, lo, W4_LEVELS)
    return W4A8PerGroupWeight(
        pack_w4(q.reshape(n, k)),
        s1,
        permute_group_columns(s2.t().to(torch.int8)),
        permute_group_columns((-z * s2).t().to(torch.int8)),
    )


def quantize_w8a8(w: torch.Tensor) -> W8A8Weight:
    """RTN int8 per output channel of W [N, K]."""
    _check_weight(w, W8A8Weight)
    q, s = quantize_symmetric(w, W8_QMAX)
    return W8A8Weight(q, s)


def quantize_weight(w: torch.Tensor, precision: Precision) -> QuantizedWeight:
    """RTN-quantize W [N, K] into the stored format of `precision`."""
    fmt = weight_format(precision)
    if fmt is W8A8Weight:
        return quantize_w8a8(w)
    if fmt is W4A8PerGroupWeight:
        return quantize_w4a8_g128(w)
    return quantize_w4a8_per_channel(w)


def _check_weight(w: torch.Tensor, fmt: type[QuantizedWeight]) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a float weight [N, K], got {w.dtype} {tuple(w.shape)}")
    fmt.check_shape(w.shape[0], w.shape[1])
