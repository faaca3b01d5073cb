"""A stored weight in the quantized GEMM kernels' layout (packed by `kernels/gemm.py`, whose
module doc describes the layout). Its own module because both GEMM paths read it: the kernels
on the packed weight (gemm.py) and the CUTLASS path that gemm.py dispatches to (gemm_cutlass.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omniserve.formats.weight import QuantizedWeight, W8A8Weight


@dataclass(frozen=True)
class PackedWeight:
    """A stored weight in the kernels' layout (kernels/gemm.py); `fmt` names the stored format."""

    fmt: type[QuantizedWeight]
    weight: torch.Tensor
    """Packed tiles: uint8 [N, K/2] (W4) or int8 [N, K] (W8)."""
    scales: torch.Tensor
    """fp16 [N]: s1_scales (W4) or dequant_scale (W8)."""
    szeros: torch.Tensor | None = None
    """fp16 [N] s1_szeros (W4A8 per-channel only)."""
    groups: torch.Tensor | None = None
    """uint8 [K/128, N, 2] (s2_scales, s2_zeros) (W4A8 g128 only)."""

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the unquantized weight."""
        n, row = self.weight.shape
        return n, row * 2 if self.fmt is not W8A8Weight else row

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {"weight": self.weight, "scales": self.scales}
        named.update(
            {k: v for k, v in (("szeros", self.szeros), ("groups", self.groups)) if v is not None}
        )
        return named
