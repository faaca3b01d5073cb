"""Reference ops: exact integer cores, RTN error bounds, and GEMMs against fp references.

Bounds asserted here (derivations in the modules' docstrings; u = 2^-24, fp32's unit roundoff):
- activations:   |x − a_s·x_q| ≤ a_s/2                               (+ 2u·|x| for fp32 x / a_s)
- W4 per-chan:   |W − Ŵ| ≤ s1/2 + 2^-11·|s1_szeros|                   (+ 2u·(|W| + s1·15))
- W4 g128:       |W − Ŵ| ≤ s1/2 + s1·s2/2,  w8 ∈ [−127, 127]
- W8:            |W − Ŵ| ≤ s/2
- GEMM vs exact x̂·Ŵᵀ (float64): the fp32 epilogue rounds acc, each product and the difference
  once: |err| ≤ 4u·a_s·(s1·|acc| + |s1_szeros·a_sum|) (per-channel), ≤ 4u·|y| (scale-only).
- GEMM vs fp32 x·Ŵᵀ (x unquantized): |err| ≤ a_s/2·‖Ŵ_n‖₁ + K·u·(|x|·|Ŵ|ᵀ) + the bound above,
  the first term from |x − x̂| ≤ a_s/2, the second the fp32 dot-product error bound γ_K.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omniserve.formats.activation import (
    add_rmsnorm_quant,
    quantize_per_token,
    rmsnorm_quant,
    silu_mul_quant,
)
from omniserve.formats.gemm import int_matmul, quantized_linear
from omniserve.formats.packing import unpack_w4, unpermute_group_columns
from omniserve.formats.precision import parse
from omniserve.formats.rtn import MIN_SCALE, fp16_ceil
from omniserve.formats.weight import (
    W4A8PerChannelWeight,
    W4A8PerGroupWeight,
    W8A8Weight,
    quantize_w4a8_g128,
    quantize_w4a8_per_channel,
    quantize_w8a8,
    quantize_weight,
)
from omniserve.layers.norm import RMSNorm

U = 2.0**-24
MS = [1, 7, 64, 255]
NKS = [(32, 128), (96, 256)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    """Random weight with per-row magnitudes over 3 decades, an offset row and outliers."""
    g = _gen(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 1, n).unsqueeze(1)
    w[0] += 0.5  # a row that may not straddle 0
    w[1, :3] *= 30  # outliers
    return w


def _acts(m: int, k: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4
    x[0, 0] = 20.0  # an outlier channel
    return x


# ---------------------------------------------------------------------------- integer core


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize(("n", "k"), [(32, 32), (96, 256)])
def test_int_matmul_exact(m: int, n: int, k: int) -> None:
    g = _gen(m + n + k)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8)
    expect = (a.long().unsqueeze(1) * b.long().unsqueeze(0)).sum(-1)  # int64, exact
    got = int_matmul(a, b)
    assert got.dtype == torch.int64 and torch.equal(got, expect)
    assert expect.abs().max() > 0


def test_int_matmul_beyond_int32() -> None:
    k = 1 << 17  # 128·128·2^17 = 2^31 overflows an int32 accumulator; int64 holds it exactly
    a = torch.full((1, k), -128, dtype=torch.int8)
    assert int(int_matmul(a, a)) == 2**31


def test_int_matmul_agrees_with_torch_int_mm() -> None:
    g = _gen(5)
    a = torch.randint(-128, 128, (64, 256), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (96, 256), generator=g, dtype=torch.int8)
    try:
        ref = torch._int_mm(a, b.t().contiguous())
    except RuntimeError as exc:  # not every build/device has it
        pytest.skip(f"torch._int_mm unavailable: {exc}")
    assert torch.equal(int_matmul(a, b), ref.long())


def test_int_matmul_rejects_floats_and_mismatch() -> None:
    with pytest.raises(ValueError, match="integer"):
        int_matmul(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="do not match"):
        int_matmul(torch.zeros(2, 4, dtype=torch.int8), torch.zeros(2, 5, dtype=torch.int8))


# ---------------------------------------------------------------------------- activations


def test_fp16_ceil() -> None:
    r = torch.rand(10000, generator=_gen(1)) * 10
    h = fp16_ceil(r)
    assert h.dtype == torch.float16 and bool((h.float() >= r).all())
    assert bool((h.float() <= r * (1 + 2.0**-10)).all())  # at most one fp16 ulp up
    assert float(fp16_ceil(torch.zeros(1))) == MIN_SCALE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", MS)
def test_per_token_quant_bound(m: int, dtype: torch.dtype) -> None:
    x = _acts(m, 256, m).to(dtype)
    qa = quantize_per_token(x)
    xf = x.float()
    s = qa.scales.float().unsqueeze(1)
    assert (
        qa.q.dtype == torch.int8
        and qa.scales.dtype == torch.float16
        and qa.sums.dtype == torch.int32
    )
    assert int(qa.q.abs().max()) <= 127
    assert bool((qa.scales.float() >= xf.abs().amax(1) / 127).all())
    assert bool(((xf - qa.dequantize()).abs() <= s / 2 + 2 * U * xf.abs()).all())
    assert torch.equal(qa.sums, qa.q.long().sum(1).int())
    assert int(qa.q.abs().amax(1).min()) >= 126  # the range is used (scale at most 1 ulp up)


def test_per_token_quant_zero_row_and_shape_error() -> None:
    x = torch.zeros(2, 64)
    x[1] = torch.linspace(-1, 1, 64)
    qa = quantize_per_token(x)
    assert int(qa.q[0].abs().max()) == 0 and float(qa.scales[0]) == MIN_SCALE
    with pytest.raises(ValueError, match="tokens, features"):
        quantize_per_token(torch.zeros(2, 3, 4))


def test_rmsnorm_quant() -> None:
    x = _acts(7, 128, 3)
    norm = RMSNorm(128, 1e-5)
    norm.weight.data = torch.rand(128, generator=_gen(4)) + 0.5
    qa = rmsnorm_quant(x, norm.weight, norm.eps)
    y = norm.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    s = qa.scales.float().unsqueeze(1)
    assert bool(((y - qa.dequantize()).abs() <= s / 2 + 1e-5 * y.abs()).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_add_rmsnorm_quant_is_the_add_then_rmsnorm_quant(dtype: torch.dtype) -> None:
    x, delta = _acts(7, 128, 5).to(dtype), _acts(7, 128, 6).to(dtype)
    norm = RMSNorm(128, 1e-5)
    norm.weight.data = (torch.rand(128, generator=_gen(7)) + 0.5).to(dtype)
    residual, qa = add_rmsnorm_quant(x, delta, norm.weight, norm.eps)
    # The exact sum rounded once to x's dtype: torch adds fp16/bf16 in fp32, whose 24 bits
    # (>= 2p + 2 for fp16's p = 11) make that double rounding equal to a single one.
    assert residual.dtype == dtype
    assert torch.equal(residual, (x.double() + delta.double()).to(dtype))
    want = rmsnorm_quant(x + delta, norm.weight, norm.eps)
    for got_part, want_part in zip(qa, want, strict=True):
        assert torch.equal(got_part, want_part)


def test_add_rmsnorm_quant_rejects_mismatched_delta() -> None:
    x, norm = torch.zeros(4, 64), RMSNorm(64, 1e-5)
    with pytest.raises(ValueError, match=r"x's shape \(4, 64\) .* got \(1, 64\) torch.float32"):
        add_rmsnorm_quant(x, torch.zeros(1, 64), norm.weight, norm.eps)
    with pytest.raises(ValueError, match=r"dtype torch.float32, got \(4, 64\) torch.bfloat16"):
        add_rmsnorm_quant(x, torch.zeros(4, 64, dtype=torch.bfloat16), norm.weight, norm.eps)


def test_silu_mul_quant() -> None:
    gu = _acts(64, 256, 6)
    qa = silu_mul_quant(gu)
    y = F.silu(gu[:, :128]) * gu[:, 128:]
    assert qa.q.shape == (64, 128)
    s = qa.scales.float().unsqueeze(1)
    assert bool(((y - qa.dequantize()).abs() <= s / 2 + 1e-6 * y.abs()).all())


# ---------------------------------------------------------------------------- weights (RTN)


@pytest.mark.parametrize(("n", "k"), NKS)
def test_w4_per_channel_rtn_bound(n: int, k: int) -> None:
    w = _weight(n, k, n + k)
    w[2] = 0.0  # all-zero row
    w[3] = -w[3].abs()  # all-negative row
    qw = quantize_w4a8_per_channel(w)
    s1 = qw.s1_scales.float().unsqueeze(1)
    sz = qw.s1_szeros.float().unsqueeze(1)
    err = (w - qw.dequantize()).abs()
    assert bool((err <= s1 / 2 + 2.0**-11 * sz.abs() + 2 * U * (w.abs() + 15 * s1)).all())
    lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    # the scale is the range / 15 rounded up by at most one fp16 ulp (or the floor)
    assert bool(
        (
            qw.s1_scales.float()
            <= torch.maximum((hi - lo) / 15 * (1 + 2.0**-10), torch.tensor(MIN_SCALE))
        ).all()
    )
    assert int(unpack_w4(qw.qweight).max()) == 15


@pytest.mark.parametrize(("n", "k"), NKS)
def test_w4_g128_rtn_bound_and_int8_intermediate(n: int, k: int) -> None:
    w = _weight(n, k, 7 * n + k)
    w[2] = 0.0
    qw = quantize_w4a8_g128(w)
    s2 = unpermute_group_columns(qw.s2_scales).t().int()  # [N, G]
    sz = unpermute_group_columns(qw.s2_zeros).t().int()
    assert int(s2.min()) >= 1 and int(s2.max()) <= 16
    assert int(sz.max()) <= 0 and int(sz.min()) >= -127
    q = unpack_w4(qw.qweight).int().reshape(n, k // 128, 128)
    assert int((q * s2.unsqueeze(-1)).max()) <= 255  # q·s2 fits a byte lane
    w8 = qw.int8_weight()
    assert int(w8.abs().max()) <= 127
    # Subtraction after multiplication in byte lanes (mod 256), as the kernel does it:
    lanes = ((q * s2.unsqueeze(-1)) % 256 + sz.unsqueeze(-1) % 256) % 256
    assert torch.equal(lanes.reshape(n, k).to(torch.uint8).view(torch.int8), w8)
    s1 = qw.s1_scales.float().unsqueeze(1)
    bound = s1 / 2 + s1 * s2.float().repeat_interleave(128, dim=1) / 2
    assert bool(((w - qw.dequantize()).abs() <= bound + 2 * U * w.abs()).all())


@pytest.mark.parametrize(("n", "k"), [(1, 5), (33, 100), (96, 256)])
def test_w8_rtn_bound(n: int, k: int) -> None:
    w = torch.randn(n, k, generator=_gen(n)) * 0.1
    qw = quantize_w8a8(w)
    s = qw.dequant_scale.float().unsqueeze(1)
    assert int(qw.weight.abs().max()) <= 127
    assert bool(((w - qw.dequantize()).abs() <= s / 2 + 2 * U * w.abs()).all())


def test_quantize_weight_dispatch_and_errors() -> None:
    w = _weight(32, 128, 0)
    assert isinstance(quantize_weight(w, parse("w4a8kv4")), W4A8PerChannelWeight)
    assert isinstance(quantize_weight(w, parse("w4a8kv4", 128)), W4A8PerGroupWeight)
    assert isinstance(quantize_weight(w, parse("w8a8")), W8A8Weight)
    with pytest.raises(ValueError, match="no quantized format"):
        quantize_weight(w, parse("w16a16"))
    with pytest.raises(ValueError, match="K of 128"):
        quantize_w4a8_g128(_weight(32, 96, 0))
    with pytest.raises(ValueError, match="N a positive multiple of 32"):
        quantize_w4a8_per_channel(_weight(40, 64, 0))
    with pytest.raises(ValueError, match="qweight must be 2-D"):
        W4A8PerChannelWeight(
            torch.zeros(32, dtype=torch.uint8), torch.ones(32).half(), torch.ones(32)
        )
    with pytest.raises(ValueError, match=r"got \[4, 0\]"):
        W8A8Weight(torch.zeros(4, 0, dtype=torch.int8), torch.ones(4).half())
    with pytest.raises(ValueError, match="s1_szeros: expected torch.float16"):
        W4A8PerChannelWeight(
            torch.zeros(32, 16, dtype=torch.uint8), torch.ones(32).half(), torch.ones(32)
        )


# ---------------------------------------------------------------------------- GEMMs


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize(("n", "k"), NKS)
@pytest.mark.parametrize(("precision", "group_size"), [("w4a8", -1), ("w4a8", 128), ("w8a8", -1)])
def test_gemm(m: int, n: int, k: int, precision: str, group_size: int) -> None:
    w = _weight(n, k, n * k + group_size)
    x = _acts(m, k, m * 31 + k)
    qw = quantize_weight(w, parse(precision, group_size))
    qa = quantize_per_token(x)
    y = quantized_linear(qa, qw)
    assert y.shape == (m, n) and y.dtype == torch.float32

    w_hat = qw.dequantize().double()
    exact = qa.dequantize().double() @ w_hat.t()  # x̂·Ŵᵀ; float64 is exact up to 2^-53 rel.
    a_s = qa.scales.double().unsqueeze(1)
    if isinstance(qw, W4A8PerChannelWeight):
        acc = int_matmul(qa.q, unpack_w4(qw.qweight)).double()
        mag = a_s * (
            qw.s1_scales.double() * acc.abs()
            + (qw.s1_szeros.double().unsqueeze(0) * qa.sums.double().unsqueeze(1)).abs()
        )
        tol = 4 * U * mag
    else:
        tol = 4 * U * exact.abs()
    assert bool(((y.double() - exact).abs() <= tol + 1e-30).all())

    # Against fp32 x·Ŵᵀ with the unquantized activations.
    ref = x @ qw.dequantize().t()
    act_err = a_s / 2 * w_hat.abs().sum(1).unsqueeze(0)
    dot_err = k * U * (x.abs().double() @ w_hat.abs().t())
    assert bool(((y.double() - ref.double()).abs() <= act_err + dot_err + tol).all())
    # ... and the bound is not vacuous: the output tracks the reference closely in aggregate.
    rel = (y - ref).norm() / ref.norm()
    assert float(rel) < 0.05
