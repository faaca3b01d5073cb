"""GPTQ on the grid of the stored format (Frantar et al., 2022; QoQ's `enable_kernel_gptq`).

The scales and zeros stay those of the (clipped) RTN weight (`WeightGrid`, formats/weight.py):
GPTQ only chooses the codes, column by column, and spreads each column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs (H = Σ xᵀ x), so
that the output error X · (W − Ŵ)ᵀ rather than the weight error is minimised. Keeping the RTN grid
makes the result exactly a stored format of the same precision and group size (g128 groups are
"static": their level-2 ranges come from the original weight).

Standard choices: dampening λ = damp · mean(diag H) added to the diagonal, blocks of 128 columns
with lazy updates of the rest, columns of dead inputs (H_jj = 0) zeroed, natural column order.
"""

from __future__ import annotations

import torch

from omniserve.formats.weight import WeightGrid


def gptq_codes(
    w: torch.Tensor,
    hessian: torch.Tensor,
    grid: WeightGrid,
    damp: float = 0.01,
    block: int = 128,
) -> torch.Tensor:
    """Codes [N, K] of W [N, K] on `grid`, chosen by GPTQ with the input Hessian [K, K]."""
    n, k = w.shape
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"GPTQ: Hessian {tuple(hessian.shape)} does not match weight [{n}, {k}]")
    if damp <= 0:
        raise ValueError(f"GPTQ dampening must be positive, got {damp}")
    w = w.float().clone()
    h = hessian.float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * float(torch.diagonal(h).mean()))
    # Upper Cholesky factor of H⁻¹: row i holds the updates quantizing column i implies.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes: torch.Tensor | None = None
    for start in range(0, k, block):
        end = min(start + block, k)
        wb = w[:, start:end].clone()
        errors = torch.empty_like(wb)
        hb = hinv[start:end, start:end]
        for i in range(end - start):
            column = wb[:, i : i + 1]
            q = grid.codes(column, start + i)
            if codes is None:  # the grid's code dtype
                codes = torch.empty(n, k, dtype=q.dtype, device=w.device)
            codes[:, start + i : start + i + 1] = q
            err = (column - grid.dequantize(q, start + i)) / hb[i, i]
            wb[:, i:] -= err @ hb[i : i + 1, i:]
            errors[:, i : i + 1] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    assert codes is not None  # k ≥ 1
    return codes
