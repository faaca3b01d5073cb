"""Our quantized checkpoint: a directory with `config.json` + safetensors
(docs/formats.md#checkpoint-format).

    config.json             the model's HF config plus
                            "quantization_config": {
                                "quant_method": "omniserve", "format_version": 1,
                                "precision": "w4a8kv4", "group_size": 128,
                                "kv_cache": "int4" | "int8" | "model_dtype",
                                "kv_granularity": "per_token_head" | "per_tensor" (static KV8)
                                                  (null without KV quantization),
                                "recipe": {...}  (free-form: how the weights were produced),
                                "modules": {"model.layers.0.self_attn.q_proj": [N, K], ...}}
    *.safetensors           for every quantized linear `<prefix>`, the tensors of its format
                            (weight.py) named `<prefix>.<name>`: qweight, s1_scales, s1_szeros (W4A8
                            per-channel); qweight, s1_scales, s2_scales, s2_zeros (W4A8 g128);
                            weight, dequant_scale (W8A8). Every other tensor (embeddings, norms,
                            biases, lm_head) is stored as is. With kv_granularity "per_tensor",
                            `model.layers.{i}.self_attn.kv_scale_quant_orig` float32 [2] per layer:
                            the static K and V scales (formats/kv.py).

Tensor names are QServe's zoo names; zoo `qweight` is int8 with the same bytes (packing.py).
`modules` makes the checkpoint self-describing, so the reader can name a missing linear or tensor
and check each against the (dtype, shape) its format requires before anything is built.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from omniserve.errors import CheckpointError, ConfigError
from omniserve.formats.kv import KV_GRANULARITIES, PER_TENSOR, PER_TOKEN_HEAD
from omniserve.formats.precision import Precision, parse
from omniserve.formats.weight import StoredWeight, weight_format

FORMAT_VERSION = 1
QUANT_METHOD = "omniserve"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

KV_SCALE_SUFFIX = "self_attn.kv_scale_quant_orig"
"""Per-layer static KV8 scales [k_absmax / 127, v_absmax / 127] (QServe's name)."""


def kv_scale_key(layer: int) -> str:
    """Checkpoint name of layer `layer`'s static KV8 scales."""
    return f"model.layers.{layer}.{KV_SCALE_SUFFIX}"


# Suffixes that only quantized linears use: a tensor with one outside `modules` is an error.
_QUANTIZED_SUFFIXES = frozenset(
    {"qweight", "s1_scales", "s1_szeros", "s2_scales", "s2_zeros", "dequant_scale"}
)


@dataclass(frozen=True)
class QuantizationConfig:
    """The `quantization_config` block of config.json."""

    precision: Precision
    modules: dict[str, tuple[int, int]]
    """Quantized linear prefix → (N, K)."""
    recipe: dict[str, Any] = field(default_factory=dict)
    kv_granularity: str = PER_TOKEN_HEAD
    """PER_TOKEN_HEAD, or PER_TENSOR: static KV8 with per-layer scales in the checkpoint."""

    def __post_init__(self) -> None:
        check_kv_granularity(self.kv_granularity, self.precision)

    def to_json(self) -> dict[str, Any]:
        kv_bits = self.precision.kv_bits
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "precision": self.precision.name,
            "group_size": self.precision.group_size,
            "kv_cache": "model_dtype" if kv_bits is None else f"int{kv_bits}",
            "kv_granularity": None if kv_bits is None else self.kv_granularity,
            "recipe": self.recipe,
            "modules": {name: list(shape) for name, shape in self.modules.items()},
        }

    @classmethod
    def from_json(cls, block: Any) -> QuantizationConfig:
        if not isinstance(block, dict):
            raise CheckpointError("config.json has no quantization_config object")
        if block.get("quant_method") != QUANT_METHOD:
            raise CheckpointError(
                f"quantization_config.quant_method is {block.get('quant_method')!r}, "
                f"expected {QUANT_METHOD!r}"
            )
        if block.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"quantization_config.format_version {block.get('format_version')!r} is not "
                f"supported (this version reads {FORMAT_VERSION})"
            )
        try:
            precision = parse(str(block["precision"]), int(block["group_size"]))
            modules = {str(k): (int(v[0]), int(v[1])) for k, v in block["modules"].items()}
            recipe = dict(block.get("recipe") or {})
            granularity = block.get("kv_granularity") or PER_TOKEN_HEAD
            check_kv_granularity(granularity, precision)
        except ConfigError as exc:
            raise CheckpointError(f"quantization_config: {exc}") from exc
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise CheckpointError(f"quantization_config is malformed: {exc!r}") from exc
        if not precision.quantized_weights:
            raise CheckpointError(
                f"quantization_config.precision {precision.name} has no quantized weights; "
                "such models are served from their own fp checkpoint"
            )
        return cls(precision, modules, recipe, granularity)


def check_kv_granularity(granularity: str, precision: Precision) -> None:
    """ConfigError for an unknown granularity, or per-tensor scales on a cache that is not KV8."""
    if granularity not in KV_GRANULARITIES:
        raise ConfigError(
            f"kv_granularity {granularity!r} is not supported; valid choices: "
            f"{', '.join(KV_GRANULARITIES)}"
        )
    if granularity == PER_TENSOR and precision.kv_bits != 8:
        kv = "the model dtype" if precision.kv_bits is None else f"int{precision.kv_bits}"
        raise ConfigError(
            f"kv_granularity {PER_TENSOR!r} (static symmetric int8 scales) needs a KV8 precision, "
            f"but {precision.name} keeps the KV cache in {kv}; KV4 has no per-tensor form (it "
            f"needs per-token zero points): use kv_granularity {PER_TOKEN_HEAD!r} or a kv8 precision"
        )


@dataclass(frozen=True)
class QuantizedCheckpoint:
    hf_config: dict[str, Any]
    """config.json without its quantization_config."""
    quant: QuantizationConfig
    linears: dict[str, StoredWeight]
    tensors: dict[str, torch.Tensor]
    """Every stored tensor that is not part of a quantized linear or a KV scale."""
    kv_scales: torch.Tensor | None = None
    """fp32 [num_layers, 2 (K, V)] static KV8 scales when kv_granularity is per-tensor."""

    def dequantize_linear(self, prefix: str) -> torch.Tensor:
        """Ŵ fp32 [N, K] of a stored linear (for golden tests and fake-quant evaluation)."""
        if prefix not in self.linears:
            raise CheckpointError(f"no quantized linear {prefix!r} in the checkpoint")
        return self.linears[prefix].dequantize()


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
"""Files of a source model directory that a quantized checkpoint replaces (fp weights, indexes)."""


def copy_side_files(source: Path, out: Path) -> None:
    """Copy the tokenizer, generation config, etc. of the model directory `source` into the
    quantized checkpoint `out`: every file but the weights and config.json, which the writer
    produced."""
    for extra in source.iterdir():
        if (
            extra.is_file()
            and extra.name != CONFIG_FILE
            and not extra.name.endswith(_WEIGHT_SUFFIXES)
        ):
            shutil.copy2(extra, out / extra.name)


def write_checkpoint(
    path: str | Path,
    hf_config: Mapping[str, Any],
    precision: Precision,
    linears: Mapping[str, StoredWeight],
    tensors: Mapping[str, torch.Tensor],
    recipe: Mapping[str, Any] | None = None,
    kv_scales: torch.Tensor | None = None,
) -> None:
    """Write config.json + model.safetensors into directory `path` (created if needed).

    `kv_scales` (fp32 [num_layers, 2], quantize/kv_calibration.py) makes the checkpoint per-tensor
    static KV8; without it the KV cache is quantized per token and head.
    """
    if not precision.quantized_weights:
        raise ConfigError(
            f"{precision.name} keeps the model's fp weights (KV quantization happens at run "
            "time); a quantized checkpoint needs a w4a8 or w8a8 precision"
        )
    fmt = weight_format(precision)
    stored: dict[str, torch.Tensor] = {}
    for prefix, weight in linears.items():
        if not isinstance(weight, fmt):
            raise ConfigError(
                f"linear {prefix!r} is {type(weight).__name__}, but {precision.name} with "
                f"group_size {precision.group_size} stores {fmt.__name__}"
            )
        for name, t in weight.tensors().items():
            stored[f"{prefix}.{name}"] = t
    for name, t in tensors.items():
        if name in stored:
            raise ValueError(
                f"tensor {name!r} is both a quantized-linear tensor and a plain tensor"
            )
        stored[name] = t
    granularity = PER_TOKEN_HEAD
    if kv_scales is not None:
        granularity = PER_TENSOR
        num_layers = int(hf_config["num_hidden_layers"])
        check_kv_scales(kv_scales, (num_layers, 2), "kv_scales")
        stored.update({kv_scale_key(i): kv_scales[i].float() for i in range(num_layers)})
    quant = QuantizationConfig(
        precision, {p: w.shape for p, w in linears.items()}, dict(recipe or {}), granularity
    )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    config["quantization_config"] = quant.to_json()
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in stored.items()}, str(out / WEIGHTS_FILE))


def read_checkpoint(path: str | Path, precision: Precision | None = None) -> QuantizedCheckpoint:
    """Read and validate a checkpoint; `precision` is the engine's request, checked against it.

    Raises CheckpointError for a missing file, config block, linear or tensor, or a tensor of the
    wrong dtype or shape (naming it), and ConfigError when the request's precision or group size
    differs from the checkpoint's.
    """
    root = Path(path)
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} does not exist")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or "quantization_config" not in config:
        raise CheckpointError(
            f"{config_path} has no quantization_config: not a quantized checkpoint"
        )
    quant = QuantizationConfig.from_json(config.pop("quantization_config"))
    if precision is not None:
        check_precision(root, precision, quant.precision)
    stored = _load_safetensors(root)
    fmt = weight_format(quant.precision)
    linears: dict[str, StoredWeight] = {}
    for prefix, (n, k) in quant.modules.items():
        try:
            fmt.check_shape(n, k)
        except ValueError as exc:
            raise CheckpointError(f"quantization_config.modules[{prefix!r}]: {exc}") from exc
        parts: dict[str, torch.Tensor] = {}
        for name, (dtype, shape) in fmt.tensor_specs(n, k).items():
            key = f"{prefix}.{name}"
            if key not in stored:
                raise CheckpointError(f"tensor {key} is missing ({fmt.__name__} needs it)")
            t = stored.pop(key)
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise CheckpointError(
                    f"tensor {key}: expected {dtype} {list(shape)} for a [{n}, {k}] linear, "
                    f"found {t.dtype} {list(t.shape)}"
                )
            parts[name] = t
        linears[prefix] = fmt(**parts)
    for key in stored:
        if key.rsplit(".", 1)[-1] in _QUANTIZED_SUFFIXES:
            raise CheckpointError(
                f"tensor {key} belongs to no linear listed in quantization_config.modules"
            )
    kv_scales = pop_kv_scales(stored, config, quant.kv_granularity == PER_TENSOR)
    return QuantizedCheckpoint(config, quant, linears, stored, kv_scales)


def pop_kv_scales(
    stored: dict[str, torch.Tensor], hf_config: Mapping[str, Any], per_tensor: bool
) -> torch.Tensor | None:
    """Remove every layer's `kv_scale_quant_orig` from `stored` and return them as fp32
    [num_layers, 2] when `per_tensor`; CheckpointError naming a missing or malformed one, or one
    present in a checkpoint that is not per-tensor."""
    present = sorted(k for k in stored if k.endswith(KV_SCALE_SUFFIX))
    if not per_tensor:
        if present:
            raise CheckpointError(
                f"tensor {present[0]} holds static KV scales, but quantization_config."
                f"kv_granularity is not {PER_TENSOR!r}"
            )
        return None
    try:
        num_layers = int(hf_config["num_hidden_layers"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json has no valid num_hidden_layers: {exc!r}") from None
    rows = []
    for i in range(num_layers):
        key = kv_scale_key(i)
        if key not in stored:
            raise CheckpointError(
                f"tensor {key} is missing (kv_granularity {PER_TENSOR!r} needs one per layer)"
            )
        rows.append(stored.pop(key))
    for key in present:
        if key in stored:
            raise CheckpointError(f"tensor {key} names no layer of the model ({num_layers} layers)")
    for i, t in enumerate(rows):
        check_kv_scales(t, (2,), f"tensor {kv_scale_key(i)}")
    return torch.stack([t.float() for t in rows])


def check_kv_scales(scales: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    """CheckpointError unless `scales` is a float tensor of `shape` of positive finite values."""
    if not scales.is_floating_point() or tuple(scales.shape) != shape:
        raise CheckpointError(
            f"{name}: expected a float tensor of shape {list(shape)} (K and V scales), found "
            f"{scales.dtype} {list(scales.shape)}"
        )
    if not bool((torch.isfinite(scales) & (scales > 0)).all()):
        raise CheckpointError(f"{name}: scales must be positive and finite, got {scales.tolist()}")


def check_precision(root: str | Path, requested: Precision, stored: Precision) -> None:
    """ConfigError unless the engine's requested precision and group size are the checkpoint's."""
    if requested != stored:
        raise ConfigError(
            f"requested precision {requested.name} with group_size {requested.group_size}, but the "
            f"checkpoint {root} holds {stored.name} with group_size {stored.group_size}"
        )


def _load_safetensors(root: Path) -> dict[str, torch.Tensor]:
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{root} holds no *.safetensors file")
    out: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    if key in out:
                        raise CheckpointError(
                            f"tensor {key} is stored twice (again in {file.name})"
                        )
                    out[key] = f.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{file} cannot be read: {exc}") from exc
    return out


def linear_from_qserve(tensors: Mapping[str, torch.Tensor], precision: Precision) -> StoredWeight:
    """One linear of a QServe zoo state dict (tensor name suffix → tensor) in our format.

    The names are the same; the zoo stores `qweight` as int8 and we store the same bytes as uint8.
    Raises CheckpointError naming a missing tensor or one of the wrong dtype or shape.
    """
    fmt = weight_format(precision)
    parts: dict[str, torch.Tensor] = {}
    for f in dataclasses.fields(fmt):
        if f.name not in tensors:
            raise CheckpointError(f"QServe tensor {f.name} is missing ({fmt.__name__} needs it)")
        t = tensors[f.name]
        parts[f.name] = t.view(torch.uint8) if f.name == "qweight" and t.dtype == torch.int8 else t
    try:
        return fmt(**parts)
    except ValueError as exc:
        raise CheckpointError(f"QServe linear does not match {precision.name}: {exc}") from exc
