"""RMSNorm: the module holding the weight of `formats.activation.rms_norm` (the formula, HF's)."""

from __future__ import annotations

import torch
from torch import nn

from omniserve.formats.activation import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
