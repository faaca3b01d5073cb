"""Gated activation of the fused gate/up projection (the formula: `formats.activation`)."""

from __future__ import annotations

import torch
from torch import nn

from omniserve.formats.activation import silu_and_mul


class SiluAndMul(nn.Module):
    """silu(gate) * up, where the input is [..., 2 * d] = concat(gate, up)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)
