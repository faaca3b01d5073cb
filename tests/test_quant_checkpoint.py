"""Quantized checkpoint: exact write/read round trips and clear errors for broken checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omniserve.errors import CheckpointError, ConfigError
from omniserve.formats.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    read_checkpoint,
    write_checkpoint,
)
from omniserve.formats.precision import Precision, parse
from omniserve.formats.weight import quantize_w8a8, quantize_weight

HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "num_hidden_layers": 1}
LINEARS = {
    "model.layers.0.self_attn.q_proj": (128, 128),
    "model.layers.0.mlp.down_proj": (128, 256),
}


def _write(path: Path, precision: Precision) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(precision.weight_bits + precision.group_size)
    weights = {p: torch.randn(n, k, generator=g) for p, (n, k) in LINEARS.items()}
    linears = {p: quantize_weight(w, precision) for p, w in weights.items()}
    plain = {
        "model.embed_tokens.weight": torch.randn(64, 128, generator=g).half(),
        "model.norm.weight": torch.ones(128, dtype=torch.float16),
    }
    write_checkpoint(path, HF_CONFIG, precision, linears, plain, recipe={"method": "rtn"})
    return {
        **plain,
        **{f"{p}.{name}": t for p, w in linears.items() for name, t in w.tensors().items()},
    }


@pytest.mark.parametrize(
    ("text", "group_size"),
    [("w4a8kv4", -1), ("w4a8kv4", 128), ("w4a8", 128), ("w8a8kv8", -1), ("w8a8kv4", -1)],
)
def test_round_trip_exact(tmp_path: Path, text: str, group_size: int) -> None:
    precision = parse(text, group_size)
    written = _write(tmp_path, precision)
    ckpt = read_checkpoint(tmp_path, precision)
    assert ckpt.quant.precision == precision and ckpt.quant.recipe == {"method": "rtn"}
    assert ckpt.quant.modules == LINEARS and ckpt.hf_config == HF_CONFIG
    for prefix, weight in ckpt.linears.items():
        for name, t in weight.tensors().items():
            ref = written[f"{prefix}.{name}"]
            assert t.dtype == ref.dtype and torch.equal(t, ref)
        assert torch.equal(ckpt.dequantize_linear(prefix), weight.dequantize())
    assert set(ckpt.tensors) == {"model.embed_tokens.weight", "model.norm.weight"}
    assert torch.equal(
        ckpt.tensors["model.embed_tokens.weight"], written["model.embed_tokens.weight"]
    )
    block = json.loads((tmp_path / CONFIG_FILE).read_text())["quantization_config"]
    assert block["precision"] == precision.name and block["group_size"] == group_size
    assert (
        block["kv_cache"] == f"int{precision.kv_bits}"
        and block["kv_granularity"] == "per_token_head"
    )
    assert read_checkpoint(tmp_path).quant.precision == precision  # no request: no check


def test_dequantize_linear_is_close_to_the_original(tmp_path: Path) -> None:
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    p = parse("w8a8")
    write_checkpoint(tmp_path, HF_CONFIG, p, {"lin": quantize_w8a8(w)}, {})
    w_hat = read_checkpoint(tmp_path, p).dequantize_linear("lin")
    s = w.abs().amax(1, keepdim=True) / 127
    assert bool(((w - w_hat).abs() <= s * 0.51).all())
    with pytest.raises(CheckpointError, match="no quantized linear 'nope'"):
        read_checkpoint(tmp_path).dequantize_linear("nope")


def test_precision_and_group_size_mismatch(tmp_path: Path) -> None:
    _write(tmp_path, parse("w4a8kv4", 128))
    with pytest.raises(
        ConfigError,
        match="requested precision w4a8kv4 with group_size -1.*w4a8kv4 with group_size 128",
    ):
        read_checkpoint(tmp_path, parse("w4a8kv4", -1))
    with pytest.raises(ConfigError, match="requested precision w8a8kv8"):
        read_checkpoint(tmp_path, parse("w8a8"))


def _rewrite(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(str(path / WEIGHTS_FILE))
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS_FILE))


def test_missing_tensor_named(tmp_path: Path) -> None:
    _write(tmp_path, parse("w4a8kv4", 128))
    _rewrite(tmp_path, lambda t: t.pop("model.layers.0.mlp.down_proj.s2_zeros"))
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.s2_zeros is missing"
    ):
        read_checkpoint(tmp_path)


def test_wrong_dtype_named(tmp_path: Path) -> None:
    _write(tmp_path, parse("w4a8kv4"))

    def edit(t: dict[str, torch.Tensor]) -> None:
        key = "model.layers.0.self_attn.q_proj.s1_scales"
        t[key] = t[key].float()

    _rewrite(tmp_path, edit)
    with pytest.raises(
        CheckpointError,
        match=r"q_proj\.s1_scales: expected torch\.float16 \[128\].*found torch\.float32",
    ):
        read_checkpoint(tmp_path)


def test_wrong_shape_named(tmp_path: Path) -> None:
    _write(tmp_path, parse("w8a8"))

    def edit(t: dict[str, torch.Tensor]) -> None:
        key = "model.layers.0.mlp.down_proj.weight"
        t[key] = t[key][:, :128].contiguous()

    _rewrite(tmp_path, edit)
    with pytest.raises(
        CheckpointError, match=r"down_proj\.weight: expected torch\.int8 \[128, 256\].*\[128, 128\]"
    ):
        read_checkpoint(tmp_path)


def test_orphan_quantized_tensor(tmp_path: Path) -> None:
    _write(tmp_path, parse("w4a8kv4"))
    _rewrite(
        tmp_path,
        lambda t: t.update(
            {"model.layers.0.mlp.up_proj.qweight": torch.zeros(32, 16, dtype=torch.uint8)}
        ),
    )
    with pytest.raises(CheckpointError, match=r"up_proj\.qweight belongs to no linear"):
        read_checkpoint(tmp_path)


def _edit_config(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    config = json.loads((path / CONFIG_FILE).read_text())
    edit(config)
    (path / CONFIG_FILE).write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.pop("quantization_config"), "has no quantization_config"),
        (
            lambda c: c["quantization_config"].update(format_version=99),
            "format_version 99 is not supported",
        ),
        (lambda c: c["quantization_config"].update(quant_method="awq"), "quant_method is 'awq'"),
        (lambda c: c["quantization_config"].update(precision="w3a8"), "valid choices: w4a8kv4"),
        (lambda c: c["quantization_config"].update(group_size=64), "valid choices: -1, 128"),
        (lambda c: c["quantization_config"].pop("modules"), "malformed"),
        (lambda c: c["quantization_config"].update(precision="w16a16kv4"), "no quantized weights"),
        (
            lambda c: c["quantization_config"]["modules"].update(
                {"model.layers.0.self_attn.q_proj": [128, 100]}
            ),
            "K of 32",
        ),
        (
            lambda c: c["quantization_config"]["modules"].update(
                {"model.layers.0.self_attn.q_proj": [128, 96]}
            ),
            r"\[128, 48\] for a \[128, 96\] linear",
        ),
    ],
)
def test_bad_config(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    _write(tmp_path, parse("w4a8kv4"))
    _edit_config(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(tmp_path)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json does not exist"):
        read_checkpoint(tmp_path)
    _write(tmp_path, parse("w4a8kv4"))
    (tmp_path / WEIGHTS_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_checkpoint(tmp_path)
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        read_checkpoint(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_checkpoint(tmp_path)


def test_writer_rejects_format_mismatch(tmp_path: Path) -> None:
    w = quantize_w8a8(torch.randn(32, 128))
    with pytest.raises(ConfigError, match="stores W4A8PerGroupWeight"):
        write_checkpoint(tmp_path, HF_CONFIG, parse("w4a8", 128), {"lin": w}, {})
    with pytest.raises(ValueError, match="both a quantized-linear tensor and a plain tensor"):
        write_checkpoint(
            tmp_path, HF_CONFIG, parse("w8a8"), {"lin": w}, {"lin.weight": torch.zeros(1)}
        )
    with pytest.raises(ConfigError, match="keeps the model's fp weights"):
        write_checkpoint(tmp_path, HF_CONFIG, parse("w16a16kv4"), {}, {})
