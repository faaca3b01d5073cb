"""Build a model from an HF checkpoint directory: config.json + safetensors (single or sharded).

The model is constructed directly on the target device with uninitialised parameters, then every
parameter is filled from the checkpoint one tensor at a time (memory-mapped on the host, copied and
cast into place), so an 8B model never exists twice in memory. Names, shapes and dtypes are
checked against the model before any data moves, and each problem is reported by tensor name.

A quantized checkpoint (config.json with our `quantization_config`, formats/checkpoint.py) is read
and validated whole by `read_checkpoint`; its stored linears go into the model's `QuantizedLinear`
slices and its other tensors (embeddings, norms, biases, lm_head) through the same slots as fp.
A QServe model-zoo directory (config.json + pytorch_model.bin / *.pt, formats/qserve_zoo.py) is
converted in memory into the same validated checkpoint, so both take one load path. A per-tensor
KV8 checkpoint also yields its static KV scales, which the runner gives the KV cache.
There is no on-the-fly quantization of checkpoint weights: w4a8/w8a8 need such a checkpoint
(`quantize/rtn_model.py` writes an RTN one from an fp checkpoint). Random weights (load_format
"dummy", for benchmarks) are the exception: each quantized linear slice is the RTN of random fp
weights, placed through the same `QuantizedLinear.set_weight` as a checkpoint's.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from omniserve.distributed import ParallelGroup
from omniserve.errors import CheckpointError, ConfigError
from omniserve.formats.checkpoint import (
    QuantizationConfig,
    QuantizedCheckpoint,
    check_precision,
    read_checkpoint,
)
from omniserve.formats.precision import Precision
from omniserve.formats.qserve_zoo import (
    is_qserve_checkpoint,
    qserve_precision,
    read_qserve_checkpoint,
)
from omniserve.formats.weight import StoredWeight, quantize_weight
from omniserve.kernels.dispatch import KernelChoices
from omniserve.layers.linear import TensorSlot
from omniserve.layers.norm import RMSNorm
from omniserve.models.llama import (
    ARCHITECTURES,
    MODEL_TYPES,
    LlamaForCausalLM,
    StoredWeightLinear,
)

DUMMY_INIT_STD = 0.02
"""Std of random weights: HF's usual initializer_range. With an RMSNorm in front of every block the
activations stay O(1), far from bf16/fp16 overflow, even at 8B scale."""

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"


def read_config_json(model_dir: str) -> dict[str, Any]:
    """The checkpoint's config.json as a dict; CheckpointError naming the file if it is missing
    or not a JSON object."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{model_dir}: no config.json (expected an HF checkpoint directory)")
    try:
        raw = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object, got {type(raw).__name__}")
    return raw


def load_hf_config(model_dir: str) -> PretrainedConfig:
    """The checkpoint's config, refusing model types this project does not implement."""
    config_file = Path(model_dir) / "config.json"
    raw = read_config_json(model_dir)
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


def resolve_precision(
    model_dir: str, requested: Precision | None, *, dummy: bool = False
) -> Precision | None:
    """The precision to serve: `requested` if given, else the checkpoint's quantization_config
    (None for an fp checkpoint, i.e. w16a16 with the KV cache left to kv_cache_dtype). A request
    for quantized weights on an fp checkpoint, unless `dummy` (random weights, quantized at load
    time), or one that differs from a quantized checkpoint's precision or group size, is a
    ConfigError."""
    if is_qserve_checkpoint(model_dir):
        return qserve_precision(model_dir, requested)
    raw = read_config_json(model_dir)
    if "quantization_config" in raw:
        stored = QuantizationConfig.from_json(raw["quantization_config"]).precision
        if requested is not None:
            check_precision(model_dir, requested, stored)
        return stored
    if requested is not None and requested.quantized_weights and not dummy:
        raise ConfigError(
            f"precision {requested.name} needs a quantized checkpoint, but {model_dir} holds fp "
            "weights (no quantization_config); write one with "
            "omniserve.quantize.rtn_model.write_rtn_checkpoint (RTN) or serve a w16a16 precision"
        )
    return requested


class LoadedModel(NamedTuple):
    model: LlamaForCausalLM
    kv_scales: torch.Tensor | None
    """fp32 [num_layers, 2 (K, V)] static KV8 scales of a per-tensor checkpoint, else None."""


def load_model(
    model_dir: str,
    hf_config: PretrainedConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    max_positions: int,
    kernels: KernelChoices,
    precision: Precision | None = None,
    dummy_seed: int | None = None,
    group: ParallelGroup | None = None,
) -> LoadedModel:
    """The model on `device` in `dtype`, its ops on the kernels or references `kernels` chose
    (kernels/dispatch.py, for `llama.kernel_shape(hf_config, precision)`); random weights seeded
    by `dummy_seed` when it is given (quantized ones for a `precision` with quantized weights, see
    `init_dummy_weights`), else the checkpoint's safetensors. `precision` (from
    `resolve_precision`) with quantized weights reads a quantized checkpoint (ours or QServe's
    zoo) that must hold exactly that precision; a per-tensor KV8 one also gives its static KV
    scales (random weights use per-token KV). Under tensor parallelism (`group`) the model is
    this rank's share, each slot taking its part of the checkpoint's (or random) tensors."""
    quantized = precision if precision is not None and precision.quantized_weights else None
    try:
        with _default_device_and_dtype(device, dtype):
            model = LlamaForCausalLM(hf_config, max_positions, precision, kernels, group)
    except ValueError as exc:  # a config value the model (or the weight format) does not allow
        raise CheckpointError(f"{model_dir}/config.json: {exc}") from None
    kv_scales = None
    if dummy_seed is not None:
        init_dummy_weights(model, dummy_seed, precision)
    elif quantized is not None:
        kv_scales = load_quantized_weights(model, model_dir, quantized, device)
    else:
        load_weights(model, model_dir)
    return LoadedModel(model.eval(), kv_scales)


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
    _check_names(model, model_dir, "tensors", set(slots), set(files))

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


def read_quantized_checkpoint(model_dir: str, precision: Precision) -> QuantizedCheckpoint:
    """Our checkpoint or a QServe zoo one, validated; ConfigError if it holds another precision
    or group size."""
    if is_qserve_checkpoint(model_dir):
        return read_qserve_checkpoint(model_dir, precision)
    return read_checkpoint(model_dir, precision)


def load_quantized_weights(
    model: LlamaForCausalLM, model_dir: str, precision: Precision, device: torch.device
) -> torch.Tensor | None:
    """Fill a model built for `precision` from a quantized checkpoint; returns its static KV8
    scales (per-tensor checkpoints) or None."""
    ckpt = read_quantized_checkpoint(model_dir, precision)
    slots = checkpoint_slots(model)
    quantized = quantized_slots(model)
    _check_names(model, model_dir, "quantized linears", set(quantized), set(ckpt.linears))
    _check_names(model, model_dir, "tensors", set(slots), set(ckpt.tensors))
    for name, slot in slots.items():
        t = ckpt.tensors[name]
        if tuple(t.shape) != slot.shape or not t.is_floating_point():
            raise CheckpointError(
                f"{model_dir}: tensor {name} is {t.dtype} {list(t.shape)}, the model expects a "
                f"float tensor of shape {list(slot.shape)}"
            )
    with torch.no_grad():
        for name, slot in slots.items():
            slot.load(ckpt.tensors[name])
    _set_quantized_weights(quantized, lambda name, _shape: ckpt.linears[name], device, model_dir)
    return ckpt.kv_scales


def init_dummy_weights(
    model: torch.nn.Module, seed: int, precision: Precision | None = None
) -> None:
    """Random weights from `seed` (same seed and device: same model); norm scales are 1.

    Each checkpoint tensor is drawn whole, in checkpoint order, and loaded through its slot, so
    that the ranks of tensor parallelism draw the same model and each keeps its part. A model
    built for a quantized-weight `precision` gets each `QuantizedLinear` slice as the RTN
    (formats/weight.py) of fp32 weights drawn the same way, one slice at a time on the model's
    device, so memory beyond the model stays at one slice of fp weights (plus the quantizer's
    temporaries).
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for slot in checkpoint_slots(model).values():
            w = torch.empty(slot.shape, dtype=slot.param.dtype, device=device)
            slot.load(w.normal_(0.0, DUMMY_INIT_STD, generator=generator))
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        if precision is None or not precision.quantized_weights:
            return

        def random_weight(_name: str, shape: tuple[int, int]) -> StoredWeight:
            w = torch.empty(shape, dtype=torch.float32, device=device)
            return quantize_weight(w.normal_(0.0, DUMMY_INIT_STD, generator=generator), precision)

        _set_quantized_weights(quantized_slots(model), random_weight, device, "random weights")


def quantized_slots(model: torch.nn.Module) -> dict[str, tuple[StoredWeightLinear, int]]:
    """Every quantized linear slice of the model: checkpoint linear name → (layer, slice index)."""
    return {
        name: (module, index)
        for prefix, module in model.named_modules()
        if isinstance(module, StoredWeightLinear)
        for name, index in module.quantized_slots(prefix).items()
    }


def _set_quantized_weights(
    slots: dict[str, tuple[StoredWeightLinear, int]],
    weight_of: Callable[[str, tuple[int, int]], StoredWeight],
    device: torch.device,
    source: str,
) -> None:
    """Place `weight_of(name, (N, K))` into each slice, asking for the next only once the previous
    is placed (random weights are drawn one slice at a time); `source` prefixes the errors."""
    for name, (module, index) in slots.items():
        shape = module.checkpoint_shape(index)
        try:
            module.set_weight(index, weight_of(name, shape), device)  # type: ignore[arg-type]
        except ValueError as exc:
            raise CheckpointError(f"{source}: quantized linear {name}: {exc}") from None


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
            return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
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


def _check_names(
    model: LlamaForCausalLM, model_dir: str, what: str, expected: set[str], present: set[str]
) -> None:
    """CheckpointError naming the checkpoint entries the model reads but are missing, or that
    it does not read (except those it knowingly skips)."""
    missing = sorted(expected - present)
    if missing:
        raise CheckpointError(f"{model_dir}: missing {what}: {_names(missing)}")
    unexpected = sorted(n for n in present - expected if not model.skips_checkpoint_tensor(n))
    if unexpected:
        raise CheckpointError(f"{model_dir}: unexpected {what}: {_names(unexpected)}")


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
