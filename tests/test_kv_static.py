"""Per-tensor static KV8 (LServe's default): the format's bound, calibration, the checkpoint field,
and the engine end to end.

Tolerances:
- Round trip: |x̂ − x| ≤ s / 2 inside the calibrated range (|x| ≤ 127.5 s), plus fp32 slack of
  1e-4 s; outside it x̂ = ±127 s exactly (clamping).
- Calibration: the maxima read from HF's KV cache and those of our own model's post-RoPE K/V (two
  implementations of the same fp32 network) agree to 1e-4 relative.
- Engine: a W8A8 checkpoint whose KV cache is static KV8 with calibrated scales, against HF running
  the checkpoint's dequantized weights Ŵ in fp32 (so only int8 activations and the KV rounding
  remain), on the prefill and 7 teacher-forced decode steps. A static scale is set by the layer's
  largest value, so typical rows round more coarsely than with per-row scales: measured worst
  relative logit errors 0.070-0.078 (cosine ≥ 0.9970) on llama3 / mistral / qwen2 vs 0.056-0.060
  (0.9982) for per-token KV8 on the same checkpoints; asserted ≤ 0.12 / cosine ≥ 0.995, the bound
  of test_quant_engine's quantized-compute test. Scales 1000x too small (everything clamps) give
  errors of 1.6 (cosine < 0).
- Scheduling: every query reads K/V as the cache holds them, so greedy ids do not depend on
  chunking or preemption: asserted exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omniserve import Engine, SamplingParams
from omniserve.config import EngineConfig
from omniserve.errors import CheckpointError, ConfigError
from omniserve.formats.checkpoint import (
    CONFIG_FILE,
    kv_scale_key,
    read_checkpoint,
    write_checkpoint,
)
from omniserve.formats.kv import (
    PER_TENSOR,
    dequantize_kv_static,
    quantize_kv_static,
    static_kv_scales,
)
from omniserve.formats.precision import parse
from omniserve.layers.attention import PagedAttention
from omniserve.quantize.kv_calibration import calibrate_kv_absmax
from omniserve.runner.kv_cache import KVCacheSpec, StaticInt8Rows
from omniserve.runner.model_runner import ModelRunner
from tiny_models import (
    PagedRequests,
    fake_quantized,
    hf_logits,
    save_servable,
    save_static_kv8_checkpoint,
)

OPTIONS = {"device": "cpu", "dtype": "float32", "page_size": 16}


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 384, (n,), generator=g).tolist() for n in lengths]


def test_round_trip_bound_and_clamping() -> None:
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor(0.02)
    x = 0.8 * torch.randn(4, 50, 64, generator=g)  # |x| mostly < 127 s = 2.54, some beyond
    x[0, 0, :4] = torch.tensor([127.5, -127.5, 300.0, -1000.0]) * 0.02
    codes = quantize_kv_static(x, scale)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert int(codes.abs().max()) == 127
    x_hat = dequantize_kv_static(codes, scale, torch.float32)
    inside = x.abs() <= 127.5 * scale
    assert (~inside).sum() >= 2 and inside.sum() > 0.9 * x.numel()
    assert ((x_hat - x).abs()[inside] <= scale * (0.5 + 1e-4)).all()
    assert torch.equal(x_hat[~inside], torch.sign(x[~inside]) * 127 * scale)
    assert dequantize_kv_static(codes, scale, torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(static_kv_scales(torch.tensor([127.0, 0.0])), torch.tensor([1.0, 2.0**-14]))


def test_static_rows_store_what_reads_return() -> None:
    codes = torch.zeros(10, 8, dtype=torch.int8)
    rows = StaticInt8Rows(codes, torch.tensor(0.5), torch.float32)
    x = torch.randn(2, 3, 8)
    index = torch.tensor([[1, 4, 7], [0, 2, 9]])
    stored = rows.store(index, x)
    assert torch.equal(rows.read(index), stored)
    assert ((stored - x).abs() <= 0.25 + 1e-6).all()
    assert not codes[[3, 5, 6, 8]].any()  # rows not written stay zero


def test_spec_rejects_per_tensor_kv4_and_sizes_rows_without_params() -> None:
    with pytest.raises(ValueError, match="'per_tensor' needs an int8 KV cache, got kv_bits=4"):
        KVCacheSpec(2, 16, 2, 64, torch.float16, kv_bits=4, kv_granularity=PER_TENSOR)
    static = KVCacheSpec(2, 16, 2, 64, torch.float16, kv_bits=8, kv_granularity=PER_TENSOR)
    per_token = KVCacheSpec(2, 16, 2, 64, torch.float16, kv_bits=8)
    assert static.bytes_per_row == 64 and per_token.bytes_per_row == 64 + 4


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    out = {}
    for family in ("llama3", "mistral"):
        path = tmp_path_factory.mktemp(family)
        out[family] = (path, save_servable(family, path))
    return out


@pytest.mark.parametrize("family", ["llama3", "mistral"])
def test_calibration_matches_our_models_post_rope_kv(
    models: dict[str, tuple[Path, torch.nn.Module]], family: str
) -> None:
    """Mistral's sliding window (8) is shorter than the windows: every position must count."""
    path, hf = models[family]
    windows = _prompts(3, (40, 25, 33))
    absmax = calibrate_kv_absmax(hf, windows)
    assert absmax.shape == (2, 2) and (absmax > 0).all()
    # Our model's attention layers receive post-RoPE k and v: record their maxima there.
    runner = ModelRunner(EngineConfig.from_kwargs(str(path), **OPTIONS, num_kv_pages=64))
    seen = torch.zeros(2, 2)

    def recorder(layer: int):
        def hook(module: PagedAttention, args: tuple) -> None:
            _, k, v, _ = args
            seen[layer, 0] = max(seen[layer, 0], float(k.abs().max()))
            seen[layer, 1] = max(seen[layer, 1], float(v.abs().max()))

        return hook

    handles = [
        layer.register_forward_pre_hook(recorder(i))
        for i, layer in enumerate(runner.model.attention_layers)
    ]
    runner.compute_logits(PagedRequests(16, 64).step(list(enumerate(windows))))
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(absmax, seen, rtol=1e-4, atol=0)
    # Only the first 8 positions' keys (what a sliding-window cache would keep of a short window)
    # give smaller maxima, so the full windows mattered.
    assert (calibrate_kv_absmax(hf, [w[:8] for w in windows]) <= absmax).all()
    with pytest.raises(ValueError, match="at least one token window"):
        calibrate_kv_absmax(hf, [])


def _decode_path_errors(runner: ModelRunner, reference: torch.nn.Module) -> tuple[float, float]:
    """(max relative error, min cosine) of the logits of a prefill and 7 teacher-forced decode
    steps of 6 requests against `reference` at the same positions."""
    prompts = _prompts(0, (5, 23, 40, 70, 33, 9))
    followers = _prompts(1, (8,) * len(prompts))
    reqs = PagedRequests(16, 64)
    steps = [runner.compute_logits(reqs.step(list(enumerate(prompts))))[1]]
    for t in range(7):
        steps.append(
            runner.compute_logits(reqs.step([(i, f[t : t + 1]) for i, f in enumerate(followers)]))[
                1
            ]
        )
    rel, cos = [], []
    for i, (prompt, follow) in enumerate(zip(prompts, followers)):
        refs = hf_logits(reference, prompt + follow[:7])[len(prompt) - 1 :]
        for got, ref in zip((step[i] for step in steps), refs, strict=True):
            rel.append(float((got - ref).norm() / ref.norm()))
            cos.append(float(torch.cosine_similarity(got, ref, 0)))
    return max(rel), min(cos)


def test_engine_static_kv8_is_close_to_fp32(
    models: dict[str, tuple[Path, torch.nn.Module]], tmp_path: Path
) -> None:
    fp_dir, hf = models["llama3"]
    path = save_static_kv8_checkpoint(fp_dir, hf, tmp_path / "static")
    ckpt = read_checkpoint(path)
    assert ckpt.quant.kv_granularity == PER_TENSOR and ckpt.kv_scales is not None
    runner = ModelRunner(EngineConfig.from_kwargs(str(path), **OPTIONS, num_kv_pages=64))
    assert runner._kv_spec.kv_granularity == PER_TENSOR and runner._kv_spec.kv_bits == 8
    assert runner.kv_cache.storage.dtype == torch.int8 and runner.kv_cache.params is None
    assert isinstance(runner.model.attention_layers[1].v_cache, StaticInt8Rows)
    torch.testing.assert_close(runner.kv_cache.static_scales, ckpt.kv_scales)
    reference = fake_quantized(hf, ckpt.linears)
    max_rel, min_cos = _decode_path_errors(runner, reference)
    assert max_rel <= 0.12 and min_cos >= 0.995, (max_rel, min_cos)
    # Scales far too small clamp nearly every cached value: the comparison can fail.
    tiny = save_static_kv8_checkpoint(fp_dir, hf, tmp_path / "tiny", scale_factor=1e-3)
    bad = ModelRunner(EngineConfig.from_kwargs(str(tiny), **OPTIONS, num_kv_pages=64))
    assert _decode_path_errors(bad, reference)[0] > 0.3


def test_static_kv8_tokens_do_not_depend_on_chunking_or_preemption(
    models: dict[str, tuple[Path, torch.nn.Module]], tmp_path: Path
) -> None:
    fp_dir, hf = models["mistral"]  # sliding window 8: the cache is read across windows too
    path = save_static_kv8_checkpoint(fp_dir, hf, tmp_path / "static")
    prompts = _prompts(2, (30, 31, 17, 29, 25, 12, 70))
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    plain = Engine.from_pretrained(path, **OPTIONS, num_kv_pages=256)
    expected = [o.token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    squeezed = Engine.from_pretrained(
        path,
        **OPTIONS,
        num_kv_pages=13,
        watermark=0.0,
        max_num_seqs=8,
        max_num_batched_tokens=24,
        long_prefill_token_threshold=7,
        max_partial_prefills=2,
    )
    outs = squeezed.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
    stats = squeezed.stats()
    assert stats.num_preemptions > 0
    assert stats.running == stats.waiting == stats.dense_pages_used == 0


def test_checkpoint_field_and_errors(
    models: dict[str, tuple[Path, torch.nn.Module]], tmp_path: Path
) -> None:
    fp_dir, hf = models["llama3"]
    path = save_static_kv8_checkpoint(fp_dir, hf, tmp_path / "static")
    block = json.loads((path / CONFIG_FILE).read_text())["quantization_config"]
    assert block["kv_granularity"] == "per_tensor" and block["kv_cache"] == "int8"
    stored = load_file(str(path / "model.safetensors"))
    assert stored[kv_scale_key(1)].dtype == torch.float32 and stored[kv_scale_key(1)].shape == (2,)

    # KV4 with per-tensor scales: refused when writing, when reading, and when requested.
    ckpt = read_checkpoint(path)
    with pytest.raises(ConfigError, match="'per_tensor' .* needs a KV8 precision, but w8a8kv4"):
        write_checkpoint(
            tmp_path / "kv4",
            ckpt.hf_config,
            parse("w8a8kv4"),
            ckpt.linears,
            ckpt.tensors,
            kv_scales=ckpt.kv_scales,
        )
    with pytest.raises(ConfigError, match="requested precision w8a8kv4"):
        ModelRunner(EngineConfig.from_kwargs(str(path), **OPTIONS, precision="w8a8kv4"))
    with pytest.raises(ConfigError, match="kv_cache_dtype='int4' contradicts precision w8a8kv8"):
        ModelRunner(EngineConfig.from_kwargs(str(path), **OPTIONS, kv_cache_dtype="int4"))

    def edited(name: str, config_edit: dict | None = None, tensor_edit: dict | None = None) -> Path:
        out = tmp_path / name
        out.mkdir()
        config = json.loads((path / CONFIG_FILE).read_text())
        config["quantization_config"].update(config_edit or {})
        (out / CONFIG_FILE).write_text(json.dumps(config))
        tensors = dict(stored)
        for key, t in (tensor_edit or {}).items():
            if t is None:
                del tensors[key]
            else:
                tensors[key] = t
        save_file(tensors, str(out / "model.safetensors"))
        return out

    cases = [
        (
            edited("json_kv4", {"precision": "w8a8kv4"}),
            "quantization_config: kv_granularity 'per_tensor'.*w8a8kv4",
        ),
        (
            edited("unknown", {"kv_granularity": "per_head"}),
            "kv_granularity 'per_head' is not supported",
        ),
        (
            edited("missing", tensor_edit={kv_scale_key(1): None}),
            f"tensor {kv_scale_key(1)} is missing",
        ),
        (
            edited("shape", tensor_edit={kv_scale_key(0): torch.ones(3)}),
            f"tensor {kv_scale_key(0)}: expected a float tensor of shape \\[2\\]",
        ),
        (
            edited("dtype", tensor_edit={kv_scale_key(0): torch.ones(2, dtype=torch.int32)}),
            "torch.int32",
        ),
        (
            edited("zero", tensor_edit={kv_scale_key(0): torch.tensor([0.1, 0.0])}),
            "positive and finite",
        ),
        (
            edited("extra", tensor_edit={kv_scale_key(5): torch.ones(2)}),
            f"tensor {kv_scale_key(5)} names no layer",
        ),
        (
            edited("not_static", {"kv_granularity": "per_token_head"}),
            "holds static KV scales, but .*kv_granularity is not 'per_tensor'",
        ),
    ]
    for broken, message in cases:
        with pytest.raises(CheckpointError, match=message):
            read_checkpoint(broken)
