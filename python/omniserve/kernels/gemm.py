"""Quantized GEMMs on CUDA (W8A8, W4A8 per-channel, W4A8 g128) next to their references.

The references are `omniserve.formats.gemm` (exact integer cores + float epilogues); the CUDA
kernels (`cuda/gemm_*.cu`; design in `cuda/gemm/qgemm.cuh`, kernels in `cuda/gemm/small_m.cuh` and
`cuda/gemm/tensor_core.cuh`, choice in `cuda/gemm/dispatch.cuh`; from `gemm_cutlass.MIN_M` tokens,
CUTLASS on the weight expanded to int8, kernels/gemm_cutlass.py) compute the same int32
accumulators exactly and the same fp32 epilogue in the same operation order, then round once to
the output dtype.

The kernels read weights in their own layout (`PackedWeight`), packed once at load time by `pack`
from the stored formats of `formats/weight.py` (whose QServe layout checkpoints keep). Inside
every 128-wide K block, m16n8k32 step s, register half h and byte i of lane (g, t) take input
k = t·32 + s·8 + h·4 + i, so that each lane's operands are 16 contiguous bytes of row-major
activations and of a packed tile:

    tiles of 8 output × 128 input channels, row-major over [N/8][K/128]; lane = g·4 + t holds channel g
    W4 (512 B/tile):  lane·16 + s·4 + i  =  q[k] | q[k + 4] << 4,   k = t·32 + s·8 + i
    W8 (1 KiB/tile):  p·512 + lane·16 + b  =  w[t·32 + p·16 + b]
    g128 groups:      uint8 [K/128, N, 2] = (s2, s2_zeros) in natural column order

Fused projections (q/k/v, gate/up) are concatenated along N (`concat`), one launch per layer.
N and K must be multiples of 128 (`unsupported`); kernels/dispatch.py keeps other shapes on the
reference path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast

import torch

from omniserve.formats.activation import QuantizedActivation
from omniserve.formats.packing import (
    pack_w4,
    permute_group_columns,
    unpack_w4,
    unpermute_group_columns,
)
from omniserve.formats.precision import GROUP_SIZE_128
from omniserve.formats.weight import (
    QuantizedWeight,
    W4A8PerChannelWeight,
    W4A8PerGroupWeight,
    W8A8Weight,
)
from omniserve.kernels import gemm_cutlass
from omniserve.kernels.build import Extension
from omniserve.kernels.packed_weight import PackedWeight

EXTENSION = Extension(
    "omniserve_gemm",
    ("gemm_w8a8.cu", "gemm_w4a8_per_channel.cu", "gemm_w4a8_g128.cu", "gemm_ops.cpp"),
)

TILE_N = 128
"""The GEMM's N must be a multiple of this (the tensor-core kernel's block width, no N tail)."""
PACK_N = 8
"""A packed shard's N must be a multiple of this (the tile height), so shards concatenate."""
BLOCK_K = GROUP_SIZE_128
"""K must be a multiple of this (the kernels' K block: one g128 group)."""
MAX_G128_SCALE = 17
"""The kernel multiplies four codes per 32-bit word by s2; q · s2 ≤ 15 · 17 < 256 keeps lanes apart."""

KernelPath = Literal["auto", "small_m", "tensor_core", "cutlass"]
"""Which kernel runs: the dispatcher's choice (the memory-bound mma.sync kernel for M ≤ 32; the
wgmma tensor-core kernel above, at the tile its cost model prices cheapest; from
`gemm_cutlass.MIN_M` the CUTLASS path on the weight expanded to int8, where CUTLASS is installed),
or a forced one. `auto_choice` says which the dispatcher takes."""
Tile = tuple[int, int]
"""The tensor-core kernel's tile, forced with path "tensor_core" by tests and benchmarks: tokens per
block (64, 128 or 256) and blocks sharing one output tile through a K split (1 to 4); by default
the dispatcher chooses (cuda/gemm/dispatch.cuh `choose_tile`)."""
_PATHS: dict[str, int] = {"auto": 0, "small_m": 1, "tensor_core": 2}
"""Paths of the packed-weight extension (cuda/gemm/params.h `Path`); "cutlass" is its own."""
_FORMATS: dict[type, int] = {W8A8Weight: 0, W4A8PerChannelWeight: 1, W4A8PerGroupWeight: 2}
_OUT_KINDS: dict[torch.dtype, int] = {
    torch.int32: 0,
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
}

# Axes of codes.reshape(N/8, g=8, K/128, t=4, s=4, h=2, i=4) in W4 tile order (nb, kb, g, t, s, i, h):
# swapping g/kb and h/i is its own inverse.
_W4_PERM = (0, 2, 1, 3, 4, 6, 5)
# Axes of weight.reshape(N/8, g=8, K/128, t=4, p=2, b=16) in W8 tile order (nb, kb, p, g, t, b).
_W8_PERM = (0, 2, 4, 1, 3, 5)
_W8_INV_PERM = tuple(sorted(range(6), key=_W8_PERM.__getitem__))


def unsupported(shard_sizes: Sequence[int], k: int) -> str | None:
    """Why the kernels cannot take a weight of K inputs made of shards of these output sizes, None
    if they can: each shard must be a positive multiple of 8 (packable), their sum N and K
    positive multiples of 128."""
    n = sum(shard_sizes)
    if n <= 0 or n % TILE_N or k <= 0 or k % BLOCK_K:
        return f"[N, K] = [{n}, {k}] not supported (multiples of {TILE_N} and {BLOCK_K})"
    if not all(size > 0 and size % PACK_N == 0 for size in shard_sizes):
        return f"shards of N {list(shard_sizes)} not supported (multiples of {PACK_N})"
    return None


def pack(w: QuantizedWeight) -> PackedWeight:
    """Repack a stored weight (one shard: N a multiple of 8, K of 128) into the kernels' layout,
    on w's device; exact, no rounding."""
    n, k = w.shape
    if n % PACK_N or k % BLOCK_K:
        raise ValueError(
            f"the CUDA GEMM layout needs N a multiple of {PACK_N} and K of {BLOCK_K}; got [{n}, {k}]"
        )
    if isinstance(w, W8A8Weight):
        tiles = w.weight.reshape(n // 8, 8, k // BLOCK_K, 4, 2, 16).permute(_W8_PERM)
        return PackedWeight(W8A8Weight, tiles.reshape(n, k), w.dequant_scale)
    codes = unpack_w4(w.qweight).reshape(n // 8, 8, k // BLOCK_K, 4, 4, 2, 4).permute(_W4_PERM)
    packed = (codes[..., 0] | (codes[..., 1] << 4)).reshape(n, k // 2)
    if isinstance(w, W4A8PerChannelWeight):
        return PackedWeight(W4A8PerChannelWeight, packed, w.s1_scales, szeros=w.s1_szeros)
    s2 = unpermute_group_columns(w.s2_scales)
    if bool(((s2 < 1) | (s2 > MAX_G128_SCALE)).any()):
        raise ValueError(
            f"g128 group scales must lie in [1, {MAX_G128_SCALE}] for the CUDA kernel, found "
            f"[{int(s2.min())}, {int(s2.max())}]"
        )
    groups = torch.stack((s2, unpermute_group_columns(w.s2_zeros)), dim=-1).view(torch.uint8)
    return PackedWeight(W4A8PerGroupWeight, packed, w.s1_scales, groups=groups)


def unpack(p: PackedWeight) -> QuantizedWeight:
    """Exact inverse of `pack`: the stored format in its checkpoint layout."""
    n, k = p.shape
    if p.fmt is W8A8Weight:
        rows = p.weight.reshape(n // 8, k // BLOCK_K, 2, 8, 4, 16).permute(_W8_INV_PERM)
        return W8A8Weight(rows.reshape(n, k), p.scales)
    tiles = p.weight.reshape(n // 8, k // BLOCK_K, 8, 4, 4, 4)
    codes = torch.stack((tiles & 0x0F, tiles >> 4), dim=-1).permute(_W4_PERM).reshape(n, k)
    qweight = pack_w4(codes)
    if p.fmt is W4A8PerChannelWeight:
        assert p.szeros is not None
        return W4A8PerChannelWeight(qweight, p.scales, p.szeros)
    assert p.groups is not None
    groups = p.groups.view(torch.int8)
    return W4A8PerGroupWeight(
        qweight,
        p.scales,
        permute_group_columns(groups[..., 0].contiguous()),
        permute_group_columns(groups[..., 1].contiguous()),
    )


def concat(parts: Sequence[PackedWeight]) -> PackedWeight:
    """The packed weight of shards stacked along N (tiles are N-major, so packed rows stack too)."""
    if not parts:
        raise ValueError("concat needs at least one packed weight")
    fmt, k = parts[0].fmt, parts[0].shape[1]
    for part in parts:
        if part.fmt is not fmt or part.shape[1] != k:
            raise ValueError(
                f"cannot fuse {part.fmt.__name__} [N, {part.shape[1]}] with {fmt.__name__} [N, {k}]"
            )
    if len(parts) == 1:
        return parts[0]

    def cat(name: str, dim: int) -> torch.Tensor | None:
        tensors = [getattr(p, name) for p in parts]
        return None if tensors[0] is None else torch.cat(tensors, dim)

    # weight and scales are never None; `cat` returns None only for the optional fields.
    weight, scales = cast(torch.Tensor, cat("weight", 0)), cast(torch.Tensor, cat("scales", 0))
    return PackedWeight(fmt, weight, scales, cat("szeros", 0), cat("groups", 1))


def _run(
    x: QuantizedActivation,
    w: PackedWeight,
    out_dtype: torch.dtype,
    path: KernelPath,
    tile: Tile | None,
) -> torch.Tensor:
    if out_dtype not in _OUT_KINDS:
        raise ValueError(f"output dtype must be one of {list(_OUT_KINDS)}, got {out_dtype}")
    if path not in (*_PATHS, "cutlass"):
        raise ValueError(f"kernel path must be one of {[*_PATHS, 'cutlass']}, got {path!r}")
    if tile is not None and path != "tensor_core":
        raise ValueError(f"a tile is forced on the tensor_core path only, got path {path!r}")
    if x.q.shape[-1] != w.shape[1]:
        raise ValueError(f"activations have K = {x.q.shape[-1]}, the weight {w.shape[1]}")
    if _takes_cutlass(x.q.shape[0], out_dtype, path):
        return gemm_cutlass.gemm(_FORMATS[w.fmt], x, w, _OUT_KINDS[out_dtype])
    per_channel = w.fmt is W4A8PerChannelWeight
    return EXTENSION.load().gemm(
        _FORMATS[w.fmt],
        x.q,
        x.scales,
        x.sums if per_channel else None,
        w.weight,
        w.groups,
        w.scales,
        w.szeros,
        _OUT_KINDS[out_dtype],
        _PATHS[path],
        *(tile or (0, 0)),
    )


def _takes_cutlass(m: int, out_dtype: torch.dtype, path: KernelPath) -> bool:
    if path == "cutlass":
        if out_dtype == torch.int32:
            raise ValueError("the CUTLASS path does not expose int32 accumulators")
        return True
    return (
        path == "auto"
        and m >= gemm_cutlass.MIN_M
        and out_dtype != torch.int32
        and gemm_cutlass.available()
    )


def auto_choice(
    fmt: type[QuantizedWeight], m: int, n: int, k: int, out_dtype: torch.dtype = torch.bfloat16
) -> tuple[KernelPath, Tile | None]:
    """The kernel, and for the tensor-core kernel its tile, that path "auto" runs for an
    [M, K] x [K, N] GEMM of this weight format on the current CUDA device."""
    if out_dtype not in _OUT_KINDS:
        raise ValueError(f"output dtype must be one of {list(_OUT_KINDS)}, got {out_dtype}")
    if _takes_cutlass(m, out_dtype, "auto"):
        return "cutlass", None
    tokens, split = EXTENSION.load().auto_tile(_FORMATS[fmt], m, n, k, _OUT_KINDS[out_dtype])
    return ("small_m", None) if tokens == 0 else ("tensor_core", (tokens, split))


def resident_clusters(fmt: type[QuantizedWeight], tile: Tile) -> int:
    """Output tiles of the tensor-core kernel at `tile` (each a cluster of `split` blocks) that
    the current CUDA device runs at once: the waves of the dispatcher's tile cost model."""
    return EXTENSION.load().resident_clusters(_FORMATS[fmt], *tile, _OUT_KINDS[torch.bfloat16])


def unpack_int8(w: PackedWeight) -> torch.Tensor:
    """int8 [N, K] operand B of the integer core (W8 codes, W4 codes, g128's level-1 w8) as the
    CUTLASS path expands it on the GPU (debug entry: equals `formats.gemm`'s B exactly)."""
    return gemm_cutlass.unpack_int8(_FORMATS[w.fmt], w)


def quantized_gemm(
    x: QuantizedActivation,
    w: PackedWeight,
    out_dtype: torch.dtype,
    path: KernelPath = "auto",
    tile: Tile | None = None,
) -> torch.Tensor:
    """y [M, N] in `out_dtype` (fp32, fp16 or bf16) = `formats.gemm.quantized_linear(x, unpack(w))`
    rounded once to `out_dtype` (CUDA tensors only)."""
    if out_dtype == torch.int32:
        raise ValueError("quantized_gemm returns floats; int_accumulator returns the int32 cores")
    return _run(x, w, out_dtype, path, tile)


def int_accumulator(
    x: QuantizedActivation, w: PackedWeight, path: KernelPath = "auto", tile: Tile | None = None
) -> torch.Tensor:
    """The kernels' int32 accumulators Σ_k x_q · B (B: W8 codes, W4 codes, or g128's w8), [M, N]:
    the debug entry that pins the integer core to `formats.gemm.int_matmul` exactly."""
    return _run(x, w, torch.int32, path, tile)
