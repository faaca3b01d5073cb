"""Random quantized weights (load_format "dummy"), which the throughput benchmark builds from a
config alone: every QuantizedLinear slice holds the RTN of seeded random fp weights in the stored
format of the precision, on the target device; the model generates, deterministically per seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from omniserve.bench.throughput import preset_config
from omniserve.config import EngineConfig
from omniserve.engine.engine import Engine
from omniserve.errors import CheckpointError
from omniserve.formats.packing import unpack_w4
from omniserve.formats.precision import parse
from omniserve.formats.weight import (
    PROTECTIVE_QMAX,
    W8_QMAX,
    W4A8PerChannelWeight,
    W4A8PerGroupWeight,
    W8A8Weight,
    weight_format,
)
from omniserve.kernels import dispatch
from omniserve.kernels.build import kernels_available
from omniserve.layers.norm import RMSNorm
from omniserve.layers.quantized_linear import QuantizedLinear
from omniserve.models.llama import kernel_shape
from omniserve.models.loader import (
    DUMMY_INIT_STD,
    load_hf_config,
    load_model,
    quantized_slots,
)
from omniserve.sampling_params import SamplingParams

SYSTEMS = [("w4a8kv4", -1), ("w4a8kv4", 128), ("w8a8kv8", -1)]
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
PROMPTS = [list(range(20, 37)), list(range(300, 309))]
OUTPUT_LEN = 8


def _config_dir(directory: Path, preset: str = "tiny-llama", **overrides: object) -> Path:
    (directory / "config.json").write_text(json.dumps({**preset_config(preset), **overrides}))
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bench's tiny-llama preset: hidden 128, intermediate 256, so every format fits."""
    return _config_dir(tmp_path_factory.mktemp("tiny-llama"))


def _engine(directory: Path, precision: str, group_size: int, seed: int) -> Engine:
    return Engine(
        EngineConfig.from_kwargs(
            str(directory),
            load_format="dummy",
            precision=precision,
            group_size=group_size,
            seed=seed,
            device="cpu",
            skip_tokenizer_init=True,
            page_size=16,
            num_kv_pages=16,
            max_num_seqs=4,
            max_model_len=64,
        )
    )


def _greedy(engine: Engine) -> list[list[int]]:
    params = SamplingParams(max_tokens=OUTPUT_LEN, ignore_eos=True, temperature=0.0)
    return [o.token_ids for o in engine.generate(PROMPTS, params, use_tqdm=False)]


def _stored(engine: Engine) -> dict[str, torch.Tensor]:
    """Every stored tensor of every quantized slice, by checkpoint name."""
    return {
        f"{name}.{field}": tensor
        for name, (module, index) in quantized_slots(engine.runner.model).items()
        for field, tensor in module.weights[index].tensors().items()
    }


@pytest.mark.parametrize(("precision", "group_size"), SYSTEMS)
def test_dummy_quantized_model_is_deterministic_per_seed(
    tiny: Path, precision: str, group_size: int
) -> None:
    a, b, c = (_engine(tiny, precision, group_size, seed) for seed in (1, 1, 2))
    tokens = [_greedy(e) for e in (a, b, c)]
    assert [len(t) for t in tokens[0]] == [OUTPUT_LEN] * len(PROMPTS)
    assert tokens[0] == tokens[1] and tokens[0] != tokens[2]
    same, other = _stored(b), _stored(c)
    stored = _stored(a)
    assert stored.keys() == same.keys() == other.keys()
    assert all(torch.equal(stored[k], same[k]) for k in stored)
    codes = [k for k in stored if k.endswith((".qweight", ".weight"))]
    assert len(codes) == 2 * len(PROJECTIONS)
    assert not any(torch.equal(stored[k], other[k]) for k in codes)
    fp_same = dict(b.runner.model.named_parameters())
    fp_other = dict(c.runner.model.named_parameters())
    for name, param in a.runner.model.named_parameters():
        assert torch.equal(param, fp_same[name])
        assert name.endswith("norm.weight") or not torch.equal(param, fp_other[name])


@pytest.mark.parametrize(("precision", "group_size"), SYSTEMS)
def test_dummy_quantized_weights_are_rtn_in_the_precision_format(
    tiny: Path, precision: str, group_size: int
) -> None:
    model = _engine(tiny, precision, group_size, seed=0).runner.model
    fmt = weight_format(parse(precision, group_size))
    slots = quantized_slots(model)
    assert sorted(slots) == sorted(f"model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS)
    for name, (module, index) in slots.items():
        w = module.weights[index]
        assert type(w) is fmt, name
        assert w.shape == (module.out_sizes[index], module.in_features)
        assert all(t.device.type == "cpu" for t in w.tensors().values())
        # RTN of N(0, DUMMY_INIT_STD): the spread of the other random weights, centred on 0.
        deq = w.dequantize()
        assert abs(deq.std().item() / DUMMY_INIT_STD - 1) < 0.1, name
        assert abs(deq.mean().item()) < 0.1 * DUMMY_INIT_STD, name
        # RTN puts each row's extremes at the ends of the code range (formats/weight.py).
        if isinstance(w, W8A8Weight):
            assert (w.weight.abs().amax(1) == W8_QMAX).all(), name
        elif isinstance(w, W4A8PerChannelWeight):
            q = unpack_w4(w.qweight)
            assert ((q.amax(1) - q.amin(1)) >= 14).all(), name
        else:
            assert isinstance(w, W4A8PerGroupWeight)
            # |w8 - q1| <= s2 / 2 <= 8 and each row's level-1 codes reach +-PROTECTIVE_QMAX.
            assert (w.int8_weight().abs().amax(1) >= PROTECTIVE_QMAX - 8).all(), name
    for module in model.modules():
        if isinstance(module, RMSNorm):
            assert (module.weight == 1).all()
    for param in (model.model.embed_tokens.weight, model.lm_head.weight):
        assert abs(param.std().item() / DUMMY_INIT_STD - 1) < 0.1


def test_dummy_quantized_shape_errors_name_the_format(tmp_path: Path) -> None:
    narrow = _config_dir(tmp_path, hidden_size=64, head_dim=16)
    with pytest.raises(
        CheckpointError, match="W4A8PerGroupWeight needs N a positive multiple of 32 and K of 128"
    ):
        _engine(narrow, "w4a8kv4", 128, seed=0)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize(("precision", "group_size"), SYSTEMS)
def test_llama3_8b_dummy_quantized_on_gpu(tmp_path: Path, precision: str, group_size: int) -> None:
    """Llama-3-8B's shape quantizes on the GPU one slice at a time: the peak above the finished
    model stays near one slice's fp32 weights and the quantizer's temporaries (the largest slice,
    14336 x 4096, is 0.22 GiB in fp32; the fp model would be 15 GiB in bf16), and on Hopper every
    linear is packed for the CUDA kernels."""
    directory = _config_dir(tmp_path, "llama-3-8b")
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    hf_config, p = load_hf_config(str(directory)), parse(precision, group_size)
    kernels = dispatch.decide(
        device=device,
        dtype=torch.bfloat16,
        attention_backend="auto",
        shape=kernel_shape(hf_config, p),
    )
    model = load_model(
        str(directory),
        hf_config,
        device=device,
        dtype=torch.bfloat16,
        max_positions=8192,
        kernels=kernels,
        precision=p,
        dummy_seed=0,
    ).model
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device) - base
    transient = torch.cuda.max_memory_allocated(device) - base - held
    assert transient < 2 * 2**30
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 4 * 32  # qkv (fused), o_proj, gate/up (fused), down_proj per layer
    if kernels_available(device):
        assert all(choice.kernel for choice in kernels.gemm.values())
        assert all(m.uses_kernels and m.packed is not None for m in linears)
