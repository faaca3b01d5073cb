"""QServe model-zoo checkpoints, read into the same `QuantizedCheckpoint` our own reader returns.

A zoo directory (QServe's `checkpoint_converter.py` or deepcompressor's `backend.qserve.convert`,
docs/formats.md#qserve-zoo-checkpoints) holds the model's HF `config.json` (no
`quantization_config`), tokenizer files and a pickled torch state dict: `pytorch_model*.bin`, or
`*.pt` (`quant_model.pt`). Its tensors, per
quantized linear `<prefix>`:

    W4A8 per-channel   <prefix>.qweight int8 [N, K/2], .s1_scales fp16 [N], .s1_szeros fp16 [N]
    W4A8 g128          <prefix>.qweight, .s1_scales, .s2_scales int8 [K/128, N], .s2_zeros int8 [K/128, N]
    W8A8               <prefix>.weight int8 [N, K], .dequant_scale fp16 [N]

plus, for LServe's per-tensor static KV8, `model.layers.{i}.self_attn.kv_scale_quant_orig` float
[2] per layer, and the fp tensors (embeddings, norms, biases, lm_head) under their HF names. The
converters name linears after HF's modules (q_proj, k_proj, ...); QServe's runtime fuses them into
`qkv_proj` / `gate_up_proj`, and state dicts saved from its model carry those names: both are read,
a fused linear split back into its HF shards (a row slice of qweight at a multiple of 32 output
channels is exactly the shard's packed tiles, and a column slice of the permuted s2 tensors the
shard's columns, packing.py).

The file records no precision: its format follows from the tensor names, and its KV cache from
`kv_scale_quant_orig` (present: per-tensor KV8) or the request (default KV4 for W4A8, as QServe's
W4A8KV4 zoo, and KV8 for W8A8). Norm weights are read as stored: QServe's W4A8 runtime skips them
because QoQ's rotation folds them into the next linears and resets them to ones, so reading the
stored ones computes the same thing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from omniserve.errors import CheckpointError, ConfigError
from omniserve.formats.checkpoint import (
    CONFIG_FILE,
    KV_SCALE_SUFFIX,
    QuantizationConfig,
    QuantizedCheckpoint,
    check_precision,
    linear_from_qserve,
    pop_kv_scales,
)
from omniserve.formats.kv import PER_TENSOR, PER_TOKEN_HEAD
from omniserve.formats.packing import TILE
from omniserve.formats.precision import GROUP_SIZE_128, PER_CHANNEL, Precision, parse
from omniserve.formats.weight import StoredWeight, weight_format

RECIPE_SOURCE = "qserve_zoo"
"""`quantization_config.recipe["source"]` of a checkpoint read from the zoo format."""

_W4_SUFFIXES = frozenset({"qweight", "s1_scales", "s1_szeros", "s2_scales", "s2_zeros"})
_W8_SUFFIXES = frozenset({"dequant_scale"})
# Fused linear name -> its HF shards, in output order.
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def zoo_weight_files(path: str | Path) -> list[Path]:
    """The zoo state-dict files of directory `path` (empty when it holds none)."""
    root = Path(path)
    return sorted([*root.glob("pytorch_model*.bin"), *root.glob("*.pt")])


def is_qserve_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a zoo directory: an HF config without our quantization_config, no
    safetensors, and a torch state dict."""
    root = Path(path)
    config = root / CONFIG_FILE
    if not config.is_file() or any(root.glob("*.safetensors")) or not zoo_weight_files(root):
        return False
    try:
        return "quantization_config" not in json.loads(config.read_text())
    except json.JSONDecodeError:
        return False


def qserve_precision(path: str | Path, requested: Precision | None) -> Precision:
    """The precision a zoo checkpoint serves: its weight format, with the requested KV mode (or
    the default above). ConfigError when the request's weights or group size differ from the
    file's, or when it asks for KV4 of a per-tensor KV8 checkpoint."""
    return _detect(_load_state_dict(Path(path)), Path(path), requested)[0]


def read_qserve_checkpoint(path: str | Path, requested: Precision | None) -> QuantizedCheckpoint:
    """Read, validate and convert a zoo checkpoint. CheckpointError names a missing, unreadable or
    malformed file or tensor; ConfigError a precision the file does not hold."""
    root = Path(path)
    state = _load_state_dict(root)
    precision, per_tensor = _detect(state, root, requested)
    config = json.loads((root / CONFIG_FILE).read_text())
    kv_scales = pop_kv_scales(state, config, per_tensor)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        prefix, _, suffix = name.rpartition(".")
        if suffix in _W4_SUFFIXES | _W8_SUFFIXES or (suffix == "weight" and t.dtype == torch.int8):
            groups.setdefault(prefix, {})[suffix] = t
        else:
            tensors[name] = t
    expected = {f.name for f in dataclasses.fields(weight_format(precision))}
    linears: dict[str, StoredWeight] = {}
    for prefix, parts in groups.items():
        extra = sorted(set(parts) - expected)
        if extra:
            raise CheckpointError(
                f"{root}: linear {prefix} has {', '.join(extra)}, which {precision.name} with "
                f"group_size {precision.group_size} does not store (it needs {', '.join(sorted(expected))})"
            )
        for shard, shard_parts in _split_fused(prefix, parts, tensors, config).items():
            try:
                linears[shard] = linear_from_qserve(shard_parts, precision)
            except CheckpointError as exc:
                raise CheckpointError(f"{root}: linear {shard}: {exc}") from None
    quant = QuantizationConfig(
        precision,
        {p: w.shape for p, w in linears.items()},
        {"source": RECIPE_SOURCE},
        PER_TENSOR if per_tensor else PER_TOKEN_HEAD,
    )
    return QuantizedCheckpoint(config, quant, linears, tensors, kv_scales)


def _load_state_dict(root: Path) -> dict[str, torch.Tensor]:
    files = zoo_weight_files(root)
    if not files:
        raise CheckpointError(f"{root} holds no pytorch_model*.bin or *.pt state dict")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            # mmap: the tensors stay on disk until used, so detecting the precision and then
            # reading the checkpoint does not read an 8B model twice.
            part = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # a truncated or foreign file raises pickle/zip/runtime errors
            raise CheckpointError(f"{file} cannot be read as a torch state dict: {exc}") from exc
        if not isinstance(part, dict):
            raise CheckpointError(f"{file} holds a {type(part).__name__}, not a state dict")
        for name, t in part.items():
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(
                    f"{file}: entry {name!r} is a {type(t).__name__}, not a tensor"
                )
            if name in state:
                raise CheckpointError(f"tensor {name} is stored twice (again in {file.name})")
            state[name] = t
    return state


def _detect(
    state: dict[str, torch.Tensor], root: Path, requested: Precision | None
) -> tuple[Precision, bool]:
    """(precision, per-tensor KV) of a zoo state dict."""
    suffixes = {name.rpartition(".")[2] for name in state}
    w4, w8 = bool(suffixes & _W4_SUFFIXES), bool(suffixes & _W8_SUFFIXES)
    if w4 and w8:
        raise CheckpointError(
            f"{root}: the state dict mixes W4A8 (qweight, s1_scales, ...) and W8A8 "
            "(dequant_scale) tensors"
        )
    if not (w4 or w8):
        raise CheckpointError(
            f"{root}: no QServe quantized linear in the state dict (expected qweight/s1_scales "
            "for W4A8 or weight/dequant_scale for W8A8); fp PyTorch .bin checkpoints are not "
            "supported, save them as safetensors"
        )
    group_size = GROUP_SIZE_128 if "s2_scales" in suffixes else PER_CHANNEL
    per_tensor = any(name.endswith(KV_SCALE_SUFFIX) for name in state)
    weights = "w4a8" if w4 else "w8a8"
    if requested is not None:
        if (
            requested.float8
            or requested.weight_bits != (4 if w4 else 8)
            or requested.group_size != group_size
        ):
            stored = parse(f"{weights}kv{requested.kv_bits or 8}", group_size)
            check_precision(root, requested, stored)  # raises, naming both
        if per_tensor and requested.kv_bits != 8:
            raise ConfigError(
                f"requested precision {requested.name}, but {root} holds per-tensor static KV8 "
                f"scales (kv_scale_quant_orig); KV4 has no per-tensor form, request a kv8 precision"
            )
        return requested, per_tensor
    kv = 8 if per_tensor or not w4 else 4
    return parse(f"{weights}kv{kv}", group_size), per_tensor


def _split_fused(
    prefix: str,
    parts: dict[str, torch.Tensor],
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
) -> dict[str, dict[str, torch.Tensor]]:
    """{HF linear prefix: its zoo tensors}: `prefix` itself, or the shards of a fused linear (whose
    fp bias in `tensors` is split into the shards' biases too)."""
    parent, _, leaf = prefix.rpartition(".")
    if leaf not in _FUSED:
        return {prefix: parts}
    shards = _FUSED[leaf]
    sizes = _shard_sizes(leaf, config)
    total = sum(sizes)
    for name, t in parts.items():
        n = t.shape[-1] if name in ("s2_scales", "s2_zeros") else t.shape[0]
        if n != total:
            raise CheckpointError(
                f"tensor {prefix}.{name}: a fused {leaf} of {'+'.join(map(str, sizes))} output "
                f"channels (config.json) needs {total} of them, found shape {list(t.shape)}"
            )
    if "qweight" in parts and any(s % TILE for s in sizes):
        raise CheckpointError(
            f"{prefix}: shard sizes {sizes} are not multiples of {TILE}, so the packed qweight "
            "cannot be split into its shards"
        )
    out: dict[str, dict[str, torch.Tensor]] = {f"{parent}.{s}": {} for s in shards}
    for name, t in parts.items():
        dim = 1 if name in ("s2_scales", "s2_zeros") else 0
        for shard, piece in zip(shards, t.split(sizes, dim=dim)):
            out[f"{parent}.{shard}"][name] = piece.contiguous()
    bias = tensors.pop(f"{prefix}.bias", None)
    if bias is not None:
        if tuple(bias.shape) != (total,):
            raise CheckpointError(
                f"tensor {prefix}.bias: expected shape [{total}], found {list(bias.shape)}"
            )
        for shard, piece in zip(shards, bias.split(sizes)):
            tensors[f"{parent}.{shard}.bias"] = piece.contiguous()
    return out


def _shard_sizes(leaf: str, config: dict[str, Any]) -> list[int]:
    try:
        if leaf == "gate_up_proj":
            inter = int(config["intermediate_size"])
            return [inter, inter]
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json cannot size the fused {leaf}: {exc!r}") from None
    return [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
