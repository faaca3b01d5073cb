"""Block-input rotation of the residual stream (QoQ; QuaRot-style, fused offline).

With R orthogonal [H, H], the model computes the same function on the rotated residual x' = x · R:
RMSNorm commutes with R once its gain g is folded into the linears that read it (‖x R‖ = ‖x‖), so

    embedding E → E · R,       readers W (q/k/v, gate/up, lm_head) → W · diag(g) · R,  g → 1,
    writers   W (o_proj, down_proj) → Rᵀ · W,   their biases b → b · R.

Outliers of a few residual channels are spread over all of them, so every reader's per-token int8
input and per-channel weight ranges shrink. Tied embeddings are untied: the embedding is E R while
lm_head becomes E diag(g) R.

R = D · (H_p ⊗ O_m) / √p with H = 2^k · m (m odd): D random ±1 signs, H_p the Sylvester Hadamard
matrix of the largest power-of-two factor p = 2^k, O_m a random orthogonal m × m matrix (QR of a
Gaussian, signs fixed), all drawn from `seed`. For power-of-two sizes (Llama: 4096, 8192) m = 1 and
R is a random-sign Hadamard, whose entries all have magnitude 1/√H: the most even spreading there
is. Hadamard matrices of other orders (12, 20, ...) need tables; the Kronecker factor keeps the
Hadamard's mixing across the 2^k blocks, and m is small (5 for Llama-2-13B's 5120, 7 for 3584).
"""

from __future__ import annotations

from typing import Any

import torch

from omniserve.quantize.qoq.model import (
    DOWN,
    GATE,
    INPUT_NORM,
    POST_NORM,
    UP,
    K,
    Layer,
    O,
    Q,
    V,
)


def hadamard(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order n (a power of two), fp64 ±1 entries."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard matrices have power-of-two orders, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def random_rotation(n: int, seed: int) -> torch.Tensor:
    """The orthogonal R [n, n] of the module doc, fp64 on the CPU."""
    if n < 1:
        raise ValueError(f"rotation size must be positive, got {n}")
    generator = torch.Generator().manual_seed(seed)
    power = n & -n  # the largest power-of-two factor
    m = n // power
    core = hadamard(power) / power**0.5
    if m > 1:
        gaussian = torch.randn(m, m, generator=generator, dtype=torch.float64)
        o, r = torch.linalg.qr(gaussian)
        core = torch.kron(core, (o * torch.sign(torch.diagonal(r)).unsqueeze(0)).contiguous())
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    return signs.unsqueeze(1) * core


def describe(n: int, seed: int) -> dict[str, Any]:
    """The recipe entry of `random_rotation(n, seed)`."""
    power = n & -n
    kind = "hadamard" if power == n else f"hadamard{power}_kron_orthogonal{n // power}"
    return {"kind": kind, "seed": seed, "size": n}


def fold_norm(weight: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """A reader's weight [N, H] with the RMSNorm gain [H] folded in: W · diag(g)."""
    return weight * gain.unsqueeze(0)


def rotate_readers(weight: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """W · R for a weight [N, H] that reads the residual stream (fp32 result)."""
    return weight.float() @ rotation.to(weight.device, torch.float32)


def rotate_layer(layer: Layer, rotation: torch.Tensor) -> None:
    """Fold both norms into their readers and rotate the layer's residual reads and writes
    (in place; the norms become ones)."""
    r = rotation.to(layer[INPUT_NORM].device, torch.float32)
    for norm, readers in ((INPUT_NORM, (Q, K, V)), (POST_NORM, (GATE, UP))):
        gain = layer[norm]
        for name in readers:
            layer[f"{name}.weight"] = fold_norm(layer[f"{name}.weight"], gain) @ r
        layer[norm] = torch.ones_like(gain)
    for name in (O, DOWN):
        layer[f"{name}.weight"] = r.t() @ layer[f"{name}.weight"]
        if f"{name}.bias" in layer:
            layer[f"{name}.bias"] = layer[f"{name}.bias"] @ r
