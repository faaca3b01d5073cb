"""The large-M GEMM path (kernels/gemm_cutlass.py): packed weight expanded to int8, then CUTLASS.

CPU (always run): where the CUTLASS headers are looked for and what is said when they are missing;
which M the automatic dispatch sends to this path.
GPU (`gpu` marker, and the CUTLASS headers installed): the expansion equals the integer core's B of
`formats.gemm` exactly; outputs equal the reference epilogue rounded once to fp32/fp16/bf16 (same op
order, no FMA contraction: asserted to one ulp, as for the other kernels) at M around and far above
the dispatch threshold, on the Llama-3-8B and Llama-2-7B shapes; bad input is rejected.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omniserve.formats.gemm import quantized_linear
from omniserve.kernels import build, gemm_cutlass
from omniserve.kernels import gemm as gk
from test_kernels_gemm import (
    FORMATS,
    LLAMA2_7B,
    LLAMA3_8B,
    _activation,
    _assert_matches_reference,
    _cuda_case,
    _int_weight,
    _weight,
)


def test_cutlass_headers_are_found_through_the_override(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "cutlass").mkdir()
    (tmp_path / "cutlass" / "cutlass.h").write_text("// stand-in\n")
    monkeypatch.setenv(build.CUTLASS_ENV, str(tmp_path))
    assert build.cutlass_include_dir() == tmp_path
    assert gemm_cutlass.EXTENSION.missing_requirement() is None


def test_missing_cutlass_is_named_with_the_fix(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(build.CUTLASS_ENV, str(tmp_path))  # no cutlass/ inside
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name: None)
    assert build.cutlass_include_dir() is None
    reason = gemm_cutlass.EXTENSION.missing_requirement()
    assert reason is not None and "pip install --no-deps nvidia-cutlass" in reason
    assert build.CUTLASS_ENV in reason


def test_dispatch_threshold(monkeypatch) -> None:
    monkeypatch.setattr(gemm_cutlass, "available", lambda: True)
    below, at = gemm_cutlass.MIN_M - 1, gemm_cutlass.MIN_M
    assert not gk._takes_cutlass(below, torch.bfloat16, "auto")
    assert gk._takes_cutlass(at, torch.bfloat16, "auto")
    assert not gk._takes_cutlass(at, torch.int32, "auto")  # accumulators: the packed kernels
    assert not gk._takes_cutlass(at, torch.bfloat16, "tensor_core")
    assert gk._takes_cutlass(1, torch.float16, "cutlass")
    with pytest.raises(ValueError, match="does not expose int32 accumulators"):
        gk._takes_cutlass(at, torch.int32, "cutlass")
    monkeypatch.setattr(gemm_cutlass, "available", lambda: False)
    assert not gk._takes_cutlass(at, torch.bfloat16, "auto")


def test_workspace_grows_and_keeps_what_it_handed_out(monkeypatch) -> None:
    """Pure bookkeeping (here on the CPU): a smaller request reuses the buffer, a larger one gets
    a new buffer, and the outgrown one stays referenced (a CUDA graph may hold its address)."""
    monkeypatch.setattr(gemm_cutlass, "_workspaces", {})
    cpu = torch.device("cpu")
    first = gemm_cutlass.workspace(cpu, 1 << 12)
    assert first.dtype == torch.int8 and first.numel() == 1 << 12
    assert gemm_cutlass.workspace(cpu, 1 << 10) is first
    grown = gemm_cutlass.workspace(cpu, (1 << 12) + 128)
    assert grown is not first and grown.numel() == (1 << 12) + 128
    kept = gemm_cutlass._workspaces[cpu]
    assert len(kept) == 2 and kept[0] is first and kept[1] is grown
    assert gemm_cutlass.workspace(cpu, 1) is grown


# ------------------------------------------------------------------------------------------------
# GPU


gpu = pytest.mark.gpu
needs_cutlass = pytest.mark.skipif(
    not torch.cuda.is_available() or not gemm_cutlass.available(),
    reason="needs a CUDA device and CUTLASS headers (pip install --no-deps nvidia-cutlass)",
)


@gpu
@needs_cutlass
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(128, 128), (384, 1152), *LLAMA3_8B], ids=str)
def test_unpack_equals_the_integer_core_operand(fmt: str, shape: tuple[int, int]) -> None:
    n, k = shape
    w = _weight(fmt, n, k, seed=n + k, device="cuda")
    assert torch.equal(gk.unpack_int8(gk.pack(w)), _int_weight(w).to(torch.int8))


@gpu
@needs_cutlass
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32))
@pytest.mark.parametrize("m", (1, 7, 255, 1023, 1024, 4097))
def test_output_matches_reference_epilogue(fmt: str, dtype: torch.dtype, m: int) -> None:
    w, packed, x = _cuda_case(fmt, m, 384, 1152, seed=300 + m)
    y = gk.quantized_gemm(x, packed, dtype, "cutlass")
    assert y.dtype == dtype and y.shape == (m, 384)
    _assert_matches_reference(y, quantized_linear(x, w))


@gpu
@needs_cutlass
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", sorted(set(LLAMA3_8B + LLAMA2_7B)), ids=str)
def test_llama_shapes_auto_dispatch(fmt: str, shape: tuple[int, int], monkeypatch) -> None:
    n, k = shape
    m = gemm_cutlass.MIN_M + 37
    w, packed, x = _cuda_case(fmt, m, n, k, seed=n + k)
    calls = []
    original = gemm_cutlass.gemm
    monkeypatch.setattr(gemm_cutlass, "gemm", lambda *a: calls.append(1) or original(*a))
    y = gk.quantized_gemm(x, packed, torch.bfloat16)
    assert calls, "M >= MIN_M must dispatch to the CUTLASS path"
    _assert_matches_reference(y, quantized_linear(x, w))


@gpu
@needs_cutlass
def test_bad_input_is_rejected() -> None:
    _, packed, x = _cuda_case("w4a8_per_channel", 1024, 128, 256, seed=0)
    with pytest.raises(ValueError, match="does not expose int32"):
        gk.int_accumulator(x, packed, "cutlass")
    with pytest.raises(ValueError, match="activations have K = 128"):
        gk.quantized_gemm(_activation(4, 128, 0, "cuda"), packed, torch.float16, "cutlass")
    ext = gemm_cutlass.EXTENSION.load()
    with pytest.raises(RuntimeError, match="workspace must be a contiguous int8 tensor"):
        ext.gemm(
            1,
            x.q,
            x.scales,
            x.sums,
            packed.weight,
            None,
            packed.scales,
            packed.szeros,
            2,
            torch.empty(16, dtype=torch.int8, device="cuda"),
        )
    with pytest.raises(RuntimeError, match="needs activation sums"):
        ext.gemm(
            1,
            x.q,
            x.scales,
            None,
            packed.weight,
            None,
            packed.scales,
            packed.szeros,
            2,
            gemm_cutlass.workspace(x.q.device, 128 * 256),
        )
    with pytest.raises(RuntimeError, match="out kind 0"):
        ext.gemm(
            1,
            x.q,
            x.scales,
            x.sums,
            packed.weight,
            None,
            packed.scales,
            packed.szeros,
            0,
            gemm_cutlass.workspace(x.q.device, 128 * 256),
        )
