"""Fused activation-quantization kernels (cuda/fused_*.cu) against their torch references
(quant/activation.py) on the GPU: per-token int8 quantization and SiLU·mul + quant give equal codes,
scales and sums; RMSNorm + quant may move a code by one where its fp32 sum of squares, reduced in
another order than torch's, rounds a normalized value differently (bounded below)."""

from __future__ import annotations

import pytest
import torch
from omniserve.kernels import fused
from omniserve.layers.norm import RMSNorm
from omniserve.quant import activation
from omniserve.quant.activation import QuantizedActivation

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]
TOKENS = [1, 7, 64, 300]
HIDDEN = [8, 24, 4096, 14336]

RMSNORM_MISMATCH_RATE = 1e-3
"""Largest fraction of RMSNorm+quant codes allowed to differ (by one) from the reference."""


def _activations(
    tokens: int, hidden: int, dtype: torch.dtype, seed: int, decades: tuple[int, int] = (-2, 2)
) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g, device="cuda")
    # Rows of very different magnitudes (10^decades), and outlier channels as in real activations.
    x *= torch.logspace(*decades, tokens, device="cuda")[:, None]
    x[:, :: max(1, hidden // 5)] *= 20
    return x.to(dtype)


def _assert_equal(got: QuantizedActivation, want: QuantizedActivation) -> None:
    assert got.q.dtype == torch.int8 and got.scales.dtype == torch.float16
    assert got.sums.dtype == torch.int32
    assert torch.equal(got.scales, want.scales)
    assert torch.equal(got.q, want.q)
    assert torch.equal(got.sums, want.sums)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("tokens", TOKENS)
def test_quantize_per_token_equals_reference(tokens: int, hidden: int, dtype: torch.dtype) -> None:
    x = _activations(tokens, hidden, dtype, seed=tokens + hidden)
    _assert_equal(fused.quantize_per_token(x), activation.quantize_per_token(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("tokens", TOKENS)
def test_silu_mul_quant_equals_reference(tokens: int, hidden: int, dtype: torch.dtype) -> None:
    # Within fp16's range after the product (an inf would make the scale, and codes, undefined).
    gate_up = _activations(tokens, 2 * hidden, dtype, seed=3 * tokens + hidden, decades=(-2, 0))
    _assert_equal(fused.silu_mul_quant(gate_up), activation.silu_mul_quant(gate_up))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("tokens", TOKENS)
def test_rmsnorm_quant_matches_reference(tokens: int, hidden: int, dtype: torch.dtype) -> None:
    x = _activations(tokens, hidden, dtype, seed=7 * tokens + hidden)
    norm = RMSNorm(hidden, 1e-5).to("cuda")
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(hidden, device="cuda"))
    norm = norm.to(dtype)
    got, want = fused.rmsnorm_quant(x, norm), activation.rmsnorm_quant(x, norm)
    # A scale moves by at most one fp16 step (when a row's largest value rounds differently).
    steps = (got.scales.view(torch.int16).int() - want.scales.view(torch.int16).int()).abs()
    assert steps.max() <= 1
    diff = (got.q.int() - want.q.int()).abs()
    assert diff.max() <= 1
    same_scale = steps == 0
    assert (diff[same_scale] != 0).float().mean() <= RMSNORM_MISMATCH_RATE
    assert torch.equal(got.sums, got.q.sum(-1, dtype=torch.int32))
    # The kernel's codes quantize the reference's normalized values as well as the reference does.
    y = norm(x).float()
    err = (got.dequantize() - y).abs() - got.scales.float()[:, None] / 2
    assert err.max() <= 1e-2 * y.abs().max()


def test_strided_rows_are_read_in_place() -> None:
    wide = _activations(9, 4096 + 64, torch.bfloat16, seed=1)
    x = wide[:, 64:]  # row stride 4160, 16-byte aligned: no copy needed
    _assert_equal(fused.quantize_per_token(x), activation.quantize_per_token(x.contiguous()))


def test_bad_inputs_are_named() -> None:
    ops = fused.EXTENSION.load()
    with pytest.raises(RuntimeError, match="multiple of 8, got 20"):
        ops.quantize_per_token(torch.randn(4, 20, device="cuda", dtype=torch.float16))
    with pytest.raises(RuntimeError, match="expected float16 or bfloat16"):
        ops.quantize_per_token(torch.randn(4, 16, device="cuda"))
    with pytest.raises(RuntimeError, match=r"2-D \[tokens, features\], got shape \[2, 4, 16\]"):
        ops.quantize_per_token(torch.randn(2, 4, 16, device="cuda", dtype=torch.float16))
    with pytest.raises(RuntimeError, match="each half is a multiple of 8, got 24"):
        ops.silu_mul_quant(torch.randn(4, 24, device="cuda", dtype=torch.float16))
    x = torch.randn(4, 16, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[16\], got \[8\]"):
        ops.rmsnorm_quant(x, torch.ones(8, device="cuda", dtype=torch.float16), 1e-6)
    with pytest.raises(RuntimeError, match="weight dtype BFloat16 differs from x dtype Half"):
        ops.rmsnorm_quant(x, torch.ones(16, device="cuda", dtype=torch.bfloat16), 1e-6)


def test_empty_batch() -> None:
    x = torch.empty(0, 64, device="cuda", dtype=torch.float16)
    got = fused.quantize_per_token(x)
    assert got.q.shape == (0, 64) and got.scales.shape == (0,) and got.sums.shape == (0,)
