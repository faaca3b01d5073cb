"""Round-to-nearest (RTN) primitives shared by the activation and weight quantizers.

Every quantizer of this package is one of two formulas, applied along the last dimension of a
tensor (a token row, an output-channel row, or a 128-wide group of one):

Symmetric, signed (activations, W8A8 weights, the int8 level of g128 weights):

    s = fp16_ceil(absmax(x) / Qmax)        q = round(x / s) ∈ [−Qmax, Qmax]        x̂ = s · q

Asymmetric, unsigned with an integer zero point (uint4 weights), range widened to contain 0:

    lo = min(min(x), 0)    hi = max(max(x), 0)    s ≥ (hi − lo) / Q
    z = round(−lo / s) ∈ [0, Q]                   q = clamp(round(x / s) + z, 0, Q)      x̂ = s · (q − z)

Why the scale is rounded *up* to fp16 (`fp16_ceil`) and q is computed from the stored scale:
quantization then sees exactly the scale dequantization uses, and |x| / s ≤ Qmax (symmetric) or
x / s + z ∈ [−1/2, Q + 1/2] (asymmetric: lo/s + z ∈ [−1/2, 1/2] by the rounding of z, and
(hi − lo)/s ≤ Q), so clamping never moves a value further than rounding does and

    |x − x̂| ≤ s / 2   for every element (up to fp32 rounding of x / s).

A nearest-rounded fp16 scale can be up to 2^-11 too small, which lets codes overflow by one and
breaks that bound; rounding up costs at most 2^-10 relative scale. Including 0 in [lo, hi] keeps
z in [0, Q] for rows that do not straddle 0 (QServe's zoo weights straddle 0 anyway). The scale
floor 2^-14 (fp16's smallest normal) keeps 1/s finite for an all-zero row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MIN_SCALE = 2.0**-14
"""Smallest scale produced: fp16's smallest normal number."""


def fp16_ceil(ratio: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value ≥ max(ratio, MIN_SCALE) (ratio computed in fp32)."""
    r = ratio.float().clamp_min(MIN_SCALE)
    h = r.half()
    return torch.where(h.float() < r, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def quantize_symmetric(
    x: torch.Tensor,
    qmax: int,
    clip: torch.Tensor | None = None,
    reduce_absmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed RTN along the last dim: returns (q int8 [..., n], scale fp16 [...]); see module doc.

    `clip` [...] in (0, 1] shrinks each row's range to clip · absmax (weight clipping): values
    beyond it saturate at ±qmax, trading their error for a finer step everywhere else.
    `reduce_absmax` maps the rows' absmax before the scale is taken (rows split over ranks: the
    maximum over every rank's part).
    """
    xf = x.float()
    absmax = xf.abs().amax(dim=-1)
    if reduce_absmax is not None:
        absmax = reduce_absmax(absmax)
    scale = fp16_ceil((absmax if clip is None else absmax * clip) / qmax)
    return symmetric_codes(xf, scale, qmax), scale


def symmetric_codes(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Signed RTN codes for a given scale (one per row of the last dim): int8 [..., n] in
    [−qmax, qmax], q = clamp(round(x / s), −qmax, qmax)."""
    q = torch.round(x.float() / scale.float().unsqueeze(-1)).clamp_(-qmax, qmax)
    return q.to(torch.int8)


def asymmetric_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) along the last dim, widened to contain 0: lo = min(min x, 0), hi = max(max x, 0)."""
    return x.amin(dim=-1).clamp(max=0), x.amax(dim=-1).clamp(min=0)


def asymmetric_codes(
    x: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, levels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned RTN codes for a given scale ≥ (hi − lo) / levels (one per row of the last dim).

    Returns (q uint8 [..., n] in [0, levels], z int32 [...] in [0, levels]), with
    z = round(−lo / s) and q = clamp(round(x / s) + z, 0, levels). Computed in fp32: callers
    pass fp16 scales or small integers, whose quotients fp32 rounds only in the last bit.
    """
    s = scale.float()
    z = torch.round(-lo.float() / s).clamp_(0, levels)
    q = (torch.round(x.float() / s.unsqueeze(-1)) + z.unsqueeze(-1)).clamp_(0, levels)
    return q.to(torch.uint8), z.to(torch.int32)
