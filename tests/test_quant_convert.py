"""`omniserve convert`: DeepCompressor fake-quant dumps → our checkpoint, exactly.

Each dump is synthetic, built here with DeepCompressor's names, dtypes and shapes
(docs/formats.md#deepcompressor-dumps;
scales keep DeepCompressor's broadcast dims): random integer codes, zero points and scales, and
model.pt's projections set to the fake-quant weights they define, rounded to fp16 as a dump is:

    w4a8 per-channel  W = fp16(s · q − fp16(z · s))       (the PostScale zero of QoQ's recipe)
    w4a8 g128         W = fp16(s1 · s2 · (q − z))
    w8a8              W = fp16(s · q)

The converted checkpoint must hold exactly those codes and dequantize to exactly those fp16 weights.
Served, it is compared with HF transformers (fp32) running the same fake-quant weights: the
engine's only extra errors are per-token int8 activations and the KV8 cache, and the bound is
test_quant_engine's quantized-compute one (≤ 0.12 relative, cosine ≥ 0.995 on first-step logits;
measured 0.064 / 0.9980 per-channel, 0.039 / 0.9992 g128, 0.055 / 0.9985 w8a8).
Greedy ids must equal HF's up to the first near-tie: activation rounding moves single logits by
up to 0.30 here (measured, first step), so a top-2 margin below 0.6 may flip; NEAR_TIE is 0.8.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from omniserve import Engine, SamplingParams
from omniserve.cli.main import main
from omniserve.config import EngineConfig
from omniserve.errors import CheckpointError, ConfigError
from omniserve.formats.checkpoint import read_checkpoint
from omniserve.formats.kv import PER_TENSOR, PER_TOKEN_HEAD, static_kv_scales
from omniserve.formats.packing import unpack_w4
from omniserve.formats.precision import Precision, parse
from omniserve.formats.weight import W4A8PerChannelWeight, W4A8PerGroupWeight, W8A8Weight
from omniserve.quantize.convert_deepcompressor import (
    convert_deepcompressor,
    kv_absmax_from_acts,
)
from omniserve.quantize.rtn_model import is_quantized_projection
from omniserve.runner.model_runner import ModelRunner
from test_quant_engine import _first_step_errors
from tiny_models import hf_greedy, hf_logits, save_servable

OPTIONS = {"device": "cpu", "dtype": "float32", "page_size": 16, "num_kv_pages": 256}
# hidden 128 / intermediate 256: every projection holds whole 128-groups.
MODEL = {"hidden_size": 128, "intermediate_size": 256}
CASES = [("w4a8kv8", -1), ("w4a8kv8", 128), ("w8a8kv8", -1)]
NEAR_TIE = 0.8


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("hf")
    return path, save_servable("llama3", path, **MODEL)


def _codes_and_weight(
    n: int, k: int, precision: Precision, zero_style: str, g: torch.Generator
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(scale.pt entries by suffix, integer codes [N, K], fp16 fake-quant weight [N, K])."""
    if precision.weight_bits == 8:
        q = torch.randint(-127, 128, (n, k), generator=g).float()
        s = (0.0015 + 0.001 * torch.rand(n, generator=g)).half()
        return {"weight.scale.0": s.reshape(n, 1)}, q, (s.float()[:, None] * q).half()
    q = torch.randint(0, 16, (n, k), generator=g).float()
    if precision.group_size == -1:
        z = torch.randint(5, 11, (n,), generator=g).float()
        s = (0.02 + 0.01 * torch.rand(n, generator=g)).half().float()
        szero = (z * s).half()
        w = (s[:, None] * q - szero.float()[:, None]).half()
        entries = {"weight.scale.0": s.half().reshape(n, 1)}
        if zero_style == "scaled_zero":
            entries["weight.scaled_zero"] = szero.reshape(n, 1)
        elif zero_style == "signed_zero":  # sint4 zeros, shifted by 8 on conversion
            entries["weight.zero"] = (z - 8).half().reshape(n, 1)
        else:
            entries["weight.zero"] = z.half().reshape(n, 1)
        return entries, q, w
    groups = k // 128
    z = torch.randint(0, 16, (n, groups), generator=g).float()
    s2 = torch.randint(1, 9, (n, groups), generator=g).float()  # |s2 · (q − z)| ≤ 120
    s1 = (0.004 + 0.002 * torch.rand(n, generator=g)).half().float()
    w8 = (s2[..., None] * (q.reshape(n, groups, 128) - z[..., None])).reshape(n, k)
    entries = {
        "weight.scale.0": s1.half().reshape(n, 1, 1, 1),
        "weight.scale.1": s2.half().reshape(n, 1, groups, 1),
    }
    if zero_style == "scaled_zero":
        entries["weight.scaled_zero"] = (z * s2).half().reshape(n, 1, groups, 1)
    else:
        entries["weight.zero"] = z.half().reshape(n, 1, groups, 1)
    return entries, q, (s1[:, None] * w8).half()


def _write_dump(
    hf: torch.nn.Module, dump: Path, precision: Precision, zero_style: str = "zero", seed: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """model.pt + scale.pt (+ acts.pt) of `hf` fake-quantized with random codes; returns the
    codes and the fp16 state dict by name."""
    g = torch.Generator().manual_seed(seed)
    state = {name: t.detach().half().clone() for name, t in hf.state_dict().items()}
    scales: dict[str, torch.Tensor] = {}
    codes: dict[str, torch.Tensor] = {}
    for name in sorted(state):
        if not is_quantized_projection(name):
            continue
        n, k = state[name].shape
        entries, q, w = _codes_and_weight(n, k, precision, zero_style, g)
        state[name] = w
        codes[name.removesuffix(".weight")] = q
        scales.update({f"{name.removesuffix('.weight')}.{s}": t for s, t in entries.items()})
    dump.mkdir(parents=True, exist_ok=True)
    torch.save(state, dump / "model.pt")
    torch.save(scales, dump / "scale.pt")
    acts = {}
    for i in range(
        hf.config.num_hidden_layers
    ):  # the lmquant layout for layer 0, DeepCompressor's after
        k_max, v_max = torch.tensor(3.0 + i), torch.tensor([0.5, -2.5 - i])
        if i == 0:
            acts[f"model.layers.{i}.self_attn.k_rotary_emb.output"] = {"dynamic_range.0.max": k_max}
            acts[f"model.layers.{i}.self_attn.v_proj.output"] = {"dynamic_range.0.max": v_max}
        else:
            acts[f"model.layers.{i}.self_attn.k_rotary_emb.output"] = {
                "dynamic_range": [{"max": k_max}]
            }
            acts[f"model.layers.{i}.self_attn.v_proj.output"] = {"dynamic_range": [{"max": v_max}]}
    torch.save(acts, dump / "acts.pt")
    return codes, state


def _stored_codes(weight: Any) -> torch.Tensor:
    if isinstance(weight, W8A8Weight):
        return weight.weight.float()
    return unpack_w4(weight.qweight).float()


@pytest.mark.parametrize(("precision", "group_size"), CASES)
def test_golden_conversion_is_exact_and_serves_like_hf(
    hf_dir: tuple[Path, torch.nn.Module], tmp_path: Path, precision: str, group_size: int
) -> None:
    src, hf = hf_dir
    p = parse(precision, group_size)
    codes, state = _write_dump(hf, tmp_path / "dump", p)
    summary = convert_deepcompressor(src, tmp_path / "dump", tmp_path / "out", p)
    # One fp16 rounding of W moves x = W / s by at most |x| · 2^-11 ≤ 128 · 2^-11 code steps.
    assert summary.num_linears == 14 and summary.max_grid_residual <= 2**-4
    ckpt = read_checkpoint(tmp_path / "out", p)
    fmt = {(4, -1): W4A8PerChannelWeight, (4, 128): W4A8PerGroupWeight, (8, -1): W8A8Weight}
    assert set(ckpt.linears) == set(codes)
    for prefix, weight in ckpt.linears.items():
        assert isinstance(weight, fmt[p.weight_bits, group_size])
        assert torch.equal(_stored_codes(weight), codes[prefix]), prefix
        fake_quant = state[f"{prefix}.weight"]
        assert torch.equal(weight.dequantize().half(), fake_quant), prefix
    plain = {n: t for n, t in state.items() if n.removesuffix(".weight") not in codes}
    assert ckpt.tensors.keys() == plain.keys()
    assert all(torch.equal(ckpt.tensors[n], t) for n, t in plain.items())
    assert ckpt.quant.kv_granularity == PER_TOKEN_HEAD and ckpt.kv_scales is None
    assert ckpt.quant.recipe["method"] == "deepcompressor"
    assert (tmp_path / "out" / "tokenizer.json").is_file()

    # HF running the dump's fp16 values (fake-quant projections) in fp32.
    reference = copy.deepcopy(hf)
    reference.load_state_dict({n: t.float() for n, t in state.items()})
    runner = ModelRunner(EngineConfig.from_kwargs(str(tmp_path / "out"), **OPTIONS))
    max_rel, min_cos = _first_step_errors(runner, reference)
    assert max_rel <= 0.12 and min_cos >= 0.995, (max_rel, min_cos)
    del runner
    g = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(3, 384, (int(n),), generator=g).tolist()
        for n in torch.randint(1, 60, (32,), generator=g)
    ]
    engine = Engine.from_pretrained(tmp_path / "out", **OPTIONS)
    outs = engine.generate(
        prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False
    )
    compared = 0
    for prompt, out in zip(prompts, outs):
        expected = hf_greedy(reference, prompt, 8)
        top2 = hf_logits(reference, prompt + expected)[len(prompt) - 1 : -1].topk(2).values
        for got, want, margin in zip(out.token_ids, expected, (top2[:, 0] - top2[:, 1]).tolist()):
            if margin < NEAR_TIE:
                break  # past a near-tie the two greedy paths may part
            assert got == want
            compared += 1
    assert compared >= 6  # not vacuous: measured 8-14 tokens before the first near-ties


@pytest.mark.parametrize("zero_style", ["scaled_zero", "signed_zero"])
def test_zero_point_variants_give_the_same_checkpoint(
    hf_dir: tuple[Path, torch.nn.Module], tmp_path: Path, zero_style: str
) -> None:
    src, hf = hf_dir
    for group_size in (-1, 128):
        if zero_style == "signed_zero" and group_size == 128:
            continue
        p = parse("w4a8kv4", group_size)
        _write_dump(hf, tmp_path / "plain", p, "zero", seed=group_size)
        _write_dump(hf, tmp_path / zero_style, p, zero_style, seed=group_size)
        convert_deepcompressor(src, tmp_path / "plain", tmp_path / f"out-plain{group_size}", p)
        convert_deepcompressor(
            src, tmp_path / zero_style, tmp_path / f"out-{zero_style}{group_size}", p
        )
        a = read_checkpoint(tmp_path / f"out-plain{group_size}")
        b = read_checkpoint(tmp_path / f"out-{zero_style}{group_size}")
        for prefix, weight in a.linears.items():
            for name, t in weight.tensors().items():
                assert torch.equal(b.linears[prefix].tensors()[name], t), (prefix, name)


def test_per_tensor_kv_scales_from_acts(
    hf_dir: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    src, hf = hf_dir
    p = parse("w8a8")
    _write_dump(hf, tmp_path / "dump", p)
    summary = convert_deepcompressor(src, tmp_path / "dump", tmp_path / "out", p, PER_TENSOR)
    assert summary.kv_granularity == PER_TENSOR
    ckpt = read_checkpoint(tmp_path / "out", p)
    # k max 3 + i (a scalar), v max over |[0.5, -2.5 - i]|, in both acts.pt layouts.
    expected = torch.tensor([[3.0, 2.5], [4.0, 3.5]]) / 127
    assert ckpt.quant.kv_granularity == PER_TENSOR
    torch.testing.assert_close(ckpt.kv_scales, expected)
    torch.testing.assert_close(
        static_kv_scales(kv_absmax_from_acts(torch.load(tmp_path / "dump" / "acts.pt"), 2)),
        expected,
    )
    engine = Engine.from_pretrained(tmp_path / "out", **OPTIONS)
    out = engine.generate(
        [[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False
    )
    assert len(out[0].token_ids) == 4
    with pytest.raises(
        CheckpointError, match="entry model.layers.1.self_attn.v_proj.output is missing"
    ):
        kv_absmax_from_acts(
            {
                "model.layers.0.self_attn.k_rotary_emb.output": {"dynamic_range.0.max": 1.0},
                "model.layers.0.self_attn.v_proj.output": {"dynamic_range.0.max": 1.0},
                "model.layers.1.self_attn.k_rotary_emb.output": {"dynamic_range.0.max": 1.0},
            },
            2,
        )
    with pytest.raises(CheckpointError, match="has neither 'dynamic_range.0.max'"):
        kv_absmax_from_acts({"model.layers.0.self_attn.k_rotary_emb.output": {"max": 1.0}}, 1)


def test_cli_converts_and_reports_errors(
    hf_dir: tuple[Path, torch.nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, hf = hf_dir
    _write_dump(hf, tmp_path / "dump", parse("w4a8", 128))
    args = ["convert", "--model", str(src), "--dump", str(tmp_path / "dump"), "--precision", "w4a8"]
    assert main([*args, "--output", str(tmp_path / "out"), "--group-size", "128", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["precision"] == "w4a8kv8" and summary["group_size"] == 128
    assert summary["num_linears"] == 14 and summary["kv_granularity"] == PER_TOKEN_HEAD
    assert read_checkpoint(tmp_path / "out").quant.precision == parse("w4a8", 128)
    assert main([*args, "--output", str(tmp_path / "bad")]) == 2
    assert "use --group-size 128" in capsys.readouterr().err


def _edit(dump: Path, out: Path, file: str, edit: dict[str, Any]) -> Path:
    """A copy of `dump` with entries of `file` replaced (None deletes)."""
    out.mkdir()
    for name in ("model.pt", "scale.pt", "acts.pt"):
        data = torch.load(dump / name)
        if name == file:
            for key, value in edit.items():
                if value is None:
                    del data[key]
                else:
                    data[key] = value
        torch.save(data, out / name)
    return out


def test_broken_dumps_are_named(hf_dir: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    src, hf = hf_dir
    w4 = parse("w4a8kv4")
    dump = tmp_path / "dump"
    _write_dump(hf, dump, w4)
    state = torch.load(dump / "model.pt")
    layer = "model.layers.1.mlp.down_proj"
    off_grid = state[f"{layer}.weight"].clone()
    off_grid[3, 7] += 0.4 * float(torch.load(dump / "scale.pt")[f"{layer}.weight.scale.0"][3])
    cases: list[tuple[Path, Precision, str, type[Exception], str]] = [
        (
            _edit(dump, tmp_path / "grid", "model.pt", {f"{layer}.weight": off_grid}),
            w4,
            PER_TOKEN_HEAD,
            CheckpointError,
            f"{layer}: the fake-quant weight is not on the quantization grid",
        ),
        (
            _edit(dump, tmp_path / "noscale", "scale.pt", {f"{layer}.weight.scale.0": None}),
            w4,
            PER_TOKEN_HEAD,
            CheckpointError,
            f"{layer}.weight.scale.0 is missing",
        ),
        (
            _edit(dump, tmp_path / "nozero", "scale.pt", {f"{layer}.weight.zero": None}),
            w4,
            PER_TOKEN_HEAD,
            CheckpointError,
            f"{layer}.weight.zero \\(or .weight.scaled_zero\\) is missing",
        ),
        (
            _edit(
                dump,
                tmp_path / "shape",
                "scale.pt",
                {f"{layer}.weight.scale.0": torch.ones(7).half()},
            ),
            w4,
            PER_TOKEN_HEAD,
            CheckpointError,
            f"{layer}.weight.scale.0 has shape \\[7\\]; expected 128 values",
        ),
        (
            _edit(dump, tmp_path / "noweight", "model.pt", {f"{layer}.weight": None}),
            w4,
            PER_TOKEN_HEAD,
            CheckpointError,
            f"{layer}.weight.scale.0 belongs to no weight in model.pt",
        ),
        (
            _edit(
                dump, tmp_path / "stray", "scale.pt", {"model.norm.weight.scale.0": torch.ones(1)}
            ),
            w4,
            PER_TOKEN_HEAD,
            CheckpointError,
            "scales for model.norm, which are not decoder projections",
        ),
        (
            _edit(dump, tmp_path / "key", "scale.pt", {"lm_head.bias": torch.ones(1)}),
            w4,
            PER_TOKEN_HEAD,
            CheckpointError,
            "entry 'lm_head.bias' is not a weight scale or zero tensor",
        ),
        (
            _edit(
                dump, tmp_path / "intw", "model.pt", {f"{layer}.weight": off_grid.to(torch.int8)}
            ),
            w4,
            PER_TOKEN_HEAD,
            CheckpointError,
            f"{layer}.weight must be a float \\[N, K\\] weight, found torch.int8",
        ),
        (
            dump,
            parse("w8a8"),
            PER_TOKEN_HEAD,
            ConfigError,
            "has zero points \\(a W4 dump\\), but the requested precision is w8a8kv8",
        ),
        (
            dump,
            parse("w4a8", 128),
            PER_TOKEN_HEAD,
            ConfigError,
            "the dump is per-channel, use --group-size -1",
        ),
        (
            dump,
            w4,
            PER_TENSOR,
            ConfigError,
            "kv_granularity 'per_tensor' .* needs a KV8 precision, but w4a8kv4",
        ),
        (dump, parse("w16a16"), PER_TOKEN_HEAD, ConfigError, "w16a16 keeps fp weights"),
    ]
    for i, (d, p, granularity, error, message) in enumerate(cases):
        with pytest.raises(error, match=message):
            convert_deepcompressor(src, d, tmp_path / f"out{i}", p, granularity)
    no_acts = _edit(dump, tmp_path / "noacts", "", {})
    (no_acts / "acts.pt").unlink()
    with pytest.raises(
        CheckpointError, match="acts.pt does not exist \\(per-tensor KV scales need it\\)"
    ):
        convert_deepcompressor(src, no_acts, tmp_path / "o1", parse("w4a8kv8"), PER_TENSOR)
    truncated = _edit(dump, tmp_path / "truncated", "", {})
    data = (truncated / "model.pt").read_bytes()
    (truncated / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.pt cannot be read as a torch file"):
        convert_deepcompressor(src, truncated, tmp_path / "o2", w4)
    # A layer without its projection in model.pt at all.
    missing = _edit(dump, tmp_path / "missing", "model.pt", {f"{layer}.weight": None})
    scales = torch.load(missing / "scale.pt")
    torch.save({k: v for k, v in scales.items() if not k.startswith(layer)}, missing / "scale.pt")
    with pytest.raises(CheckpointError, match=f"{layer}.weight is missing"):
        convert_deepcompressor(src, missing, tmp_path / "o3", w4)
    with pytest.raises(ConfigError, match="write the checkpoint to a new directory"):
        convert_deepcompressor(src, dump, src, w4)
