"""Activation-aware channel reordering of down_proj inputs for g128 weights (QoQ).

g128 quantizes 128 consecutive input channels with one scale and zero. Sorting the input channels
by their activation maxima puts the salient ones together, so they share groups with each other
instead of widening the ranges of groups of quiet channels. The permutation is folded into the
layer that produces those channels (gate_proj and up_proj rows, whose SiLU · mul pairs channels
elementwise), so the runtime needs no gather. The residual-stream inputs (q/k/v, gate/up) are not
reordered: one permutation would have to serve every layer (QoQ's recipe skips them too).
"""

from __future__ import annotations

import torch

from omniserve.quantize.qoq.model import DOWN, GATE, UP, Layer


def salience_order(act_absmax: torch.Tensor) -> torch.Tensor:
    """Input channels by decreasing activation maximum: int64 [K] (stable, so ties keep order)."""
    return torch.sort(act_absmax, descending=True, stable=True).indices


def fold_down_permutation(layer: Layer, order: torch.Tensor) -> None:
    """Make down_proj input channel j the old channel order[j] (in place)."""
    for name in (GATE, UP):
        layer[f"{name}.weight"] = layer[f"{name}.weight"][order]
        if f"{name}.bias" in layer:
            layer[f"{name}.bias"] = layer[f"{name}.bias"][order]
    layer[f"{DOWN}.weight"] = layer[f"{DOWN}.weight"][:, order]
