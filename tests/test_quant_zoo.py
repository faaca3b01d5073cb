"""QServe model-zoo checkpoints served directly by Engine.from_pretrained.

Each zoo directory is built here as QServe's converters write one
(docs/formats.md#qserve-zoo-checkpoints): the HF config.json,
the tokenizer, and a torch state dict whose quantized linears carry QServe's tensors, made by the
restated QServe packer of test_quant_qserve_compat (`_qserve_from_linear`: int8 qweight in the
compute-aware layout, permuted s2 columns) from the weights of one of our RTN checkpoints. The
zoo directory and our checkpoint hold the same weights, so they must give identical logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from omniserve import Engine, SamplingParams
from omniserve.config import EngineConfig
from omniserve.errors import CheckpointError, ConfigError
from omniserve.formats.checkpoint import (
    CONFIG_FILE,
    kv_scale_key,
    read_checkpoint,
    write_checkpoint,
)
from omniserve.formats.packing import unpermute_group_columns
from omniserve.formats.precision import parse
from omniserve.formats.qserve_zoo import is_qserve_checkpoint
from omniserve.formats.weight import W4A8PerChannelWeight, W4A8PerGroupWeight, W8A8Weight
from omniserve.quantize.rtn_model import write_rtn_checkpoint
from omniserve.runner.model_runner import ModelRunner
from test_quant_qserve_compat import _qserve_from_linear
from tiny_models import PagedRequests, save_servable

OPTIONS = {"device": "cpu", "dtype": "float32", "page_size": 16, "num_kv_pages": 64}
FUSED = {("q_proj", "k_proj", "v_proj"): "qkv_proj", ("gate_proj", "up_proj"): "gate_up_proj"}


def _zoo_tensors(weight: object) -> dict[str, torch.Tensor]:
    """QServe's tensors of one linear, produced by QServe's own conversion steps."""
    if isinstance(weight, W8A8Weight):
        return {"weight": weight.weight, "dequant_scale": weight.dequant_scale}
    assert isinstance(weight, W4A8PerChannelWeight | W4A8PerGroupWeight)
    s1 = weight.s1_scales
    if isinstance(weight, W4A8PerChannelWeight):
        zeros = torch.round(weight.s1_szeros.float() / s1.float())
        return _qserve_from_linear(weight.dequantize(), s1, zeros, None)
    s2 = unpermute_group_columns(weight.s2_scales).t().int()
    zeros = -unpermute_group_columns(weight.s2_zeros).t().int() // s2
    return _qserve_from_linear(weight.dequantize(), s1, zeros, s2)


def _write_zoo(
    ours: Path,
    zoo: Path,
    *,
    fused: bool,
    file: str = "pytorch_model.bin",
    kv_scales: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """A zoo directory with the weights of our checkpoint `ours`; returns its state dict."""
    ckpt = read_checkpoint(ours)
    state: dict[str, torch.Tensor] = {n: t.half() for n, t in ckpt.tensors.items()}
    for prefix, weight in ckpt.linears.items():
        for name, t in _zoo_tensors(weight).items():
            state[f"{prefix}.{name}"] = t
    if fused:
        for shards, fused_name in FUSED.items():
            for prefix in {p.rpartition(".")[0] for p in ckpt.linears if p.endswith(shards[0])}:
                for name in [*_zoo_tensors(ckpt.linears[f"{prefix}.{shards[0]}"]), "bias"]:
                    parts = [state.pop(f"{prefix}.{s}.{name}", None) for s in shards]
                    if parts[0] is not None:
                        dim = 1 if name in ("s2_scales", "s2_zeros") else 0
                        state[f"{prefix}.{fused_name}.{name}"] = torch.cat(parts, dim)
    if kv_scales is not None:
        for i, row in enumerate(kv_scales):
            state[kv_scale_key(i)] = row.half()
    zoo.mkdir()
    torch.save(state, zoo / file)
    (zoo / CONFIG_FILE).write_text(json.dumps(ckpt.hf_config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(ours / name, zoo / name)
    return state


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Our RTN checkpoints: qwen2 (q/k/v biases, tied embeddings) and a hidden-128 llama3."""
    qwen = tmp_path_factory.mktemp("qwen2")
    save_servable("qwen2", qwen)
    llama = tmp_path_factory.mktemp("llama3")
    save_servable("llama3", llama, hidden_size=128, intermediate_size=256)
    out = {}
    for name, src, precision, group in [
        ("w4-qwen2", qwen, "w4a8kv4", -1),
        ("g128-llama3", llama, "w4a8kv8", 128),
        ("w8-llama3", llama, "w8a8kv8", -1),
    ]:
        out[name] = src.parent / f"{src.name}-{name}"
        write_rtn_checkpoint(src, out[name], parse(precision, group))
        # fp tensors in fp16, as the zoo stores them, so both directories hold the same values.
        ckpt = read_checkpoint(out[name])
        half = {n: t.half() for n, t in ckpt.tensors.items()}
        write_checkpoint(out[name], ckpt.hf_config, ckpt.quant.precision, ckpt.linears, half)
    return out


def _logits(path: Path, **options: object) -> torch.Tensor:
    runner = ModelRunner(EngineConfig.from_kwargs(str(path), **{**OPTIONS, **options}))
    prompts = [[5, 17, 200, 33], list(range(40, 80)), [300, 2, 77, 9, 9, 12]]
    return runner.compute_logits(PagedRequests(16, 64).step(list(enumerate(prompts))))[1]


@pytest.mark.parametrize(
    ("name", "fused", "file"),
    [
        ("w4-qwen2", False, "pytorch_model.bin"),
        ("w4-qwen2", True, "quant_model.pt"),
        ("g128-llama3", True, "pytorch_model.bin"),
        ("w8-llama3", True, "quant_model.pt"),
    ],
)
def test_zoo_checkpoint_equals_ours(
    ours: dict[str, Path], tmp_path: Path, name: str, fused: bool, file: str
) -> None:
    zoo = tmp_path / "zoo"
    state = _write_zoo(ours[name], zoo, fused=fused, file=file)
    assert is_qserve_checkpoint(zoo) and not is_qserve_checkpoint(ours[name])
    assert all(t.dtype == torch.int8 for n, t in state.items() if n.endswith(".qweight"))
    assert any("qkv_proj" in n for n in state) == fused
    ckpt = read_checkpoint(ours[name])
    p = ckpt.quant.precision
    detected = ModelRunner(EngineConfig.from_kwargs(str(zoo), **OPTIONS)).precision
    assert detected == parse(f"w{p.weight_bits}a8kv{p.weight_bits}", p.group_size)  # W4: KV4
    request = {"precision": p.name, "group_size": p.group_size}
    assert torch.equal(_logits(zoo, **request), _logits(ours[name]))
    engine = Engine.from_pretrained(zoo, **OPTIONS, **request)
    outs = engine.generate(
        ["hello world", "a b c"], SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False
    )
    assert [len(o.token_ids) for o in outs] == [6, 6] and outs[0].text


def test_zoo_precision_follows_the_request_and_kv_scales(
    ours: dict[str, Path], tmp_path: Path
) -> None:
    _write_zoo(ours["w4-qwen2"], tmp_path / "w4", fused=True)
    # No precision stored: W4A8 defaults to QServe's KV4; a kv8 request is honoured.
    assert ModelRunner(
        EngineConfig.from_kwargs(str(tmp_path / "w4"), **OPTIONS)
    ).precision == parse("w4a8kv4")
    kv8 = ModelRunner(
        EngineConfig.from_kwargs(str(tmp_path / "w4"), **OPTIONS, precision="w4a8kv8")
    )
    assert kv8._kv_spec.kv_bits == 8
    with pytest.raises(ConfigError, match="requested precision w8a8kv8 .* holds w4a8kv8"):
        ModelRunner(EngineConfig.from_kwargs(str(tmp_path / "w4"), **OPTIONS, precision="w8a8"))
    with pytest.raises(ConfigError, match="group_size 128, but the checkpoint .* group_size -1"):
        ModelRunner(
            EngineConfig.from_kwargs(
                str(tmp_path / "w4"), **OPTIONS, precision="w4a8", group_size=128
            )
        )
    # LServe-style W8A8 with per-tensor KV8 scales (stored as fp16, read as fp32).
    scales = torch.tensor([[0.05, 0.03], [0.04, 0.02]])
    _write_zoo(ours["w8-llama3"], tmp_path / "w8", fused=False, kv_scales=scales)
    runner = ModelRunner(EngineConfig.from_kwargs(str(tmp_path / "w8"), **OPTIONS))
    assert runner._kv_spec.kv_granularity == "per_tensor"
    torch.testing.assert_close(runner.kv_cache.static_scales, scales.half().float())
    with pytest.raises(
        ConfigError, match="holds per-tensor static KV8 scales .* request a kv8 precision"
    ):
        ModelRunner(EngineConfig.from_kwargs(str(tmp_path / "w8"), **OPTIONS, precision="w8a8kv4"))
    # A W8A8 zoo checkpoint is int8, not the FP8 precision of the same width.
    with pytest.raises(ConfigError, match="requested precision fp8 .* holds w8a8kv8"):
        ModelRunner(EngineConfig.from_kwargs(str(tmp_path / "w8"), **OPTIONS, precision="fp8"))


def test_broken_zoo_checkpoints_are_named(ours: dict[str, Path], tmp_path: Path) -> None:
    good = _write_zoo(ours["g128-llama3"], tmp_path / "good", fused=True)
    qkv = "model.layers.0.self_attn.qkv_proj"
    down = "model.layers.1.mlp.down_proj"
    o_proj = "model.layers.1.self_attn.o_proj"

    def broken(name: str, edit: dict[str, torch.Tensor | None]) -> Path:
        path = tmp_path / name
        shutil.copytree(tmp_path / "good", path)
        state = dict(good)
        for key, t in edit.items():
            if t is None:
                del state[key]
            else:
                state[key] = t
        torch.save(state, path / "pytorch_model.bin")
        return path

    cases = [
        (
            broken("missing", {f"{down}.s2_zeros": None}),
            CheckpointError,
            f"linear {down}: QServe tensor s2_zeros is missing",
        ),
        (
            broken("dtype", {f"{down}.s1_scales": good[f"{down}.s1_scales"].float()}),
            CheckpointError,
            f"linear {down}: .*s1_scales: expected torch.float16",
        ),
        (
            broken("shape", {f"{down}.s2_scales": good[f"{down}.s2_scales"][:1]}),
            CheckpointError,
            f"linear {down}: .*s2_scales: expected torch.int8",
        ),
        (
            broken("fused", {f"{qkv}.s1_scales": good[f"{qkv}.s1_scales"][:64]}),
            CheckpointError,
            f"tensor {qkv}.s1_scales: a fused qkv_proj of 128\\+64\\+64 output channels",
        ),
        (
            broken("extra", {f"{down}.s1_szeros": torch.zeros(128).half()}),
            CheckpointError,
            f"linear {down} has s1_szeros, which w4a8kv8 with group_size 128 does not store",
        ),
        (
            broken("mixed", {f"{down}.dequant_scale": torch.ones(128).half()}),
            CheckpointError,
            "mixes W4A8 .* and W8A8",
        ),
        (
            broken(
                "nolinear",
                {f"{o_proj}.{n}": None for n in ("qweight", "s1_scales", "s2_scales", "s2_zeros")},
            ),
            CheckpointError,
            f"missing quantized linears: {o_proj}",
        ),
        (
            broken("kvscale", {kv_scale_key(0): torch.ones(3), kv_scale_key(1): torch.ones(2)}),
            CheckpointError,
            f"tensor {kv_scale_key(0)}: expected a float tensor of shape \\[2\\]",
        ),
        (
            broken("norm", {"model.norm.weight": None}),
            CheckpointError,
            "missing tensors: model.norm.weight",
        ),
    ]
    for path, error, message in cases:
        with pytest.raises(error, match=message):
            ModelRunner(
                EngineConfig.from_kwargs(str(path), **OPTIONS, precision="w4a8kv8", group_size=128)
            )
    truncated = tmp_path / "truncated"
    shutil.copytree(tmp_path / "good", truncated)
    data = (truncated / "pytorch_model.bin").read_bytes()
    (truncated / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(
        CheckpointError, match="pytorch_model.bin cannot be read as a torch state dict"
    ):
        ModelRunner(EngineConfig.from_kwargs(str(truncated), **OPTIONS))
