"""The large-M quantized GEMM on Hopper: the packed weight expanded to int8, then CUTLASS.

At prefill-sized M the quantized GEMMs are compute-bound, and what they need is a TMA-fed,
warp-specialized wgmma mainloop at the INT8 tensor-core rate; CUTLASS's sm90 collectives are that
(`cuda/gemm/cutlass_int8.cuh`). They read both operands as plain K-major int8, so each call first
expands the packed weight (kernels/gemm.py layout) into a persistent int8 workspace
(`cuda/gemm_unpack.cu`: W8 codes, W4 codes, or g128's level-1 w8, the B of the integer core), then
runs the GEMM with the format's epilogue fused, in the operation order of the reference
(`formats/gemm.py`). The expansion costs ~1.5 bytes of traffic per weight element, which M ≥
`MIN_M` tokens amortize; smaller M stays on the kernels that read the packed weight directly.

Needs CUTLASS's headers at build time (`pip install --no-deps nvidia-cutlass`); without them
`available()` is False and kernels/gemm.py keeps its own tensor-core kernel for every M.
"""

from __future__ import annotations

import functools
import threading

import torch

from omniserve.formats.activation import QuantizedActivation
from omniserve.kernels.build import Extension
from omniserve.kernels.packed_weight import PackedWeight

EXTENSION = Extension(
    "omniserve_gemm_cutlass",
    (
        "gemm_cutlass_f32.cu",
        "gemm_cutlass_f16.cu",
        "gemm_cutlass_bf16.cu",
        "gemm_unpack.cu",
        "gemm_cutlass_ops.cpp",
    ),
    # The epilogue's products must round one by one, as the reference's do (no FMA contraction).
    cuda_flags=("-fmad=false", "--expt-relaxed-constexpr"),
    needs_cutlass=True,
)

MIN_M = 512
"""Smallest M the automatic dispatch sends here: one threshold for all three formats, near where
this path (expansion included) overtakes the packed wgmma kernel on the Llama-3-8B projections;
the formats cross over at somewhat different M. Retune by timing both paths:
`python -m omniserve.bench.kernels_gemm --paths tensor_core cutlass`."""

_lock = threading.Lock()
_workspaces: dict[torch.device, list[torch.Tensor]] = {}


@functools.cache
def available() -> bool:
    """Whether this path can be built here (CUTLASS headers found); asked once per process."""
    return EXTENSION.missing_requirement() is None


def workspace(device: torch.device, numel: int) -> torch.Tensor:
    """The device's int8 scratch for an expanded weight: the largest handed out so far, or a new
    one when a larger N·K is asked for. Allocated once per shape growth (the engine's memory
    profiling run reaches the largest layer), never per call; one GEMM at a time uses it, in
    stream order. Outgrown buffers are kept, not freed: a captured CUDA graph replays the address
    it was captured with, which must not be handed to another tensor."""
    with _lock:
        buffers = _workspaces.setdefault(device, [])
        if not buffers or buffers[-1].numel() < numel:
            buffers.append(torch.empty(numel, dtype=torch.int8, device=device))
        return buffers[-1]


def unpack_int8(fmt_index: int, w: PackedWeight) -> torch.Tensor:
    """int8 [N, K]: the integer-core operand B of a packed weight, in a fresh tensor (for tests;
    the GEMM expands into the workspace). `fmt_index` is kernels/gemm.py's format number."""
    n, k = w.shape
    out = torch.empty(n, k, dtype=torch.int8, device=w.weight.device)
    return EXTENSION.load().unpack_int8(fmt_index, w.weight, w.groups, out)


def gemm(fmt_index: int, x: QuantizedActivation, w: PackedWeight, out_kind: int) -> torch.Tensor:
    """y [M, N] = the reference GEMM of w's format, rounded once to the output of `out_kind`
    (cuda/gemm/params.h OutKind: fp32, fp16 or bf16)."""
    n, k = w.shape
    return EXTENSION.load().gemm(
        fmt_index,
        x.q,
        x.scales,
        x.sums if w.szeros is not None else None,
        w.weight,
        w.groups,
        w.scales,
        w.szeros,
        out_kind,
        workspace(x.q.device, n * k),
    )
