"""The kernel build system on any machine: `omniserve build-kernels` parses and reports clear
errors, builds are keyed by sources and flags, and without a usable GPU every op falls back to its
torch reference while loading an extension says why it cannot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omniserve.cli.main import main
from omniserve.kernels import (
    EXTENSION_MODULES,
    KernelUnavailableError,
    all_extensions,
    build,
    fused,
    kernels_available,
    load_extension,
)
from omniserve.layers.norm import RMSNorm
from omniserve.quant import activation

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def test_build_kernels_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["build-kernels", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: omniserve build-kernels" in out and "--only" in out


def test_every_extension_has_its_sources() -> None:
    extensions = all_extensions()
    assert len(extensions) == len(EXTENSION_MODULES)
    assert len({e.name for e in extensions}) == len(extensions)
    for ext in extensions:
        for source in ext.sources:
            assert (build.CUDA_SOURCE_DIR / source).is_file(), (ext.name, source)


def test_unknown_extension_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build-kernels", "--only", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown extension(s) ['nope']" in err and "omniserve_fused_quant" in err


@cpu_only
def test_loading_without_cuda_raises_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert not kernels_available()
    with pytest.raises(KernelUnavailableError, match="no CUDA device is visible"):
        load_extension("omniserve_fused_quant", fused.EXTENSION.sources)
    assert main(["build-kernels"]) == 2
    assert "cannot build the CUDA extensions: no CUDA device" in capsys.readouterr().err


def test_build_hash_follows_sources_and_flags(tmp_path: Path) -> None:
    source = tmp_path / "op.cu"
    source.write_text("__global__ void k() {}\n")
    first = build._build_hash([source], ["-O3"])
    assert build._build_hash([source], ["-O3"]) == first
    assert build._build_hash([source], ["-O3", "--use_fast_math"]) != first
    source.write_text("__global__ void k() { }\n")
    assert build._build_hash([source], ["-O3"]) != first


def test_build_hash_follows_the_cutlass_release(tmp_path: Path) -> None:
    source = tmp_path / "op.cu"
    source.write_text("__global__ void k() {}\n")
    cutlass = tmp_path / "include"
    (cutlass / "cutlass").mkdir(parents=True)
    version = cutlass / "cutlass" / "version.h"
    version.write_text("#define CUTLASS_MAJOR 4\n")
    first = build._build_hash([source], ["-O3"], [cutlass])
    assert first != build._build_hash([source], ["-O3"])
    version.write_text("#define CUTLASS_MAJOR 5\n")
    assert build._build_hash([source], ["-O3"], [cutlass]) != first


def test_build_kernels_skips_what_lacks_its_requirement(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv(build.CUTLASS_ENV, str(tmp_path))  # no headers there
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name: None)
    assert main(["build-kernels", "--only", "omniserve_gemm_cutlass", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"skipped"' in out and "nvidia-cutlass" in out


def test_cache_root_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OMNISERVE_KERNEL_CACHE", str(tmp_path))
    assert build.cache_root() == tmp_path


def test_fused_ops_fall_back_to_the_references_off_gpu() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 24, generator=g).to(torch.bfloat16)
    norm = RMSNorm(24, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(24, generator=g))
    norm = norm.to(torch.bfloat16)
    residual, add_quantized = fused.add_rmsnorm_quant(x, x.flip(0), norm)
    want_residual, want_add_quantized = activation.add_rmsnorm_quant(x, x.flip(0), norm)
    assert torch.equal(residual, want_residual)
    for got, want in [
        (fused.quantize_per_token(x), activation.quantize_per_token(x)),
        (fused.rmsnorm_quant(x, norm), activation.rmsnorm_quant(x, norm)),
        (add_quantized, want_add_quantized),
        (fused.silu_mul_quant(x), activation.silu_mul_quant(x)),
    ]:
        for a, b in zip(got, want):
            assert torch.equal(a, b)
