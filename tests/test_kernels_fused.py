"""Fused activation-quantization kernels (cuda/fused_*.cu) against their torch references
(formats/activation.py) on the GPU: per-token int8 quantization and SiLU·mul + quant give equal codes,
scales and sums; RMSNorm + quant may move a code by one where its fp32 sum of squares, reduced in
another order than torch's, rounds a normalized value differently (bounded below). The residual
add fused before RMSNorm + quant gives torch's sum bit for bit, and then exactly what the unfused
RMSNorm + quant kernel gives for that sum."""

from __future__ import annotations

import pytest
import torch

from omniserve.formats import activation
from omniserve.formats.activation import QuantizedActivation
from omniserve.kernels import fused
from omniserve.layers.norm import RMSNorm

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]
TOKENS = [1, 7, 64, 300]
HIDDEN = [8, 24, 4096, 14336]
ADD_TOKENS = [1, 7, 64, 255, 4096]
ADD_HIDDEN = [8, 64, 200, 1000, 4096, 5120, 8192, 14336]
"""Rows of one vector, of vectors that fill no whole warp or block, of one vector per thread
(≤ 8192) and of several (14336: 1792 vectors over 1024 threads)."""

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


def _norm(hidden: int, dtype: torch.dtype) -> RMSNorm:
    norm = RMSNorm(hidden, 1e-5).to("cuda")
    g = torch.Generator(device="cuda").manual_seed(hidden)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(hidden, generator=g, device="cuda"))
    return norm.to(dtype)


def _assert_rmsnorm_quant_close(
    got: QuantizedActivation, want: QuantizedActivation, y: torch.Tensor
) -> None:
    """The kernel's RMSNorm + quant against the reference's, of the normalized values y: equal
    up to the one-code flips a differently reduced sum of squares may cause."""
    # A scale moves by at most one fp16 step (when a row's largest value rounds differently).
    steps = (got.scales.view(torch.int16).int() - want.scales.view(torch.int16).int()).abs()
    assert steps.max() <= 1
    diff = (got.q.int() - want.q.int()).abs()
    assert diff.max() <= 1
    same_scale = steps == 0
    assert (diff[same_scale] != 0).float().mean() <= RMSNORM_MISMATCH_RATE
    assert torch.equal(got.sums, got.q.sum(-1, dtype=torch.int32))
    # The kernel's codes quantize the reference's normalized values as well as the reference does.
    y = y.float()
    err = (got.dequantize() - y).abs() - got.scales.float()[:, None] / 2
    assert err.max() <= 1e-2 * y.abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("tokens", TOKENS)
def test_rmsnorm_quant_matches_reference(tokens: int, hidden: int, dtype: torch.dtype) -> None:
    x = _activations(tokens, hidden, dtype, seed=7 * tokens + hidden)
    norm = _norm(hidden, dtype)
    got, want = (
        fused.rmsnorm_quant(x, norm.weight, norm.eps),
        activation.rmsnorm_quant(x, norm.weight, norm.eps),
    )
    _assert_rmsnorm_quant_close(got, want, norm(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", ADD_HIDDEN)
@pytest.mark.parametrize("tokens", ADD_TOKENS)
def test_add_rmsnorm_quant_matches_reference(tokens: int, hidden: int, dtype: torch.dtype) -> None:
    x = _activations(tokens, hidden, dtype, seed=11 * tokens + hidden)
    delta = _activations(tokens, hidden, dtype, seed=13 * tokens + hidden).flip(0).contiguous()
    if tokens > 1:
        delta[-1] = -x[-1]  # a row that cancels to zeros: the smallest scale, all codes zero
    norm = _norm(hidden, dtype)
    residual, got = fused.add_rmsnorm_quant(x, delta, norm.weight, norm.eps)
    want_residual, want = activation.add_rmsnorm_quant(x, delta, norm.weight, norm.eps)
    assert residual.dtype == dtype and residual.is_contiguous()
    assert torch.equal(residual, want_residual)
    _assert_rmsnorm_quant_close(got, want, norm(want_residual))
    # Bit for bit the unfused kernel's output for the sum: the engine's numbers did not change.
    _assert_equal(got, fused.rmsnorm_quant(want_residual, norm.weight, norm.eps))
    if tokens > 1:
        assert not got.q[-1].any() and got.scales[-1] == 2.0**-14 and got.sums[-1] == 0


def test_strided_rows_are_read_in_place() -> None:
    wide = _activations(9, 4096 + 64, torch.bfloat16, seed=1)
    x = wide[:, 64:]  # row stride 4160, 16-byte aligned: no copy needed
    _assert_equal(fused.quantize_per_token(x), activation.quantize_per_token(x.contiguous()))
    delta = _activations(9, 2 * 4096, torch.bfloat16, seed=2)[:, 4096:]  # another row stride
    norm = _norm(4096, torch.bfloat16)
    residual, got = fused.add_rmsnorm_quant(x, delta, norm.weight, norm.eps)
    assert residual.is_contiguous() and torch.equal(residual, x + delta)
    _assert_equal(got, fused.rmsnorm_quant(residual, norm.weight, norm.eps))


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
    weight = torch.ones(16, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"delta must have x's shape \[4, 16\], got \[3, 16\]"):
        ops.add_rmsnorm_quant(x, x[:3].clone(), weight, 1e-6)
    with pytest.raises(RuntimeError, match="delta dtype BFloat16 differs from x dtype Half"):
        ops.add_rmsnorm_quant(x, x.bfloat16(), weight, 1e-6)
    with pytest.raises(RuntimeError, match="delta must be a CUDA tensor, got device cpu"):
        ops.add_rmsnorm_quant(x, x.cpu(), weight, 1e-6)
    with pytest.raises(RuntimeError, match="delta must be contiguous in its last dimension"):
        ops.add_rmsnorm_quant(x, torch.randn_like(x).t().contiguous().t(), weight, 1e-6)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[16\], got \[8\]"):
        ops.add_rmsnorm_quant(x, x, weight[:8], 1e-6)


def test_empty_batch() -> None:
    x = torch.empty(0, 64, device="cuda", dtype=torch.float16)
    got = fused.quantize_per_token(x)
    assert got.q.shape == (0, 64) and got.scales.shape == (0,) and got.sums.shape == (0,)
    norm = _norm(64, torch.float16)
    residual, got = fused.add_rmsnorm_quant(x, x, norm.weight, norm.eps)
    assert residual.shape == (0, 64) and got.q.shape == (0, 64) and got.sums.shape == (0,)
