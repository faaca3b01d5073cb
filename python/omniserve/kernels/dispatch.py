"""Kernel or torch reference, for each op of a model: decided once, when the model is built.

The model runner calls `decide` with the device, the compute dtype, `attention_backend` and the
model's `ModelShape`; the model and its layers are built from the resulting `KernelChoices` and
keep the chosen callable or flag, so no forward asks again. Every `Choice` carries its reason,
which the runner logs.

An op takes its kernel only on a CUDA device, where `attention_backend` allows it (attention ops),
for the dtypes and shapes its kernel module supports (`unsupported` there), and once its extension
is built and loaded. The checks run in that order, so an extension is built only for an op that
would use it, and never off a CUDA device: on the CPU nothing is compiled or even probed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch

from omniserve.kernels import attention, fused, gemm, rope_kv
from omniserve.kernels.build import (
    Extension,
    KernelBuildError,
    KernelUnavailableError,
    unavailable_reason,
)


@dataclass(frozen=True, slots=True)
class Choice:
    kernel: bool
    """Whether the CUDA kernel runs (else the torch reference, or nothing: `reason` says)."""
    reason: str
    """"kernel", "reference: <why>", or "unused: <why>" for an op the model does not run."""
    fallback: bool = False
    """The reference runs on a CUDA device though nobody asked for it (a shape, dtype or build
    the kernel cannot take): slower, and worth a warning."""


KERNEL = Choice(True, "kernel")


def reference(why: str, fallback: bool = False) -> Choice:
    return Choice(False, f"reference: {why}", fallback)


def unused(why: str) -> Choice:
    return Choice(False, f"unused: {why}")


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the kernels' support depends on in a model (models/llama.py `kernel_shape`)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    projections: Mapping[str, tuple[tuple[int, ...], int]] = field(default_factory=dict)
    """Each quantized projection: name → (output sizes of its shards, in_features); empty for fp
    weights, which quantize no activations."""
    streaming: bool = False
    """Whether some KV heads stream (their prefill takes a block-sparse path)."""
    fp8: bool = False
    """Whether the projections are FP8 (`layers/fp8_linear.py`; then `projections` is empty)."""


@dataclass(frozen=True, slots=True)
class KernelChoices:
    act_quant: Choice
    """Per-token int8 activation quantization and the ops fused with it (kernels/fused.py)."""
    rope_kv: Choice
    """The fused RoPE + KV cache write (kernels/rope_kv.py)."""
    decode_attention: Choice
    """Paged decode attention (kernels/attention.py)."""
    stream_prefill: Choice
    """Streaming heads' block-sparse prefill with FlexAttention (layers/sparse_prefill.py; a
    Triton kernel torch compiles), else SDPA under a dense mask."""
    gemm: Mapping[str, Choice]
    """The quantized GEMM (kernels/gemm.py) of each `ModelShape.projections` entry, by name."""
    fp8_gemm: Choice | None
    """cuBLAS's FP8 GEMM (`torch._scaled_mm`) for every projection of an FP8 model; None for
    other models."""

    def activation_ops(self) -> fused.ActivationOps:
        """The int8-activation ops `act_quant` chose: the kernels or their references."""
        return fused.activation_ops(self.act_quant.kernel)

    def by_op(self) -> list[tuple[str, Choice]]:
        """(op, choice) for every op, in a fixed order."""
        gemms = [(f"quantized GEMM {name}", c) for name, c in self.gemm.items()]
        if self.fp8_gemm is not None:
            gemms = [("FP8 GEMM", self.fp8_gemm)]
        elif not gemms:
            gemms = [("quantized GEMM", unused("fp weights"))]
        return [
            ("activation quantization", self.act_quant),
            ("RoPE + KV write", self.rope_kv),
            ("decode attention", self.decode_attention),
            ("streaming-head prefill", self.stream_prefill),
            *gemms,
        ]

    def summary(self) -> list[tuple[str, str]]:
        """(op, reason) for every op, in a fixed order: what the runner logs."""
        return [(op, choice.reason) for op, choice in self.by_op()]

    def fallbacks(self) -> list[tuple[str, str]]:
        """(op, reason) of every op that falls back to its reference (`Choice.fallback`)."""
        return [(op, choice.reason) for op, choice in self.by_op() if choice.fallback]


Probe = Callable[[Extension], str | None]
"""Why an extension cannot run on the device (None: it is built and loaded)."""


def kernel_problem(ext: Extension, device: torch.device) -> str | None:
    """The default `Probe` on a CUDA `device`: the GPU and sources are usable, then `ext` builds
    (or is already cached) and imports."""
    reason = unavailable_reason(device)
    if reason is not None:
        return reason
    try:
        ext.load()
    except KernelUnavailableError as exc:  # a requirement beyond the GPU (sources, headers)
        return str(exc)
    except KernelBuildError as exc:
        return f"CUDA kernels failed to build: {exc}"
    return None


def decide(
    *,
    device: torch.device,
    dtype: torch.dtype,
    attention_backend: Literal["auto", "torch"],
    shape: ModelShape,
    probe: Probe | None = None,
) -> KernelChoices:
    """Each op's choice for a model of `shape` computing in `dtype` on `device`.

    `probe` (default `kernel_problem` on `device`) is asked at most once per extension, and only
    on a CUDA device for an op whose other checks pass; a test can pass its own to decide for a
    GPU it does not have."""
    asked: dict[str, str | None] = {}

    def problem(ext: Extension) -> str | None:
        if ext.name not in asked:
            asked[ext.name] = kernel_problem(ext, device) if probe is None else probe(ext)
        return asked[ext.name]

    def choose(ext: Extension, *checks: Callable[[], str | None]) -> Choice:
        if device.type != "cuda":
            return reference(f"device is {device.type}")
        for check in (*checks, lambda: problem(ext)):
            why = check()
            if why is not None:
                return reference(why, fallback=check is not backend)
        return KERNEL

    def backend() -> str | None:
        return f"attention_backend={attention_backend!r}" if attention_backend == "torch" else None

    heads, kv_heads, head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
    return KernelChoices(
        act_quant=(
            choose(fused.EXTENSION, lambda: fused.unsupported(dtype))
            if shape.projections
            else unused("FP8 activations" if shape.fp8 else "fp weights")
        ),
        rope_kv=choose(
            rope_kv.EXTENSION,
            backend,
            lambda: rope_kv.unsupported(head_dim, dtype),
        ),
        decode_attention=choose(
            attention.EXTENSION,
            backend,
            lambda: attention.unsupported(heads, kv_heads, head_dim, dtype),
        ),
        stream_prefill=_stream_prefill(device, shape, backend()),
        gemm={
            name: choose(gemm.EXTENSION, partial(gemm.unsupported, sizes, k))
            for name, (sizes, k) in shape.projections.items()
        },
        fp8_gemm=_fp8_gemm(device) if shape.fp8 else None,
    )


FP8_CAPABILITY = (8, 9)
"""Compute capability from which GPUs have FP8 tensor cores (Ada, Hopper and later)."""


def _fp8_gemm(device: torch.device) -> Choice:
    """cuBLAS's FP8 GEMM on a GPU with FP8 tensor cores; nothing to build."""
    if device.type != "cuda":
        return reference(f"device is {device.type}")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        return reference(
            f"FP8 tensor cores need compute capability 8.9+, this GPU has "
            f"{capability[0]}.{capability[1]}",
            fallback=True,
        )
    return KERNEL


def _stream_prefill(device: torch.device, shape: ModelShape, backend: str | None) -> Choice:
    """FlexAttention on a CUDA device with Triton, unless attention_backend is "torch"."""
    if not shape.streaming:
        return unused("no streaming heads")
    if device.type != "cuda":
        return reference(f"device is {device.type}")
    if backend is not None:
        return reference(backend)
    if importlib.util.find_spec("triton") is None:
        return reference("FlexAttention needs Triton, which is not installed", fallback=True)
    return KERNEL
