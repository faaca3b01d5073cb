"""Output error of a quantized linear on calibration activations, and weight clipping by grid search.

The error of a linear is measured where it matters, on its outputs over calibration tokens, with
the runtime's quantized input (per-token int8 for A8 precisions):

    E = X · Wᵀ − X̂ · Ŵᵀ      X: fp inputs [T, K],  X̂: their per-token int8 dequantization

Because every stored format's scales and zeros belong to one output channel (g128's groups lie
inside a row), row n of Ŵ depends only on row n of W and its clipping ratio, and column n of E only
on row n of Ŵ. So the best ratio of each output channel is found independently, in one sweep over
the grid: quantize the whole W at ratio r, keep, per channel, the r with the smallest Σ_t E[t, n]².
Ratio 1 (no clipping, plain RTN) is always on the grid, so clipping never does worse than RTN on
the calibration sample (QoQ's recipe: grid search on the output error).
"""

from __future__ import annotations

import torch

from omniserve.formats.activation import quantize_per_token
from omniserve.formats.precision import Precision
from omniserve.formats.weight import weight_grid


def runtime_input(x: torch.Tensor, precision: Precision) -> torch.Tensor:
    """X̂: what the linear computes with at `precision` (x itself for 16-bit activations)."""
    return quantize_per_token(x).dequantize() if precision.act_bits == 8 else x


def channel_errors(
    x: torch.Tensor, x_hat: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor
) -> torch.Tensor:
    """Σ_t E[t, n]² per output channel n [N] (see the module doc)."""
    return (x @ w.t() - x_hat @ w_hat.t()).pow(2).sum(dim=0)


def relative_error(
    x: torch.Tensor, x_hat: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor
) -> float:
    """‖E‖ / ‖X · Wᵀ‖ over the sample."""
    return float(channel_errors(x, x_hat, w, w_hat).sum().sqrt() / (x @ w.t()).norm())


def clip_grid(min_ratio: float, steps: int) -> list[float]:
    """`steps` ratios evenly from 1 down to `min_ratio` (1 first)."""
    if not 0.0 < min_ratio <= 1.0:
        raise ValueError(f"clip min ratio must be in (0, 1], got {min_ratio}")
    if steps < 1:
        raise ValueError(f"clip steps must be >= 1, got {steps}")
    if steps == 1:
        return [1.0]
    return [1.0 - (1.0 - min_ratio) * i / (steps - 1) for i in range(steps)]


def search_clip(
    w: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor, precision: Precision, ratios: list[float]
) -> torch.Tensor:
    """Per-output-channel clipping ratios [N] from `ratios` that minimise the output error of W
    [N, K] on inputs x [T, K], quantized to x_hat (`runtime_input`) (module doc)."""
    reference = x @ w.t()
    best_ratio = torch.ones(w.shape[0], device=w.device)
    best_error = torch.full((w.shape[0],), float("inf"), device=w.device)
    for ratio in ratios:
        clip = torch.full_like(best_ratio, ratio)
        w_hat = weight_grid(w, precision, clip).fake_quantize(w)
        error = (reference - x_hat @ w_hat.t()).pow(2).sum(dim=0)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, clip, best_ratio)
    return best_ratio
