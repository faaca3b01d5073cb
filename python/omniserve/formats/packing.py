"""QServe's compute-aware uint4 weight layout and the g128 scale column order
(docs/formats.md#w4-packing).

Weights: codes q [N, K] (uint4 values in a uint8 tensor) are packed into `qweight` uint8 [N, K/2],
two codes per byte, in 32×32 tiles (32 output × 32 input channels = 512 bytes). Inside a tile the
output index is oc = a·16 + b·8 + c (a, b ∈ {0, 1}, c ∈ [0, 8)) and the input index is
ic = d·16 + e·4 + f (d ∈ {0, 1}, e, f ∈ [0, 4)). Bytes are ordered

    tile (oc/32, ic/32), then c, e, d, b, f          byte = q[a=0] | q[a=1] << 4

so the low nibble holds channel oc and the high nibble channel oc + 16. Tiles are in row-major
[N/32][K/32] order and the flat byte stream is viewed as [N, K/2]: a row of `qweight` is *not* one
output channel. Why: one 128-bit load per thread gives exactly the B fragments of two
mma.m16n8k32 n8 tiles, and `w & 0x0F0F0F0F` / `(w >> 4) & 0x0F0F0F0F` turn a 32-bit word into
four int8 lanes each for channels c and c + 16 without per-element shifts.

g128 scales and zeros: `s2_scales` / `s2_zeros` are [K/128, N] and inside every block of 32 output
columns stored in the order 0, 8, 16, 24, 1, 9, 17, 25, … (position p = c·4 + r holds column
r·8 + c), matching the mma accumulator lanes.

QServe's zoo stores `qweight` as int8; the bytes are the same and `.view(torch.uint8)` converts.
"""

from __future__ import annotations

import torch

TILE = 32
"""Tile edge of the packed layout, in channels; N and K must be multiples of it."""

# Axes of q.reshape(N/32, a, b, c, K/32, d, e, f) in packed byte order (n, k, c, e, d, b, f, a).
_TILE_DIMS = (2, 2, 8, 2, 4, 4)  # a, b, c | d, e, f
_PERM = (0, 4, 3, 6, 5, 2, 7, 1)
_INV_PERM = tuple(sorted(range(8), key=_PERM.__getitem__))


def _check_multiple(name: str, value: int, multiple: int) -> None:
    if value % multiple != 0:
        raise ValueError(f"{name} = {value} must be a multiple of {multiple} for the QServe layout")


def pack_w4(q: torch.Tensor) -> torch.Tensor:
    """Pack uint4 codes q (uint8 [N, K], values 0..15) into QServe's qweight (uint8 [N, K/2])."""
    if q.dim() != 2 or q.dtype != torch.uint8:
        raise ValueError(f"expected uint8 codes [N, K], got {q.dtype} {tuple(q.shape)}")
    n, k = q.shape
    _check_multiple("N (output channels)", n, TILE)
    _check_multiple("K (input channels)", k, TILE)
    if q.numel() and int(q.max()) > 15:
        raise ValueError(f"uint4 codes must lie in [0, 15], found {int(q.max())}")
    a, b, c, d, e, f = _TILE_DIMS
    t = q.reshape(n // TILE, a, b, c, k // TILE, d, e, f).permute(_PERM)
    return (t[..., 0] | (t[..., 1] << 4)).reshape(n, k // 2)


def unpack_w4(qweight: torch.Tensor) -> torch.Tensor:
    """Exact inverse of `pack_w4`: uint8 [N, K/2] → codes uint8 [N, K]."""
    if qweight.dim() != 2 or qweight.dtype != torch.uint8:
        raise ValueError(
            f"expected packed uint8 [N, K/2], got {qweight.dtype} {tuple(qweight.shape)}"
        )
    n, k = qweight.shape[0], qweight.shape[1] * 2
    _check_multiple("N (output channels)", n, TILE)
    _check_multiple("K (input channels)", k, TILE)
    a, b, c, d, e, f = _TILE_DIMS
    nib = torch.stack((qweight & 0x0F, qweight >> 4), dim=-1)
    t = nib.reshape(n // TILE, k // TILE, c, e, d, b, f, a).permute(_INV_PERM)
    return t.reshape(n, k)


def permute_group_columns(t: torch.Tensor) -> torch.Tensor:
    """[G, N] in natural column order → QServe's order (0, 8, 16, 24, 1, 9, … per 32 columns)."""
    g, n = _group_shape(t)
    return t.reshape(g, n // TILE, 4, 8).transpose(-2, -1).reshape(g, n)


def unpermute_group_columns(t: torch.Tensor) -> torch.Tensor:
    """Exact inverse of `permute_group_columns`."""
    g, n = _group_shape(t)
    return t.reshape(g, n // TILE, 8, 4).transpose(-2, -1).reshape(g, n)


def _group_shape(t: torch.Tensor) -> tuple[int, int]:
    if t.dim() != 2:
        raise ValueError(f"expected group tensor [K/128, N], got shape {tuple(t.shape)}")
    _check_multiple("N (output channels)", t.shape[1], TILE)
    return t.shape[0], t.shape[1]
