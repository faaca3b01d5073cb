"""Build a model from an HF checkpoint directory: config.json + safetensors (single or sharded).

The model is constructed directly on the target device with uninitialised parameters, then every
parameter is filled from the checkpoint one tensor at a time (memory-mapped on the host, copied and
cast into place), so an 8B model never exists twice in memory. Names, shapes and dtypes are
checked against the model before any data moves, and each problem is reported by tensor name.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from omniserve.errors import CheckpointError
from omniserve.layers.linear import TensorSlot
from omniserve.layers.norm import RMSNorm
from omniserve.models.llama import ARCHITECTURES, MODEL_TYPES, LlamaForCausalLM

DUMMY_INIT_STD = 0.02
"""Std of random weights: HF's usual initializer_range. With an RMSNorm in front of every block the
activations stay O(1), far from bf16/fp16 overflow, even at 8B scale."""

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"


def load_hf_config(model_dir: str) -> PretrainedConfig:
    """The checkpoint's config, refusing model types this project does not implement."""
    path = Path(model_dir)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{model_dir}: no config.json (expected an HF checkpoint directory)")
    raw = json.loads(config_file.read_text())
    model_type, archs = raw.get("model_type"), raw.get("architectures") or []
    if model_type not in MODEL_TYPES or any(a not in ARCHITECTURES for a in archs):
        raise CheckpointError(
            f"{model_dir}: unsupported model (model_type={model_type!r}, architectures={archs}); "
            f"supported model types: {', '.join(MODEL_TYPES)}; "
            f"architectures: {', '.join(ARCHITECTURES)}"
        )
    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{config_file}: {exc}") from None


def load_model(
    model_dir: str,
    hf_config: PretrainedConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    max_positions: int,
    dummy_seed: int | None = None,
) -> LlamaForCausalLM:
    """The model on `device` in `dtype`; random weights seeded by `dummy_seed` when it is given,
    else the checkpoint's safetensors."""
    try:
        with _default_device_and_dtype(device, dtype):
            model = LlamaForCausalLM(hf_config, max_positions)
    except ValueError as exc:  # a config value the model does not implement
        raise CheckpointError(f"{model_dir}/config.json: {exc}") from None
    if dummy_seed is None:
        load_weights(model, model_dir)
    else:
        init_dummy_weights(model, dummy_seed)
    return model.eval()


def checkpoint_slots(model: torch.nn.Module) -> dict[str, TensorSlot]:
    """Every checkpoint tensor the model reads, by name. Modules with a `checkpoint_slots(prefix)`
    method (linear layers, which may fuse or quantize) say it themselves; other parameters are read
    under their own names."""
    slots: dict[str, TensorSlot] = {}
    for prefix, module in model.named_modules():
        if hasattr(module, "checkpoint_slots"):
            slots.update(module.checkpoint_slots(prefix))
            continue
        for name, param in module.named_parameters(recurse=False):
            slots[f"{prefix}.{name}" if prefix else name] = TensorSlot(param, 0, tuple(param.shape))
    return slots


def load_weights(model: LlamaForCausalLM, model_dir: str) -> None:
    files = _tensor_files(Path(model_dir))
    slots = checkpoint_slots(model)
    missing = sorted(slots.keys() - files.keys())
    if missing:
        raise CheckpointError(f"{model_dir}: missing tensors: {_names(missing)}")
    unexpected = sorted(
        n for n in files.keys() - slots.keys() if not model.skips_checkpoint_tensor(n)
    )
    if unexpected:
        raise CheckpointError(f"{model_dir}: unexpected tensors: {_names(unexpected)}")

    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in slots:
        by_file[files[name]].append(name)
    # First check every shape and dtype from the headers, so that a bad checkpoint fails fast.
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name in names:
                header = f.get_slice(name)
                _check_tensor(file, name, header, slots[name])
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in names:
                    slots[name].load(f.get_tensor(name))


def init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights from `seed` (same seed and device: same model); norm scales are 1."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, DUMMY_INIT_STD, generator=generator)
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)


def _tensor_files(path: Path) -> dict[str, Path]:
    """Which safetensors file holds each tensor of the checkpoint."""
    index = path / _INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = {name: path / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise CheckpointError(f"{index} lists {file.name}, which does not exist")
        return files
    single = path / _SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    hint = " (PyTorch .bin weights are not supported)" if any(path.glob("*.bin")) else ""
    raise CheckpointError(f"{path}: no {_SINGLE_FILE} or {_INDEX_FILE}{hint}")


# safetensors header dtypes that hold floating-point values (cast to the model dtype on load).
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


def _check_tensor(file: Path, name: str, header: Any, slot: TensorSlot) -> None:
    """`header`: safetensors' lazy slice of the tensor (shape and dtype, no data)."""
    shape, dtype = tuple(header.get_shape()), header.get_dtype()
    if shape != slot.shape:
        raise CheckpointError(
            f"{file}: tensor {name} has shape {list(shape)}, the model expects {list(slot.shape)}"
        )
    if dtype not in _FLOAT_DTYPES:
        raise CheckpointError(
            f"{file}: tensor {name} has dtype {dtype}, expected one of "
            f"{', '.join(sorted(_FLOAT_DTYPES))}"
        )


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


@contextmanager
def _default_device_and_dtype(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Create the model's tensors directly where they will live and in the dtype they will have."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)
