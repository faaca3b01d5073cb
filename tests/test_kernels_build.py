"""The kernel build system on any machine: `omniserve build-kernels` parses and reports clear
errors, builds are keyed by sources and flags, and without a usable GPU loading an extension says
why it cannot (the ops' choice of reference there: tests/test_kernels_dispatch.py)."""

from __future__ import annotations

from importlib import resources
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


def test_the_sources_ship_inside_the_package() -> None:
    """The wheel packs the package directory, so the kernels build from an installed package as
    from a checkout, whose top-level cuda/ is a link to the same files (scripts/gpu_check.sh runs
    the GPU tests against the installed wheel)."""
    package = Path(str(resources.files("omniserve")))
    assert package / "cuda" == build.CUDA_SOURCE_DIR
    assert (package.parents[1] / "cuda").resolve() == build.CUDA_SOURCE_DIR.resolve()


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
