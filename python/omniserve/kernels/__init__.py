"""CUDA kernels (`cuda/`) next to their torch references: one module per op family.

Each module in `EXTENSION_MODULES` declares an `EXTENSION` (`build.Extension`) and exposes its
ops as functions that take and return torch tensors; the references they must match live in
`omniserve.formats` (quantizers, GEMMs) and `omniserve.layers` (attention). Which of the two a
model runs is decided once, when it is built (`dispatch.py`). Importing any of this needs neither
CUDA nor nvcc: the extensions are compiled when that decision first needs them (or ahead of time
by `omniserve build-kernels`).
"""

from __future__ import annotations

import importlib

from omniserve.kernels.build import (
    Extension,
    KernelBuildError,
    KernelUnavailableError,
    kernels_available,
    load_extension,
    unavailable_reason,
)

EXTENSION_MODULES: tuple[str, ...] = (
    "omniserve.kernels.fused",
    "omniserve.kernels.attention",
    "omniserve.kernels.gemm",
    "omniserve.kernels.gemm_cutlass",
    "omniserve.kernels.rope_kv",
    "omniserve.kernels.page_select",
)
"""Modules that declare an `EXTENSION`; `omniserve build-kernels` builds them all."""


def all_extensions() -> list[Extension]:
    return [importlib.import_module(m).EXTENSION for m in EXTENSION_MODULES]


__all__ = [
    "EXTENSION_MODULES",
    "Extension",
    "KernelBuildError",
    "KernelUnavailableError",
    "all_extensions",
    "kernels_available",
    "load_extension",
    "unavailable_reason",
]
