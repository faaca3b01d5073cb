"""The one kernel-or-reference seam (kernels/dispatch.py): each op's choice, and why, decided once
when the model is built; on the CPU without probing or building anything.

CPU (always run): the choices for a CUDA device are decided from a description of one, with a
`probe` standing in for building the extensions, so every rule (attention_backend, dtypes, head
dims, GQA ratios, GEMM shapes, build failures) is checked here; the runner logs each choice once
and builds its layers and step inputs from them. GPU: the real probe on the real device.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import pytest
import torch

from omniserve.config import EngineConfig
from omniserve.formats import activation
from omniserve.formats.precision import parse
from omniserve.kernels import attention, dispatch, fused, gemm, rope_kv
from omniserve.kernels.build import (
    Extension,
    KernelBuildError,
    KernelUnavailableError,
    unavailable_reason,
)
from omniserve.kernels.dispatch import KERNEL, Choice, ModelShape
from omniserve.layers.quantized_linear import QuantizedLinear
from omniserve.quantize.rtn_model import write_rtn_checkpoint
from omniserve.runner.model_runner import ModelRunner
from tiny_models import PagedRequests, save_checkpoint

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
PROJECTIONS = {
    "qkv_proj": ((4096, 1024, 1024), 4096),
    "o_proj": ((4096,), 4096),
    "gate_up_proj": ((14336, 14336), 4096),
    "down_proj": ((4096,), 14336),
}
LLAMA3_8B = ModelShape(32, 8, 128, PROJECTIONS)
"""A W4A8/W8A8 Llama-3-8B: every op but the streaming heads' prefill has a kernel for it."""
STREAMING_8B = ModelShape(32, 8, 128, PROJECTIONS, streaming=True)
"""The same with streaming heads: every op has a kernel for it."""
NO_STREAMING = ("streaming-head prefill", "unused: no streaming heads")


class _Probe:
    """Stands in for building: the extensions that fail (name → reason) and those asked."""

    def __init__(self, failing: dict[str, str] | None = None) -> None:
        self.failing = failing or {}
        self.asked: list[str] = []

    def __call__(self, ext: Extension) -> str | None:
        self.asked.append(ext.name)
        return self.failing.get(ext.name)


def _decide(
    shape: ModelShape = LLAMA3_8B,
    *,
    device: torch.device = CUDA,
    dtype: torch.dtype = torch.bfloat16,
    backend: Literal["auto", "torch"] = "auto",
    probe: _Probe | None = None,
) -> dispatch.KernelChoices:
    return dispatch.decide(
        device=device,
        dtype=dtype,
        attention_backend=backend,
        shape=shape,
        probe=_Probe() if probe is None else probe,
    )


def test_cpu_takes_every_reference_without_probing() -> None:
    probe = _Probe()
    choices = _decide(device=CPU, dtype=torch.float32, probe=probe)
    cpu = "reference: device is cpu"
    assert choices.summary() == [
        ("activation quantization", cpu),
        ("RoPE + KV write", cpu),
        ("decode attention", cpu),
        NO_STREAMING,
        *((f"quantized GEMM {name}", cpu) for name in PROJECTIONS),
    ]
    assert _decide(STREAMING_8B, device=CPU).stream_prefill == Choice(False, cpu)
    assert probe.asked == []
    assert choices.fallbacks() == []  # no kernel runs off a CUDA device: nothing to warn of
    assert choices.activation_ops() == (
        activation.quantize_per_token,
        activation.rmsnorm_quant,
        activation.add_rmsnorm_quant,
        activation.silu_mul_quant,
    )


def test_cpu_never_reaches_the_default_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    def probed(ext: Extension, device: torch.device) -> str | None:
        raise AssertionError(f"{ext.name} probed on {device}")

    monkeypatch.setattr(dispatch, "kernel_problem", probed)
    choices = dispatch.decide(
        device=CPU, dtype=torch.float32, attention_backend="auto", shape=LLAMA3_8B
    )
    assert not choices.rope_kv.kernel


def test_cuda_takes_every_kernel_that_builds_probing_each_extension_once() -> None:
    probe = _Probe()
    choices = _decide(STREAMING_8B, probe=probe)
    assert [reason for _, reason in choices.summary()] == ["kernel"] * 8
    assert choices.activation_ops() == fused.activation_ops(kernel=True)
    assert choices.activation_ops().rmsnorm_quant is fused.rmsnorm_quant
    expected = [fused.EXTENSION, rope_kv.EXTENSION, attention.EXTENSION, gemm.EXTENSION]
    assert probe.asked == [e.name for e in expected]  # the GEMM's once for four projections


def test_torch_attention_backend_takes_both_attention_references() -> None:
    probe = _Probe()
    choices = _decide(backend="torch", dtype=torch.float16, probe=probe)
    torch_path = Choice(False, "reference: attention_backend='torch'")
    assert choices.rope_kv == choices.decode_attention == torch_path
    assert choices.act_quant == KERNEL and set(choices.gemm.values()) == {KERNEL}
    assert rope_kv.EXTENSION.name not in probe.asked
    assert attention.EXTENSION.name not in probe.asked
    assert choices.fallbacks() == []  # asked for, so no warning
    streaming = _decide(STREAMING_8B, backend="torch", dtype=torch.float16, probe=probe)
    assert streaming.stream_prefill == torch_path


def test_streaming_prefill_without_triton_falls_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = dispatch.importlib.util.find_spec
    monkeypatch.setattr(
        dispatch.importlib.util, "find_spec", lambda name: None if name == "triton" else real(name)
    )
    choices = _decide(STREAMING_8B)
    assert not choices.stream_prefill.kernel
    assert choices.fallbacks() == [("streaming-head prefill", choices.stream_prefill.reason)]
    assert "Triton" in choices.stream_prefill.reason


def test_fp_weights_leave_the_quantized_ops_unused() -> None:
    probe = _Probe()
    choices = _decide(ModelShape(32, 8, 128), probe=probe)
    assert choices.act_quant == Choice(False, "unused: fp weights") and choices.gemm == {}
    assert choices.summary()[-1] == ("quantized GEMM", "unused: fp weights")
    assert choices.rope_kv == choices.decode_attention == KERNEL
    assert probe.asked == [rope_kv.EXTENSION.name, attention.EXTENSION.name]


@pytest.mark.parametrize(
    ("shape", "dtype", "rope_reason", "decode_reason"),
    [
        (
            ModelShape(32, 8, 96, PROJECTIONS),
            torch.float16,
            "reference: head_dim 96 not supported (64, 128, 256)",
            "reference: head_dim 96 not supported (64, 128)",
        ),
        (
            ModelShape(16, 2, 256, PROJECTIONS),
            torch.bfloat16,
            "kernel",
            "reference: head_dim 256 not supported (64, 128)",
        ),
        (
            ModelShape(28, 4, 128, PROJECTIONS),
            torch.bfloat16,
            "kernel",
            "reference: 28 query heads over 4 KV heads not supported (query heads per KV head: "
            "1, 2, 4, 8)",
        ),
    ],
)
def test_attention_shapes_the_kernels_do_not_serve(
    shape: ModelShape, dtype: torch.dtype, rope_reason: str, decode_reason: str
) -> None:
    choices = _decide(shape, dtype=dtype)
    assert (choices.rope_kv.reason, choices.decode_attention.reason) == (rope_reason, decode_reason)
    assert choices.act_quant == KERNEL


def test_fp32_keeps_the_quantized_gemm_on_its_kernel() -> None:
    """The GEMM kernels write fp32 outputs too; the activation and attention kernels take
    fp16/bf16 only."""
    choices = _decide(dtype=torch.float32)
    fp32 = Choice(
        False, "reference: dtype torch.float32 not supported (float16, bfloat16)", fallback=True
    )
    assert choices.act_quant == choices.rope_kv == choices.decode_attention == fp32
    assert set(choices.gemm.values()) == {KERNEL}


def test_gemm_is_chosen_per_projection_shape() -> None:
    projections = {**PROJECTIONS, "down_proj": ((4096,), 11008 + 64), "o_proj": ((124, 4), 4096)}
    choices = _decide(ModelShape(32, 8, 128, projections))
    assert choices.gemm["qkv_proj"] == choices.gemm["gate_up_proj"] == KERNEL
    assert choices.gemm["down_proj"].reason == (
        "reference: [N, K] = [4096, 11072] not supported (multiples of 128 and 128)"
    )
    assert choices.gemm["o_proj"].reason == (
        "reference: shards of N [124, 4] not supported (multiples of 8)"
    )


def test_an_extension_that_fails_to_build_leaves_its_op_on_the_reference() -> None:
    failed = "CUDA kernels failed to build: nvcc not found"
    choices = _decide(probe=_Probe({gemm.EXTENSION.name: failed}))
    assert set(choices.gemm.values()) == {Choice(False, f"reference: {failed}", fallback=True)}
    assert [op for op, _ in choices.fallbacks()] == [f"quantized GEMM {n}" for n in choices.gemm]
    assert choices.act_quant == choices.rope_kv == choices.decode_attention == KERNEL


def test_default_probe_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kernel_problem`: the device's unavailability first, then what building or loading
    raised (the loads are faked: no GPU here)."""
    ext = fused.EXTENSION
    if unavailable_reason(CUDA) is not None:
        assert dispatch.kernel_problem(ext, CUDA) == unavailable_reason(CUDA)
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda device: None)
    outcomes: list[Exception | None] = [
        KernelBuildError("building CUDA extension 'omniserve_fused_quant' failed: boom"),
        KernelUnavailableError("extension 'omniserve_fused_quant': missing source files"),
        None,
    ]

    def load(self: Extension) -> None:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    monkeypatch.setattr(Extension, "load", load)
    assert dispatch.kernel_problem(ext, CUDA) == (
        "CUDA kernels failed to build: building CUDA extension 'omniserve_fused_quant' failed: boom"
    )
    assert dispatch.kernel_problem(ext, CUDA) == (
        "extension 'omniserve_fused_quant': missing source files"
    )
    assert dispatch.kernel_problem(ext, CUDA) is None


def test_runner_logs_each_choice_once_and_builds_on_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_checkpoint("llama3", tmp_path / "fp")
    write_rtn_checkpoint(tmp_path / "fp", tmp_path / "w8a8", parse("w8a8"))
    config = EngineConfig.from_kwargs(
        str(tmp_path / "w8a8"),
        device="cpu",
        page_size=16,
        num_kv_pages=16,
        max_num_seqs=4,
        max_num_batched_tokens=64,
    )
    logger = "omniserve.runner.model_runner"
    with caplog.at_level(logging.INFO, logger=logger):
        runner = ModelRunner(config)
        runner.compute_logits(PagedRequests(16, 16).step([(0, [5, 6, 7]), (1, [8])]))
    logged = [r.getMessage() for r in caplog.records if r.name == logger]
    assert logged == [f"{op}: {reason}" for op, reason in runner.kernels.summary()]
    assert len(logged) == 8 and all(
        m.endswith(": reference: device is cpu") or m == ": ".join(NO_STREAMING) for m in logged
    )
    assert not any(layer.fused_rope_kv for layer in runner.model.attention_layers)
    assert not runner._inputs.decode_kernel
    linears = [m for m in runner.model.modules() if isinstance(m, QuantizedLinear)]
    assert linears and not any(m.uses_kernels for m in linears)
    assert all(m.quantize is activation.quantize_per_token for m in linears)


@pytest.mark.gpu
def test_gpu_choices_on_this_device() -> None:
    """On a Hopper GPU every op of the Llama-3-8B shape takes its kernel (building them); on
    another GPU each says why not."""
    choices = dispatch.decide(
        device=CUDA, dtype=torch.bfloat16, attention_backend="auto", shape=STREAMING_8B
    )
    reason = unavailable_reason(CUDA)
    want = "kernel" if reason is None else f"reference: {reason}"
    summary = dict(choices.summary())
    assert summary.pop("streaming-head prefill") == "kernel"  # Triton is on every CUDA box here
    assert list(summary.values()) == [want] * 7


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ((9, 0), KERNEL),
        ((8, 9), KERNEL),
        (
            (8, 0),
            Choice(
                False,
                "reference: FP8 tensor cores need compute capability 8.9+, this GPU has 8.0",
                fallback=True,
            ),
        ),
    ],
)
def test_fp8_models_take_cublas_where_the_gpu_has_fp8_tensor_cores(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], expected: Choice
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    probe = _Probe()
    choices = _decide(ModelShape(32, 8, 128, fp8=True), probe=probe)
    assert choices.fp8_gemm == expected and choices.gemm == {}
    assert choices.act_quant == Choice(False, "unused: FP8 activations")
    assert choices.summary()[-1] == ("FP8 GEMM", expected.reason)
    assert fused.EXTENSION.name not in probe.asked and gemm.EXTENSION.name not in probe.asked
    cpu = _decide(ModelShape(32, 8, 128, fp8=True), device=CPU, dtype=torch.float32)
    assert cpu.fp8_gemm == Choice(False, "reference: device is cpu")
    assert _decide().fp8_gemm is None  # integer and fp models have no FP8 GEMM
