"""A W4A8/W8A8 decoder reads its projections' int8 inputs from the fused (residual add +)
RMSNorm+quant and SiLU·mul+quant ops (models/llama.py `projection_input_ops`, kernels/fused.py),
and QuantizedLinear takes those already-quantized activations.

CPU (the reference path): the fused ops' references are add → norm → quantize_per_token and
silu·mul → quantize_per_token, so the model's logits must be bit-identical to the unfused
composition (the same quantized model whose norms and act emit floats for QuantizedLinear to
quantize, as before the fusion), in fp32 and bf16, and the fused ops must be the ones that ran.
Moving each residual add into the norm after it must not change the logits either: they equal
those of the layer structure before it (each layer adding its own outputs), quantized or not.

GPU: the bf16 model on the kernels (fused ops + quantized GEMMs) against the CPU bf16 reference
path. The two differ where CUDA rounds in another order (attention, lm_head, the GEMM epilogue's
last ulp, RMSNorm's rare one-code flips, see kernels/fused.py); each difference is at most about a
bf16 rounding where it arises, so we ask for at most twice the error the CPU bf16 run itself makes
against the CPU fp32 one, plus 0.02 (the largest relative logit error ‖ŷ − y‖ / ‖y‖ over a step's
requests). On the CPU, that bf16 error is 0.05-0.10 on these models (measured), so the bound is
~0.15-0.22, while a broken GEMM, scale or op wiring gives errors of order 1 (test_quant_engine.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from omniserve.config import EngineConfig
from omniserve.formats.activation import QuantizedActivation
from omniserve.formats.precision import parse
from omniserve.formats.weight import quantize_weight, weight_format
from omniserve.kernels import fused
from omniserve.kernels.build import kernels_available
from omniserve.layers.activation import SiluAndMul
from omniserve.layers.attention import AttentionMetadata
from omniserve.layers.quantized_linear import QuantizedLinear
from omniserve.models import llama
from omniserve.quantize.rtn_model import write_rtn_checkpoint
from omniserve.runner.model_runner import ModelRunner
from tiny_models import PagedRequests, save_checkpoint

# (family, overrides): hidden 64 cannot hold 128-groups, so g128 runs on hidden 128, whose q/k/v,
# o, gate/up and down are all multiples of 128 (so every projection can run on the GEMM kernels).
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2": ("qwen2", {}),  # q/k/v biases: the bias add after a quantized input
    "llama3": ("llama3", {}),
    "llama3_h128": ("llama3", {"hidden_size": 128, "intermediate_size": 256}),
}
CASES = [("qwen2", "w4a8", -1), ("llama3_h128", "w4a8", 128), ("llama3", "w8a8", -1)]
PAGE_SIZE, NUM_PAGES = 16, 64
NUM_LAYERS = 2  # tiny_models' num_hidden_layers
STEPS = 2  # of _step_logits


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        name: _saved(tmp_path_factory.mktemp(name), family, overrides)
        for name, (family, overrides) in MODELS.items()
    }


def _saved(directory: Path, family: str, overrides: dict[str, Any]) -> Path:
    save_checkpoint(family, directory, **overrides)
    return directory


def _quantized(fp_dir: Path, precision: str, group_size: int) -> Path:
    """The RTN checkpoint of `fp_dir` next to it (written once per module)."""
    out = fp_dir.parent / f"{fp_dir.name}-{precision}-g{group_size}"
    if not out.exists():
        write_rtn_checkpoint(fp_dir, out, parse(precision, group_size))
    return out


def _runner(path: Path, device: str, dtype: str) -> ModelRunner:
    return ModelRunner(
        EngineConfig.from_kwargs(
            str(path), device=device, dtype=dtype, page_size=PAGE_SIZE, num_kv_pages=NUM_PAGES
        )
    )


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 384, (n,), generator=g).tolist() for n in (23, 5, 40)]


def _step_logits(runner: ModelRunner) -> list[torch.Tensor]:
    """fp32 CPU logits of two steps: prefills (the first prompt chunked), then the first prompt's
    last chunk beside two decodes."""
    p = _prompts()
    reqs = PagedRequests(PAGE_SIZE, NUM_PAGES)
    plans = [
        reqs.step([(0, p[0][:10]), (1, p[1]), (2, p[2])]),
        reqs.step([(0, p[0][10:]), (1, [7]), (2, [11])]),
    ]
    return [runner.compute_logits(plan)[1].cpu() for plan in plans]


class _Spy:
    """Records the device and dtype of the first argument of each call to an op, whichever of its
    implementations (kernel or reference) a model was built with."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, torch.dtype]] = []

    def wrap(self, op: Callable[..., Any]) -> Callable[..., Any]:
        def spied(x: torch.Tensor, *args: Any) -> Any:
            self.calls.append((x.device.type, x.dtype))
            return op(x, *args)

        return spied


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch) -> dict[str, _Spy]:
    """Spies on the int8-activation ops the model is built with (so build after this): the fused
    ops and the quantizer QuantizedLinear runs for float inputs."""
    out = {name: _Spy() for name in fused.ActivationOps._fields}
    chosen = fused.activation_ops

    def spied_ops(kernel: bool) -> fused.ActivationOps:
        ops = chosen(kernel)
        return fused.ActivationOps(*(out[n].wrap(op) for n, op in zip(ops._fields, ops)))

    monkeypatch.setattr(fused, "activation_ops", spied_ops)
    return out


def _unfused_runner(path: Path, dtype: str, monkeypatch: pytest.MonkeyPatch) -> ModelRunner:
    """The quantized model as it ran before the fusion: its norms and act are the fp model's
    (float outputs), and QuantizedLinear quantizes them with quantize_per_token."""
    float_ops = llama.projection_input_ops
    with monkeypatch.context() as patch:
        patch.setattr(llama, "projection_input_ops", lambda fmt, ops: float_ops(None, ops))
        return _runner(path, "cpu", dtype)


def _counts(spies: dict[str, _Spy]) -> dict[str, int]:
    return {name: len(spy.calls) for name, spy in spies.items()}


def _reset(spies: dict[str, _Spy]) -> None:
    for spy in spies.values():
        spy.calls.clear()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("model", "precision", "group_size"), CASES)
def test_fused_logits_equal_unfused_composition(
    checkpoints: dict[str, Path],
    spies: dict[str, _Spy],
    monkeypatch: pytest.MonkeyPatch,
    model: str,
    precision: str,
    group_size: int,
    dtype: str,
) -> None:
    path = _quantized(checkpoints[model], precision, group_size)
    runner = _runner(path, "cpu", dtype)
    _reset(spies)
    got = _step_logits(runner)
    # Per layer and step: two fused norms, one fused SiLU·mul; only o_proj quantizes for itself.
    # Every norm but the first layer's input norm adds a residual first.
    assert _counts(spies) == {
        "rmsnorm_quant": STEPS,
        "add_rmsnorm_quant": (2 * NUM_LAYERS - 1) * STEPS,
        "silu_mul_quant": NUM_LAYERS * STEPS,
        "quantize_per_token": NUM_LAYERS * STEPS,
    }
    model_dtype = getattr(torch, dtype)
    for name in ("rmsnorm_quant", "add_rmsnorm_quant"):
        assert set(spies[name].calls) == {("cpu", model_dtype)}
    assert all(
        m.dtype == model_dtype for m in runner.model.modules() if isinstance(m, QuantizedLinear)
    )

    unfused = _unfused_runner(path, dtype, monkeypatch)
    _reset(spies)
    want = _step_logits(unfused)
    assert _counts(spies) == {
        "rmsnorm_quant": 0,
        "add_rmsnorm_quant": 0,
        "silu_mul_quant": 0,
        "quantize_per_token": 4 * NUM_LAYERS * STEPS,
    }
    for g, w in zip(got, want, strict=True):
        assert g.shape == (3, 384) and torch.equal(g, w)


def _forward_adding_in_each_layer(
    self: llama.LlamaModel,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """LlamaModel.forward as it was before the residual adds moved into the norms after them:
    each layer adds its attention and MLP outputs itself, its norms only normalize."""
    rope = self.rotary(positions)
    x = self.embed_tokens(input_ids)
    for layer in self.layers:
        x = x + layer.self_attn(layer.normalize(x, layer.input_layernorm), rope, meta)
        x = x + layer.mlp(layer.normalize(x, layer.post_attention_layernorm))
    return self.norm(x)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize(
    ("model", "quantization"),
    [("qwen2", None), ("llama3", None), *((m, (p, g)) for m, p, g in CASES)],
    ids=lambda v: "fp" if v is None else "-".join(map(str, v)) if isinstance(v, tuple) else v,
)
def test_logits_equal_layers_adding_their_own_outputs(
    checkpoints: dict[str, Path],
    spies: dict[str, _Spy],
    monkeypatch: pytest.MonkeyPatch,
    model: str,
    quantization: tuple[str, int] | None,
    dtype: str,
) -> None:
    path = checkpoints[model]
    if quantization is not None:
        path = _quantized(path, *quantization)
    runner = _runner(path, "cpu", dtype)
    _reset(spies)
    got = _step_logits(runner)
    fused_adds = 0 if quantization is None else (2 * NUM_LAYERS - 1) * STEPS
    assert len(spies["add_rmsnorm_quant"].calls) == fused_adds
    monkeypatch.setattr(llama.LlamaModel, "forward", _forward_adding_in_each_layer)
    _reset(spies)
    want = _step_logits(runner)
    assert spies["add_rmsnorm_quant"].calls == []
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_fp_model_keeps_float_ops(checkpoints: dict[str, Path], spies: dict[str, _Spy]) -> None:
    runner = _runner(checkpoints["llama3"], "cpu", "float32")
    assert all(isinstance(layer.mlp.act, SiluAndMul) for layer in runner.model.model.layers)
    _reset(spies)
    _step_logits(runner)
    assert _counts(spies) == {
        "rmsnorm_quant": 0,
        "add_rmsnorm_quant": 0,
        "silu_mul_quant": 0,
        "quantize_per_token": 0,
    }


# ------------------------------------------------------------------------------------------------
# QuantizedLinear's quantized-input entry, on the reference path (CPU) and the kernels (GPU).

PRECISIONS = [("w4a8", -1), ("w4a8", 128), ("w8a8", -1)]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
K, SIZES = 256, (256, 128, 128)
"""A q/k/v-style layer whose N and K the GEMM kernels take."""


def _quantize(device: str) -> Callable[[torch.Tensor], QuantizedActivation]:
    """The per-token quantizer of bf16 activations on `device`: the kernel on CUDA."""
    return fused.activation_ops(kernel=device == "cuda").quantize_per_token


def _layer(precision: str, group_size: int, device: str) -> QuantizedLinear:
    if device == "cuda" and not kernels_available(torch.device("cuda")):
        pytest.skip("omniserve CUDA kernels unavailable")
    p = parse(precision, group_size)
    g = torch.Generator().manual_seed(0)
    layer = QuantizedLinear(
        K,
        SIZES,
        weight_format(p),
        bias=True,
        shard_names=("q", "k", "v"),
        kernel=device == "cuda",
        quantize=_quantize(device),
    )
    assert layer.dtype == torch.get_default_dtype()
    with torch.no_grad():
        layer.bias.copy_(torch.randn(sum(SIZES), generator=g))
    layer.to(device, torch.bfloat16)
    assert layer.dtype == torch.bfloat16  # the model dtype follows .to(), as the bias's does
    for i, n in enumerate(SIZES):
        weight = quantize_weight(0.1 * torch.randn(n, K, generator=g), p)
        layer.set_weight(i, weight, torch.device(device))
    assert layer.uses_kernels == (device == "cuda")
    return layer


def _activations(tokens: int, device: str) -> torch.Tensor:
    x = torch.randn(tokens, K, generator=torch.Generator().manual_seed(tokens))
    return (x * torch.logspace(-1, 1, tokens)[:, None]).to(device, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("precision", "group_size"), PRECISIONS)
def test_quantized_input_equals_float_input(precision: str, group_size: int, device: str) -> None:
    layer = _layer(precision, group_size, device)
    x = _activations(9, device)
    xq = _quantize(device)(x)  # the quantizer forward(x) runs
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (9, sum(SIZES))
    # A quantized input has no float dtype to take: forward returns the layer's (the model's).
    assert torch.equal(layer(xq), y)
    assert torch.equal(layer.forward_quantized(xq, torch.bfloat16), y)
    y32 = layer.forward_quantized(xq, torch.float32)
    assert y32.dtype == torch.float32
    # y rounds the GEMM to bf16 before the bias add, y32 after it: a bf16 ulp or two apart.
    torch.testing.assert_close(y32, y.float(), rtol=2**-7, atol=2**-7 * float(y.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_input_rejects_bad_activations(device: str) -> None:
    layer = _layer("w8a8", -1, device)
    xq = _quantize(device)(_activations(4, device))
    bad = [
        (xq._replace(q=xq.q[:, :128]), r"int8 of shape \[tokens, 256\], got .* \[4, 128\]"),
        (xq._replace(q=xq.q.float()), r"must be int8 .* got torch.float32 of shape \[4, 256\]"),
        (xq._replace(q=xq.q[0]), r"must be int8 .* got torch.int8 of shape \[256\]"),
        (xq._replace(scales=xq.scales.float()), r"scales must be torch.float16 .* torch.float32"),
        (xq._replace(scales=xq.scales[:3]), r"scales must be .* \[4\], got .* shape \[3\]"),
        (xq._replace(sums=xq.sums.long()), r"sums must be torch.int32 .* got torch.int64"),
    ]
    for activation, message in bad:
        with pytest.raises(ValueError, match=message):
            layer(activation)
    with pytest.raises(ValueError, match="out_dtype must be a float dtype, got torch.int32"):
        layer.forward_quantized(xq, torch.int32)


# ------------------------------------------------------------------------------------------------
# GPU: the model on the fused kernels and quantized GEMMs against the CPU reference path.


def _relative_errors(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """‖got − ref‖ / ‖ref‖ per row (request)."""
    return (got - ref).norm(dim=-1) / ref.norm(dim=-1)


@pytest.mark.gpu
@pytest.mark.parametrize(("precision", "group_size"), PRECISIONS)
def test_cuda_model_with_fused_ops_near_cpu_reference(
    checkpoints: dict[str, Path], spies: dict[str, _Spy], precision: str, group_size: int
) -> None:
    if not kernels_available(torch.device("cuda")):
        pytest.skip("omniserve CUDA kernels unavailable")
    path = _quantized(checkpoints["llama3_h128"], precision, group_size)
    runner = _runner(path, "cuda", "bfloat16")
    assert runner.kernels.act_quant.kernel  # bf16 on CUDA: the kernels of kernels/fused.py
    layers = [m for m in runner.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 4 * NUM_LAYERS and all(m.uses_kernels for m in layers)
    _reset(spies)
    got = _step_logits(runner)
    assert spies["rmsnorm_quant"].calls == [("cuda", torch.bfloat16)] * STEPS
    fused_adds = (2 * NUM_LAYERS - 1) * STEPS
    assert spies["add_rmsnorm_quant"].calls == [("cuda", torch.bfloat16)] * fused_adds
    assert spies["silu_mul_quant"].calls == [("cuda", torch.bfloat16)] * (NUM_LAYERS * STEPS)
    reference = _step_logits(_runner(path, "cpu", "bfloat16"))
    exact = _step_logits(_runner(path, "cpu", "float32"))
    for g, r, e in zip(got, reference, exact, strict=True):
        error, bf16_error = _relative_errors(g, r).max(), _relative_errors(r, e).max()
        assert error <= 2 * bf16_error + 0.02, (float(error), float(bf16_error))
