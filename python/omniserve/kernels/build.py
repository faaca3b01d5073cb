"""Just-in-time builds of the CUDA extensions in `cuda/`, cached on disk and in the process.

`load_extension("fused_quant", ["fused_quant.cu"])` compiles the sources (paths relative to
`cuda/`, which is also on the include path, so `#include "common/....cuh"` works) with torch's
extension builder (ninja) for Hopper (sm_90a) and imports the result. The build directory is
`~/.cache/omniserve/kernels/<name>-<hash>` (`OMNISERVE_KERNEL_CACHE` overrides the root), where the
hash covers the sources, every header under `cuda/`, the flags, and the torch and CUDA versions:
any change lands in a fresh directory, and an unchanged build is only re-imported.

Importing this module needs neither CUDA nor nvcc; only `load_extension` does, and it says what is
missing (`KernelUnavailableError`) instead of failing deep inside the compiler driver.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from omniserve.errors import OmniserveError

CUDA_SOURCE_DIR = Path(__file__).resolve().parents[1] / "cuda"
"""The CUDA sources, shipped inside the package (`omniserve/cuda/`; the repository's top-level
`cuda/` links to it), so an installed wheel builds the same kernels as a checkout."""

TARGET_CAPABILITY = (9, 0)
"""Every extension is compiled for sm_90a alone (the GEMMs use wgmma): Hopper (H100/H200) only."""

BASE_CUDA_FLAGS: tuple[str, ...] = (
    "-gencode=arch=compute_90a,code=sm_90a",
    "-O3",
)
BASE_CXX_FLAGS: tuple[str, ...] = ("-O3",)


CUTLASS_ENV = "OMNISERVE_CUTLASS_DIR"
"""Overrides where CUTLASS's C++ headers are (a directory holding cutlass/ and cute/)."""


def cutlass_include_dir() -> Path | None:
    """CUTLASS's include directory: $OMNISERVE_CUTLASS_DIR, else the copy the `nvidia-cutlass`
    wheel ships inside its `cutlass_library` package (headers only are needed: `pip install
    --no-deps nvidia-cutlass`). Located without importing the package."""
    override = os.environ.get(CUTLASS_ENV)
    candidates = [Path(override)] if override else []
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "source" / "include" for p in spec.submodule_search_locations]
    return next((c for c in candidates if (c / "cutlass" / "cutlass.h").is_file()), None)


class KernelUnavailableError(OmniserveError, RuntimeError):
    """The CUDA kernels cannot be used here: no CUDA device, not a Hopper GPU, or no sources."""


class KernelBuildError(OmniserveError, RuntimeError):
    """Compiling or importing a CUDA extension failed; the message names the build directory."""


_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}


def cache_root() -> Path:
    return Path(os.environ.get("OMNISERVE_KERNEL_CACHE", Path.home() / ".cache/omniserve/kernels"))


def unavailable_reason(device: torch.device | None = None) -> str | None:
    """Why the kernels cannot run on `device` (default: the current CUDA device), None if they can."""
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    if device is not None and device.type != "cuda":
        return f"tensors are on {device}, not on a CUDA device"
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    return _gpu_reason(index)


@functools.cache
def _gpu_reason(index: int) -> str | None:
    """The per-GPU part of `unavailable_reason`: fixed for the process, and asked for every
    extension loaded and every model's kernel choices, so it is computed (device query,
    file-system check) once per GPU."""
    capability = torch.cuda.get_device_capability(index)
    if capability != TARGET_CAPABILITY:
        name = torch.cuda.get_device_name(index)
        return (
            f"the kernels are built for sm_90a (Hopper); {name} has compute capability "
            f"{capability[0]}.{capability[1]}"
        )
    if not CUDA_SOURCE_DIR.is_dir():
        return f"the CUDA sources are not at {CUDA_SOURCE_DIR} (a damaged installation)"
    return None


def kernels_available(device: torch.device | None = None) -> bool:
    return unavailable_reason(device) is None


def load_extension(
    name: str,
    sources: Sequence[str],
    *,
    fast_math: bool = False,
    extra_cuda_flags: Sequence[str] = (),
    include_dirs: Sequence[Path] = (),
) -> ModuleType:
    """Build (once per content hash) and import the extension `name` from `sources`.

    `sources` are paths relative to `cuda/` (or absolute). `fast_math` adds --use_fast_math: only
    for kernels whose results are checked against references with float tolerances, never for
    the quantizers, whose codes must match the references exactly (fast division and
    flush-to-zero change them). `include_dirs` are searched after `cuda/`; their headers are part
    of the build's identity only through their path and version header (they are third-party
    releases, not edited in place).
    """
    reason = unavailable_reason()
    if reason is not None:
        raise KernelUnavailableError(f"cannot load CUDA extension {name!r}: {reason}")
    if not sources:
        raise ValueError(f"extension {name!r} needs at least one source file")
    paths = [p if p.is_absolute() else CUDA_SOURCE_DIR / p for p in map(Path, sources)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise KernelUnavailableError(f"extension {name!r}: missing source files {missing}")
    cuda_flags = [*BASE_CUDA_FLAGS, *(["--use_fast_math"] if fast_math else []), *extra_cuda_flags]
    key = f"{name}-{_build_hash(paths, cuda_flags, include_dirs)}"
    with _lock:
        module = _loaded.get(key)
        if module is None:
            module = _build(name, key, paths, cuda_flags, include_dirs)
            _loaded[key] = module
    return module


@dataclass(frozen=True, slots=True)
class Extension:
    """One extension's build recipe; each op module of `omniserve.kernels` declares its own."""

    name: str
    sources: tuple[str, ...]
    fast_math: bool = False
    cuda_flags: tuple[str, ...] = ()
    needs_cutlass: bool = False
    """Compiled against CUTLASS's headers (`cutlass_include_dir`); unavailable without them."""

    def missing_requirement(self) -> str | None:
        """What this extension needs beyond a Hopper GPU and nvcc that is not installed, if any."""
        if self.needs_cutlass and cutlass_include_dir() is None:
            return (
                f"CUTLASS headers not found (pip install --no-deps nvidia-cutlass, or set "
                f"{CUTLASS_ENV} to a directory holding cutlass/ and cute/)"
            )
        return None

    def load(self) -> ModuleType:
        """The built extension; later calls return it without hashing the sources again."""
        return _load_once(self)


@functools.cache
def _load_once(ext: Extension) -> ModuleType:
    missing = ext.missing_requirement()
    if missing is not None:
        raise KernelUnavailableError(f"cannot load CUDA extension {ext.name!r}: {missing}")
    cutlass = cutlass_include_dir() if ext.needs_cutlass else None
    return load_extension(
        ext.name,
        ext.sources,
        fast_math=ext.fast_math,
        extra_cuda_flags=ext.cuda_flags,
        include_dirs=() if cutlass is None else (cutlass,),
    )


def _build_hash(
    paths: Sequence[Path], cuda_flags: Sequence[str], include_dirs: Sequence[Path] = ()
) -> str:
    digest = hashlib.sha256()
    # Headers are included by path, so every header under cuda/ is part of every build's identity.
    headers = sorted(p for p in CUDA_SOURCE_DIR.rglob("*") if p.suffix in (".cuh", ".h"))
    for path in [*paths, *headers]:
        digest.update(
            str(
                path.relative_to(CUDA_SOURCE_DIR) if path.is_relative_to(CUDA_SOURCE_DIR) else path
            ).encode()
        )
        digest.update(path.read_bytes())
    for part in (*cuda_flags, *BASE_CXX_FLAGS, torch.__version__, str(torch.version.cuda)):
        digest.update(part.encode())
    for directory in include_dirs:
        digest.update(str(directory).encode())
        version = directory / "cutlass" / "version.h"
        if version.is_file():
            digest.update(version.read_bytes())
    return digest.hexdigest()[:16]


def _build(
    name: str,
    key: str,
    paths: Sequence[Path],
    cuda_flags: Sequence[str],
    include_dirs: Sequence[Path],
) -> ModuleType:
    from torch.utils import cpp_extension  # slow to import; only needed for a build

    build_dir = cache_root() / key
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(p) for p in paths],
            extra_cflags=list(BASE_CXX_FLAGS),
            extra_cuda_cflags=list(cuda_flags),
            extra_include_paths=[str(CUDA_SOURCE_DIR), *map(str, include_dirs)],
            build_directory=str(build_dir),
            verbose=os.environ.get("OMNISERVE_KERNEL_VERBOSE") == "1",
        )
    except (RuntimeError, OSError, ImportError) as exc:
        raise KernelBuildError(
            f"building CUDA extension {name!r} in {build_dir} failed (set "
            f"OMNISERVE_KERNEL_VERBOSE=1 for the compiler output): {exc}"
        ) from exc
