"""Quantized linear-weight formats and their round-to-nearest (RTN) quantizers
(docs/formats.md#weight-formats).

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

FP8 (`Fp8Weight`, the `fp8` precision): e4m3 per channel under an fp32 scale (fp8.py),
    weight = e4m3(W / s),  s = weight_scale = max_k |W| / 448,  Ŵ = s · weight.

The QoQ quantizer (qoq/) changes W (rotation, smoothing) and the ranges (per-row clipping ratios
`clip`) before these formulas, and GPTQ chooses the codes on the grid they define (`WeightGrid`);
the stored formats and dequantization stay these.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch

from omniserve.formats.fp8 import FP8_DTYPE, fp8_scales, to_fp8
from omniserve.formats.packing import (
    pack_w4,
    permute_group_columns,
    unpack_w4,
    unpermute_group_columns,
)
from omniserve.formats.precision import GROUP_SIZE_128, Precision
from omniserve.formats.rtn import (
    asymmetric_codes,
    asymmetric_range,
    fp16_ceil,
    quantize_symmetric,
    symmetric_codes,
)

W4_LEVELS = 15
"""uint4 codes span [0, 15]."""
PROTECTIVE_QMAX = 119
"""Level-1 int8 range of g128 weights, so that the level-2 intermediate stays within int8."""
W8_QMAX = 127

TensorSpec = tuple[torch.dtype, tuple[int, ...]]
"""(dtype, shape) a stored tensor must have."""

_W = TypeVar("_W", bound="_StoredWeight")


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

    def narrow(self: _W, dim: int, start: int, size: int) -> _W:
        """The weight of output channels (`dim` 0) or input channels (`dim` 1) [start, start +
        size), in this format: one rank's shard under tensor parallelism. The bounds must be
        multiples of the format's N or K multiple (its packed tile, or its group), so that codes,
        scales and zeros split whole and the shard's GEMM is the same integer arithmetic."""
        multiple = (self.N_MULTIPLE, self.K_MULTIPLE)[dim]
        if start % multiple or size % multiple or start + size > self.shape[dim]:
            raise ValueError(
                f"{type(self).__name__}: cannot take channels [{start}, {start + size}) of dim "
                f"{dim} (extent {self.shape[dim]}): the bounds must be multiples of {multiple}"
            )
        return self._narrow(dim, start, size)

    @abc.abstractmethod
    def _narrow(self: _W, dim: int, start: int, size: int) -> _W:
        """`narrow` after its checks."""


def _narrow_w4(qweight: torch.Tensor, dim: int, start: int, size: int) -> torch.Tensor:
    """Packed uint4 codes of a channel range: unpacked, cut and packed again (packing.py's tiles
    do not cut along channels)."""
    return pack_w4(unpack_w4(qweight).narrow(dim, start, size).contiguous())


def _narrow_groups(t: torch.Tensor, dim: int, start: int, size: int) -> torch.Tensor:
    """g128 group tensors [K/128, N] (QServe's column order) of an output (`dim` 0) or input
    (`dim` 1) channel range."""
    natural = unpermute_group_columns(t)
    part = (
        natural[:, start : start + size]
        if dim == 0
        else natural[start // GROUP_SIZE_128 : (start + size) // GROUP_SIZE_128]
    )
    return permute_group_columns(part.contiguous())


def _narrow_channels(t: torch.Tensor, dim: int, start: int, size: int) -> torch.Tensor:
    """A per-output-channel tensor [N] of a channel range: cut along N, whole along K."""
    return t[start : start + size].clone() if dim == 0 else t


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

    def _narrow(self, dim: int, start: int, size: int) -> W4A8PerChannelWeight:
        # A K range keeps every channel's scale and zero: its GEMM's zero correction then uses
        # the code sums of that range, and the ranks' partial outputs add up to the whole.
        return W4A8PerChannelWeight(
            _narrow_w4(self.qweight, dim, start, size),
            _narrow_channels(self.s1_scales, dim, start, size),
            _narrow_channels(self.s1_szeros, dim, start, size),
        )


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

    def _narrow(self, dim: int, start: int, size: int) -> W4A8PerGroupWeight:
        return W4A8PerGroupWeight(
            _narrow_w4(self.qweight, dim, start, size),
            _narrow_channels(self.s1_scales, dim, start, size),
            _narrow_groups(self.s2_scales, dim, start, size),
            _narrow_groups(self.s2_zeros, dim, start, size),
        )


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

    def _narrow(self, dim: int, start: int, size: int) -> W8A8Weight:
        return W8A8Weight(
            self.weight.narrow(dim, start, size).contiguous(),
            _narrow_channels(self.dequant_scale, dim, start, size),
        )


@dataclass(frozen=True)
class Fp8Weight(_StoredWeight):
    weight: torch.Tensor
    """float8_e4m3fn [N, K] codes."""
    weight_scale: torch.Tensor
    """fp32 [N]."""

    # cuBLAS's FP8 GEMM needs both dimensions in multiples of 16.
    N_MULTIPLE: ClassVar[int] = 16
    K_MULTIPLE: ClassVar[int] = 16

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape[0], self.weight.shape[1]

    @classmethod
    def tensor_specs(cls, n: int, k: int) -> dict[str, TensorSpec]:
        return {"weight": (FP8_DTYPE, (n, k)), "weight_scale": (torch.float32, (n,))}

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K]: Ŵ = s · weight."""
        return self.weight_scale.unsqueeze(1) * self.weight.float()

    def _narrow(self, dim: int, start: int, size: int) -> Fp8Weight:
        return Fp8Weight(
            self.weight.narrow(dim, start, size).contiguous(),
            _narrow_channels(self.weight_scale, dim, start, size),
        )


QuantizedWeight = W4A8PerChannelWeight | W4A8PerGroupWeight | W8A8Weight
"""The integer formats: what the integer GEMMs (gemm.py, kernels/gemm.py) read."""
StoredWeight = QuantizedWeight | Fp8Weight
"""Every stored format: what checkpoints hold and quantizers write."""


def weight_format(precision: Precision) -> type[StoredWeight]:
    """The stored format of a quantized-weight precision; ValueError for w16."""
    if precision.float8:
        return Fp8Weight
    if precision.weight_bits == 8:
        return W8A8Weight
    if precision.weight_bits == 4:
        return (
            W4A8PerGroupWeight if precision.group_size == GROUP_SIZE_128 else W4A8PerChannelWeight
        )
    raise ValueError(f"{precision.name} keeps the model's fp weights; there is no quantized format")


class WeightGrid(abc.ABC):
    """The scales and zeros of one weight [N, K] in a stored format, apart from its codes.

    RTN is `grid.pack(grid.codes(W, 0))`. Splitting the two lets GPTQ (qoq/gptq.py) choose the
    codes of each column on the grid of the (clipped) RTN weight while it updates the columns not
    yet quantized, and still produce exactly this format. `codes(w, start)` takes the columns
    [start, start + n) of a weight: any span for per-channel grids, and for g128 either a span
    inside one group or whole groups.
    """

    @abc.abstractmethod
    def codes(self, w: torch.Tensor, start: int) -> torch.Tensor:
        """Integer codes [N, n] of the columns w [N, n] starting at column `start`."""

    @abc.abstractmethod
    def dequantize(self, q: torch.Tensor, start: int) -> torch.Tensor:
        """fp32 [N, n]: the stored format's Ŵ of the codes q of columns [start, start + n)."""

    @abc.abstractmethod
    def pack(self, q: torch.Tensor) -> StoredWeight:
        """The stored weight of the codes q [N, K] of every column."""

    def fake_quantize(self, w: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Ŵ fp32 of the columns w starting at `start`: what the stored weight dequantizes to."""
        return self.dequantize(self.codes(w, start), start)


@dataclass(frozen=True)
class W4PerChannelGrid(WeightGrid):
    s1: torch.Tensor
    """fp16 [N]."""
    lo: torch.Tensor
    """fp32 [N], the (clipped) row minimum ∪ {0} that sets the zero point z = round(−lo / s1)."""

    def codes(self, w: torch.Tensor, start: int) -> torch.Tensor:
        return asymmetric_codes(w, self.s1, self.lo, W4_LEVELS)[0]

    def _szeros(self) -> torch.Tensor:
        z = asymmetric_codes(self.lo.unsqueeze(-1), self.s1, self.lo, W4_LEVELS)[1]
        return (z.float() * self.s1.float()).half()

    def dequantize(self, q: torch.Tensor, start: int) -> torch.Tensor:
        return self.s1.float().unsqueeze(1) * q.float() - self._szeros().float().unsqueeze(1)

    def pack(self, q: torch.Tensor) -> W4A8PerChannelWeight:
        return W4A8PerChannelWeight(pack_w4(q), self.s1, self._szeros())


@dataclass(frozen=True)
class W4ProgressiveGrid(WeightGrid):
    s1: torch.Tensor
    """fp16 [N], level-1 scale (protective int8 range)."""
    s2: torch.Tensor
    """int32 [N, K/128], level-2 group scale."""
    lo: torch.Tensor
    """int32 [N, K/128], group minimum of the level-1 codes ∪ {0}: z = round(−lo / s2)."""

    def _groups(self, w: torch.Tensor, start: int) -> tuple[torch.Tensor, slice]:
        """w [N, n] as [N, groups, len] and the groups it covers (a span in one group or whole
        groups, see WeightGrid)."""
        n, width = w.shape
        first = start // GROUP_SIZE_128
        if start % GROUP_SIZE_128 == 0 and width % GROUP_SIZE_128 == 0:
            count = width // GROUP_SIZE_128
            return w.reshape(n, count, GROUP_SIZE_128), slice(first, first + count)
        if (start + width - 1) // GROUP_SIZE_128 != first:
            raise ValueError(
                f"columns [{start}, {start + width}) straddle a 128-group; pass whole groups "
                "or a span inside one"
            )
        return w.unsqueeze(1), slice(first, first + 1)

    def codes(self, w: torch.Tensor, start: int) -> torch.Tensor:
        q1 = symmetric_codes(w, self.s1, PROTECTIVE_QMAX).to(torch.int32)
        groups, g = self._groups(q1, start)
        q, _ = asymmetric_codes(groups, self.s2[:, g], self.lo[:, g], W4_LEVELS)
        return q.reshape(w.shape)

    def _int8(self, q: torch.Tensor, start: int) -> torch.Tensor:
        """w8 = s2 · (q − z) [N, n] (exact integers)."""
        groups, g = self._groups(q.to(torch.int32), start)
        s2 = self.s2[:, g]
        z = torch.round(-self.lo[:, g].float() / s2.float()).clamp_(0, W4_LEVELS).to(torch.int32)
        return (s2.unsqueeze(-1) * (groups - z.unsqueeze(-1))).reshape(q.shape)

    def dequantize(self, q: torch.Tensor, start: int) -> torch.Tensor:
        return self.s1.float().unsqueeze(1) * self._int8(q, start).float()

    def pack(self, q: torch.Tensor) -> W4A8PerGroupWeight:
        _, z = asymmetric_codes(self.lo.unsqueeze(-1), self.s2, self.lo, W4_LEVELS)
        return W4A8PerGroupWeight(
            pack_w4(q),
            self.s1,
            permute_group_columns(self.s2.t().to(torch.int8)),
            permute_group_columns((-z * self.s2).t().to(torch.int8)),
        )


@dataclass(frozen=True)
class W8Grid(WeightGrid):
    s: torch.Tensor
    """fp16 [N]."""

    def codes(self, w: torch.Tensor, start: int) -> torch.Tensor:
        return symmetric_codes(w, self.s, W8_QMAX)

    def dequantize(self, q: torch.Tensor, start: int) -> torch.Tensor:
        return self.s.float().unsqueeze(1) * q.float()

    def pack(self, q: torch.Tensor) -> W8A8Weight:
        return W8A8Weight(q.to(torch.int8), self.s)


@dataclass(frozen=True)
class Fp8Grid(WeightGrid):
    s: torch.Tensor
    """fp32 [N]."""

    def codes(self, w: torch.Tensor, start: int) -> torch.Tensor:
        return to_fp8(w, self.s)

    def dequantize(self, q: torch.Tensor, start: int) -> torch.Tensor:
        return self.s.unsqueeze(1) * q.float()

    def pack(self, q: torch.Tensor) -> Fp8Weight:
        return Fp8Weight(q.to(FP8_DTYPE), self.s)


def w4_per_channel_grid(w: torch.Tensor, clip: torch.Tensor | None = None) -> W4PerChannelGrid:
    """The uint4 per-channel grid of W [N, K] (N, K multiples of 32); `clip` [N] in (0, 1]
    shrinks each row's range [lo, hi] (weight clipping)."""
    _check_weight(w, W4A8PerChannelWeight, clip)
    lo, hi = asymmetric_range(w.float())
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    return W4PerChannelGrid(fp16_ceil((hi - lo) / W4_LEVELS), lo)


def w4_progressive_grid(w: torch.Tensor, clip: torch.Tensor | None = None) -> W4ProgressiveGrid:
    """The progressive g128 grid of W [N, K] (N multiple of 32, K of 128); `clip` [N] in (0, 1]
    shrinks each row's level-1 range (see the module doc for both levels)."""
    _check_weight(w, W4A8PerGroupWeight, clip)
    n, k = w.shape
    q1, s1 = quantize_symmetric(w, PROTECTIVE_QMAX, clip)
    groups = q1.to(torch.int32).reshape(n, k // GROUP_SIZE_128, GROUP_SIZE_128)
    lo, hi = asymmetric_range(groups)
    s2 = torch.div(hi - lo + W4_LEVELS - 1, W4_LEVELS, rounding_mode="floor").clamp_(min=1)
    return W4ProgressiveGrid(s1, s2, lo)


def w8_grid(w: torch.Tensor, clip: torch.Tensor | None = None) -> W8Grid:
    """The int8 symmetric per-channel grid of W [N, K]; `clip` [N] in (0, 1] shrinks each row's
    range."""
    _check_weight(w, W8A8Weight, clip)
    return W8Grid(quantize_symmetric(w, W8_QMAX, clip)[1])


def fp8_grid(w: torch.Tensor, clip: torch.Tensor | None = None) -> Fp8Grid:
    """The e4m3 per-channel grid of W [N, K] (N, K multiples of 16); `clip` [N] in (0, 1] shrinks
    each row's range (codes beyond it saturate at ±448)."""
    _check_weight(w, Fp8Weight, clip)
    return Fp8Grid(fp8_scales(w, clip))


def weight_grid(
    w: torch.Tensor, precision: Precision, clip: torch.Tensor | None = None
) -> WeightGrid:
    """The grid of W [N, K] in the stored format of `precision` (ValueError for w16)."""
    fmt = weight_format(precision)
    if fmt is Fp8Weight:
        return fp8_grid(w, clip)
    if fmt is W8A8Weight:
        return w8_grid(w, clip)
    if fmt is W4A8PerGroupWeight:
        return w4_progressive_grid(w, clip)
    return w4_per_channel_grid(w, clip)


def quantize_w4a8_per_channel(
    w: torch.Tensor, clip: torch.Tensor | None = None
) -> W4A8PerChannelWeight:
    """RTN uint4 per output channel of W [N, K] (N, K multiples of 32)."""
    grid = w4_per_channel_grid(w, clip)
    return grid.pack(grid.codes(w, 0))


def quantize_w4a8_g128(w: torch.Tensor, clip: torch.Tensor | None = None) -> W4A8PerGroupWeight:
    """Progressive RTN of W [N, K] (N multiple of 32, K multiple of 128); see the module doc."""
    grid = w4_progressive_grid(w, clip)
    return grid.pack(grid.codes(w, 0))


def quantize_w8a8(w: torch.Tensor, clip: torch.Tensor | None = None) -> W8A8Weight:
    """RTN int8 per output channel of W [N, K]."""
    grid = w8_grid(w, clip)
    return grid.pack(grid.codes(w, 0))


def quantize_weight(
    w: torch.Tensor, precision: Precision, clip: torch.Tensor | None = None
) -> StoredWeight:
    """RTN-quantize W [N, K] into the stored format of `precision`; `clip` [N] in (0, 1] are
    per-row clipping ratios (None: no clipping)."""
    grid = weight_grid(w, precision, clip)
    return grid.pack(grid.codes(w, 0))


def _check_weight(
    w: torch.Tensor, fmt: type[StoredWeight], clip: torch.Tensor | None = None
) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a float weight [N, K], got {w.dtype} {tuple(w.shape)}")
    fmt.check_shape(w.shape[0], w.shape[1])
    if clip is not None and (
        tuple(clip.shape) != (w.shape[0],) or not bool(((clip > 0) & (clip <= 1)).all())
    ):
        raise ValueError(
            f"clip must hold one ratio in (0, 1] per output channel ({w.shape[0]}), got "
            f"{tuple(clip.shape)} with range [{float(clip.min()):.3g}, {float(clip.max()):.3g}]"
        )
