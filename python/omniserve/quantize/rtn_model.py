"""Write an RTN-quantized checkpoint of an HF fp checkpoint, in our format (formats/checkpoint.py).

Round-to-nearest only (formats/weight.py's quantizers, no clipping, smoothing, rotation or
GPTQ): a baseline for tests and for the accuracy tables (the QoQ quantizer is quantize/qoq/).
Every decoder projection (`model.layers.*.{q,k,v,o,gate,up,down}_proj.weight`) is quantized;
embeddings, norms, biases and lm_head are copied as stored, as QServe keeps them in fp16.
Tokenizer and generation files are copied so that the output directory serves on its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from omniserve.errors import CheckpointError, ConfigError
from omniserve.formats.checkpoint import CONFIG_FILE, copy_side_files, write_checkpoint
from omniserve.formats.precision import Precision
from omniserve.formats.weight import StoredWeight, quantize_weight

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RECIPE: dict[str, Any] = {"method": "rtn"}
"""The `quantization_config.recipe` of these checkpoints."""


def is_quantized_projection(name: str) -> bool:
    """Whether checkpoint tensor `name` is a decoder projection weight that W4A8/W8A8 quantize."""
    parts = name.split(".")
    return name.startswith("model.layers.") and parts[-1] == "weight" and parts[-2] in _PROJECTIONS


def write_rtn_checkpoint(src: str | Path, dst: str | Path, precision: Precision) -> None:
    """RTN-quantize the fp checkpoint directory `src` into directory `dst` at `precision`."""
    source, out = Path(src), Path(dst)
    if not precision.quantized_weights:
        raise ConfigError(f"{precision.name} keeps fp weights; serve {src} as it is")
    if out.exists() and out.resolve() == source.resolve():
        raise ConfigError(f"{dst}: write the quantized checkpoint to another directory than {src}")
    config = json.loads((source / CONFIG_FILE).read_text())
    if "quantization_config" in config:
        raise CheckpointError(f"{src} is already quantized; RTN needs an fp checkpoint")
    linears: dict[str, StoredWeight] = {}
    tensors: dict[str, torch.Tensor] = {}
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{src} holds no *.safetensors file")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                t = f.get_tensor(name)
                if not is_quantized_projection(name):
                    tensors[name] = t
                    continue
                prefix = name.removesuffix(".weight")
                try:
                    linears[prefix] = quantize_weight(t.float(), precision)
                except ValueError as exc:  # the format's tile / group constraints
                    raise ConfigError(
                        f"{prefix} cannot be stored as {precision.name} with group_size "
                        f"{precision.group_size}: {exc}"
                    ) from None
    write_checkpoint(out, config, precision, linears, tensors, RECIPE)
    copy_side_files(source, out)
