"""The `fp8` precision: e4m3 formulas (formats/fp8.py), the stored weight and its grid, the FP8
linear layer, the refusals of the integer-only tools, and the quantize CLI's FP8 path.

Engine-level accuracy of fp8 (against HF fp32 and against HF with the dequantized weights) runs
with every other precision in test_quant_engine.py. GPU (`gpu` marker): cuBLAS's FP8 GEMM, as the
layer calls it, equals the float64 reference up to fp32 accumulation and bf16 output rounding.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from omniserve.cli.main import main
from omniserve.engine.engine import Engine, bundled_model_path
from omniserve.errors import ConfigError
from omniserve.formats.checkpoint import read_checkpoint
from omniserve.formats.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    fp8_scales,
    gemm_fp8,
    quantize_per_token_fp8,
    to_fp8,
)
from omniserve.formats.precision import parse
from omniserve.formats.weight import Fp8Weight, quantize_weight, weight_format
from omniserve.layers.fp8_linear import Fp8Linear
from omniserve.quantize.convert_deepcompressor import convert_deepcompressor
from omniserve.quantize.qoq import QoQOptions, quantize_checkpoint
from omniserve.sampling_params import SamplingParams

FP8 = parse("fp8")
BUNDLED = bundled_model_path()


def _relative_step(v: torch.Tensor) -> torch.Tensor:
    """e4m3's rounding bound at each value: half a step, 2^-4 · |v| for normals (|v| ≥ 2^-6) and
    half the subnormal step 2^-10 below."""
    return torch.maximum(v.abs() * 2.0**-4, torch.full_like(v, 2.0**-10))


def test_precision_text_and_format() -> None:
    assert FP8.name == "fp8" and FP8.float8 and FP8.quantized_weights and FP8.kv_bits is None
    assert weight_format(FP8) is Fp8Weight
    assert parse("w8a8").float8 is False and weight_format(parse("w8a8")) is not Fp8Weight
    with pytest.raises(ConfigError, match="group_size 128 is only valid for W4A8"):
        parse("fp8", 128)


def test_codes_round_to_nearest_within_half_a_step_and_saturate() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-3, 2, 64).unsqueeze(1)
    scales = fp8_scales(x)
    assert scales.dtype == torch.float32
    assert torch.allclose(scales * FP8_MAX, x.abs().amax(-1))
    q = to_fp8(x, scales)
    assert q.dtype == FP8_DTYPE
    v = x / scales.unsqueeze(1)
    assert bool(((q.float() - v).abs() <= _relative_step(v) * (1 + 1e-6)).all())
    assert float(q.float().abs().amax()) == FP8_MAX  # each row's absmax lands on ±448
    # Past the range (a clipped scale): saturate at ±448, never NaN.
    over = to_fp8(torch.tensor([[1000.0, -1000.0, 1.0]]), torch.tensor([1.0]))
    assert over.float().tolist() == [[FP8_MAX, -FP8_MAX, 1.0]]
    # An all-zero row: a finite scale and zero codes.
    zero = quantize_per_token_fp8(torch.zeros(2, 32))
    assert bool(torch.isfinite(zero.scales).all()) and not zero.q.float().any()


def test_weight_round_trip_and_clipping() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=g)
    stored = quantize_weight(w, FP8)
    assert isinstance(stored, Fp8Weight) and stored.shape == (48, 64)
    assert {n: (t.dtype, tuple(t.shape)) for n, t in stored.tensors().items()} == {
        "weight": (FP8_DTYPE, (48, 64)),
        "weight_scale": (torch.float32, (48,)),
    }
    v = w / stored.weight_scale.unsqueeze(1)
    assert bool(((stored.weight.float() - v).abs() <= _relative_step(v) * (1 + 1e-6)).all())
    assert torch.equal(
        stored.dequantize(), stored.weight_scale.unsqueeze(1) * stored.weight.float()
    )
    clip = torch.full((48,), 0.5)
    clipped = quantize_weight(w, FP8, clip)
    assert torch.allclose(clipped.weight_scale, stored.weight_scale * 0.5)
    assert float(clipped.weight.float().abs().amax()) == FP8_MAX  # the clipped tail saturates
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_weight(torch.randn(40, 64), FP8)


def test_reference_gemm_is_the_exact_product_of_the_dequantized_operands() -> None:
    g = torch.Generator().manual_seed(2)
    x = quantize_per_token_fp8(torch.randn(7, 128, generator=g) * 3)
    w = quantize_weight(torch.randn(32, 128, generator=g) * 0.1, FP8)
    assert isinstance(w, Fp8Weight)
    y = gemm_fp8(x, w.weight, w.weight_scale)
    exact = x.dequantize().double() @ w.dequantize().double().t()
    assert y.dtype == torch.float32 and y.shape == (7, 32)
    assert torch.allclose(y.double(), exact, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="do not match on K"):
        gemm_fp8(x, w.weight[:, :64], w.weight_scale)


def _filled_layer(
    bias: bool, kernel: bool = False, device: str = "cpu"
) -> tuple[Fp8Linear, list[Fp8Weight]]:
    g = torch.Generator().manual_seed(3)
    layer = Fp8Linear(64, (32, 16, 16), bias, ("q", "k", "v"), kernel=kernel).to(device)
    shards = []
    for i, n in enumerate((32, 16, 16)):
        shard = quantize_weight(torch.randn(n, 64, generator=g), FP8)
        assert isinstance(shard, Fp8Weight)
        shards.append(shard)
        layer.set_weight(i, shard, torch.device(device))
    if layer.bias is not None:
        layer.bias.data.copy_(torch.randn(64, generator=g))
    return layer, shards


def test_layer_fills_its_shards_in_order_and_matches_the_reference() -> None:
    layer, shards = _filled_layer(bias=True)
    assert layer.quantized_slots("model.layers.0.self_attn.qkv_proj") == {
        "model.layers.0.self_attn.q": 0,
        "model.layers.0.self_attn.k": 1,
        "model.layers.0.self_attn.v": 2,
    }
    assert set(layer.checkpoint_slots("a.qkv_proj")) == {"a.q.bias", "a.k.bias", "a.v.bias"}
    assert layer.quantized_nbytes == 64 * 64 + 64 * 4
    x = torch.randn(5, 64, dtype=torch.float64).float()
    weight = torch.cat([s.weight for s in shards])
    scale = torch.cat([s.weight_scale for s in shards])
    assert layer.bias is not None
    expected = gemm_fp8(quantize_per_token_fp8(x), weight, scale) + layer.bias
    assert torch.equal(layer(x), expected)
    unbiased, _ = _filled_layer(bias=False)
    assert unbiased(x.bfloat16()).dtype == torch.bfloat16  # y in x's dtype


def test_layer_rejects_wrong_weights_and_use_before_loading() -> None:
    layer = Fp8Linear(64, (32,), kernel=False)
    with pytest.raises(RuntimeError, match="before its weights were loaded"):
        layer(torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"expected Fp8Weight of shape \[32, 64\]"):
        layer.set_weight(0, quantize_weight(torch.randn(16, 64), FP8), torch.device("cpu"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected Fp8Weight"):
        layer.set_weight(
            0, quantize_weight(torch.randn(32, 64), parse("w8a8")), torch.device("cpu")
        )  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiple of 16"):
        Fp8Linear(60, (32,), kernel=False)


def test_integer_only_tools_refuse_fp8(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="QoQ targets the integer grids"):
        quantize_checkpoint(BUNDLED, tmp_path / "out", FP8, [], QoQOptions(), torch.device("cpu"))
    with pytest.raises(ConfigError, match="DeepCompressor dump holds integer grids"):
        convert_deepcompressor(BUNDLED, tmp_path / "dump", tmp_path / "out", FP8)
    assert not (tmp_path / "out").exists()


def test_cli_quantize_fp8_needs_no_calibration_and_serves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fp8"
    rc = main(["quantize", "--model", str(BUNDLED), "--output", str(out), "--precision", "fp8"])
    assert rc == 0 and "wrote fp8" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["precision"] == "fp8"
    ckpt = read_checkpoint(out, FP8)
    assert all(isinstance(w, Fp8Weight) for w in ckpt.linears.values()) and ckpt.linears
    engine = Engine.from_pretrained(out, device="cpu", dtype="float32")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    assert len(engine.generate(["def main("], params, use_tqdm=False)[0].token_ids) == 6
    # The integer precisions still need a calibration file.
    argv = ["quantize", "--model", str(BUNDLED), "--output", str(tmp_path / "w4")]
    assert main([*argv, "--precision", "w4a8"]) == 2
    assert re.search("pass --calib", capsys.readouterr().err)
    assert not (tmp_path / "w4").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 37, 256])
def test_cublas_fp8_gemm_matches_the_reference(tokens: int) -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9+")
    layer, shards = _filled_layer(bias=True, kernel=True, device="cuda")
    reference, _ = _filled_layer(bias=True, kernel=False, device="cuda")
    x = torch.randn(tokens, 64, device="cuda", dtype=torch.bfloat16)
    got, want = layer(x).float(), reference(x).float()
    assert got.shape == (tokens, 64) and len(shards) == 3
    # bf16 output rounding (2^-8 relative) dominates fp32 accumulation over K = 64.
    assert torch.allclose(got, want, rtol=2**-7, atol=1e-2 * float(want.abs().max())), float(
        (got - want).abs().max()
    )
