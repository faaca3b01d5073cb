"""DeepCompressor fake-quant dump → our checkpoint (formats/checkpoint.py), exactly
(docs/formats.md#deepcompressor-dumps).

A dump directory (`python -m deepcompressor.app.llm.ptq ... --save-model`) holds:

    model.pt    the fake-quantized state dict in HF names: every decoder projection weight is
                already dequantized (fp16, on its quantization grid), rotation, smoothing and norm
                folding are applied; embeddings, norms and lm_head are plain.
    scale.pt    per quantized projection `<p>` = `model.layers.{i}.{self_attn,mlp}.*_proj`:
                  <p>.weight.scale.0      level-0 scale, one per output channel (any shape of N values)
                  <p>.weight.scale.1      level-1 integer group scale, N·K/128 values (g128 only)
                  <p>.weight.zero         zero point in code units (W4), N (per-channel) or
                                          N·K/128 (g128) values; signed (sint4) zeros are shifted by 8
                  <p>.weight.scaled_zero  or the zero already scaled (newer DeepCompressor): z·s in
                                          weight units (per-channel) or z·s2 in level-1 units (g128)
    acts.pt     (per-tensor KV8 only) calibration ranges per layer i, under
                  model.layers.{i}.self_attn.k_rotary_emb.output   (post-RoPE keys)
                  model.layers.{i}.self_attn.v_proj.output         (values)
                each {"dynamic_range.0.max": t} (lmquant) or {"dynamic_range": [{"max": t}]}.

The integer codes are recovered from the fake-quant weight W and its scales, with s the stored
(fp16) scale, then stored in our format (formats/weight.py):

    W8A8:              q = round(W / s)                         Ŵ = s · q,   q ∈ [−127, 127]
    W4A8 per-channel:  q = round(W / s + z)                     Ŵ = s · q − fp16(z · s),  q ∈ [0, 15]
                       (scaled zero zs: q = round((W + zs) / s), s1_szeros = fp16(zs))
    W4A8 g128:         w8 = round(W / s1) ∈ [−128, 127]         level-1 int8 codes
                       q = w8 / s2 + z, exactly an integer      Ŵ = s1 · s2 · (q − z)
                       (scaled zero zq = z · s2: q = (w8 + zq) / s2, s2_zeros = −zq)

Each weight must lie on its grid: |x − round(x)| ≤ 2^-4 + 2^-9 · |x| for every x above (W / s, in
code units), which admits two fp16 roundings of W (2^-11 relative each) and of the scaled zero, and
rejects weights that were not quantized with these scales (a random value fails it with
probability > 1/2 per element). A weight off the grid, a code out of range or a g128 level-1 code
that is not a multiple of its group scale is an error naming the layer: silently re-rounding would
serve a model other than the one that was evaluated.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from omniserve.errors import CheckpointError, ConfigError
from omniserve.formats.checkpoint import (
    CONFIG_FILE,
    check_kv_granularity,
    copy_side_files,
    write_checkpoint,
)
from omniserve.formats.kv import PER_TENSOR, PER_TOKEN_HEAD, static_kv_scales
from omniserve.formats.packing import pack_w4, permute_group_columns
from omniserve.formats.precision import GROUP_SIZE_128, Precision
from omniserve.formats.weight import (
    W4_LEVELS,
    W8_QMAX,
    QuantizedWeight,
    W4A8PerChannelWeight,
    W4A8PerGroupWeight,
    W8A8Weight,
    weight_format,
)
from omniserve.quantize.rtn_model import is_quantized_projection

MODEL_FILE = "model.pt"
SCALES_FILE = "scale.pt"
ACTS_FILE = "acts.pt"
_SCALE_SUFFIXES = (".weight.scale.0", ".weight.scale.1", ".weight.zero", ".weight.scaled_zero")
_KEY_ACTS = "self_attn.k_rotary_emb.output"
_VALUE_ACTS = "self_attn.v_proj.output"


@dataclass(frozen=True)
class ConversionSummary:
    output: str
    precision: str
    group_size: int
    kv_granularity: str
    num_linears: int
    max_grid_residual: float
    """Largest |x − round(x)| over every recovered code (0 for an exactly fake-quantized dump)."""


@dataclass(frozen=True)
class _LinearDump:
    """One projection's fake-quant weight and its entries in scale.pt."""

    name: str
    weight: torch.Tensor
    scale0: torch.Tensor
    scale1: torch.Tensor | None
    zero: torch.Tensor | None
    scaled_zero: torch.Tensor | None


def convert_deepcompressor(
    model_dir: str | Path,
    dump_dir: str | Path,
    output_dir: str | Path,
    precision: Precision,
    kv_granularity: str = PER_TOKEN_HEAD,
    *,
    show_progress: bool = False,
) -> ConversionSummary:
    """Convert the dump in `dump_dir` of the HF model `model_dir` (config and tokenizer files) into
    our checkpoint at `output_dir`. `kv_granularity` PER_TENSOR takes static KV8 scales from
    acts.pt. Raises ConfigError for an invalid request, CheckpointError for a dump that is
    missing, unreadable, or does not hold `precision` on its grid (naming the tensor or layer)."""
    source, dump, out = Path(model_dir), Path(dump_dir), Path(output_dir)
    if not precision.quantized_weights:
        raise ConfigError(f"{precision.name} keeps fp weights; a dump converts to w4a8 or w8a8")
    if precision.float8:
        raise ConfigError("a DeepCompressor dump holds integer grids; it converts to w4a8 or w8a8")
    check_kv_granularity(kv_granularity, precision)
    if out.exists() and out.resolve() in (source.resolve(), dump.resolve()):
        raise ConfigError(f"{output_dir}: write the checkpoint to a new directory")
    config = _read_config(source)
    state = _load(dump / MODEL_FILE)
    dumps = _linear_dumps(state, _load(dump / SCALES_FILE), precision)
    _check_all_projections(dumps, config, dump)
    kv_scales = None
    if kv_granularity == PER_TENSOR:
        acts = _load(dump / ACTS_FILE, what="per-tensor KV scales need")
        kv_scales = static_kv_scales(kv_absmax_from_acts(acts, int(config["num_hidden_layers"])))
    linears: dict[str, QuantizedWeight] = {}
    worst = 0.0
    for d in tqdm(dumps.values(), desc="converting", unit="linear", disable=not show_progress):
        linears[d.name], residual = _convert_linear(d, precision)
        worst = max(worst, residual)
    tensors = {n: t for n, t in state.items() if n.removesuffix(".weight") not in dumps}
    recipe = {"method": "deepcompressor", "dump": dump.name}
    write_checkpoint(out, config, precision, linears, tensors, recipe, kv_scales)
    copy_side_files(source, out)
    return ConversionSummary(
        str(out), precision.name, precision.group_size, kv_granularity, len(linears), worst
    )


def kv_absmax_from_acts(acts: Mapping[str, Any], num_layers: int) -> torch.Tensor:
    """fp32 [num_layers, 2 (K, V)] maxima of |post-RoPE key| and |value| from acts.pt."""
    out = torch.zeros(num_layers, 2)
    for i in range(num_layers):
        for kv, suffix in enumerate((_KEY_ACTS, _VALUE_ACTS)):
            key = f"model.layers.{i}.{suffix}"
            if key not in acts:
                raise CheckpointError(f"{ACTS_FILE}: entry {key} is missing")
            out[i, kv] = _dynamic_range_max(acts[key], key)
    return out


def _dynamic_range_max(entry: Any, key: str) -> float:
    """max |x| of one acts.pt entry, in either of its two layouts (module doc)."""
    value: Any = None
    if isinstance(entry, Mapping):
        if "dynamic_range.0.max" in entry:
            value = entry["dynamic_range.0.max"]
        elif isinstance(entry.get("dynamic_range"), list | tuple) and entry["dynamic_range"]:
            first = entry["dynamic_range"][0]
            value = first.get("max") if isinstance(first, Mapping) else None
    if value is None:
        raise CheckpointError(
            f"{ACTS_FILE}: entry {key} has neither 'dynamic_range.0.max' nor "
            "'dynamic_range'[0]['max']"
        )
    t = torch.as_tensor(value, dtype=torch.float32)
    if t.numel() == 0 or not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{ACTS_FILE}: entry {key} holds no finite maximum")
    return float(t.abs().max())


def _read_config(source: Path) -> dict[str, Any]:
    path = source / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{source}: no {CONFIG_FILE} (--model must be the HF model directory)"
        )
    config = json.loads(path.read_text())
    if "quantization_config" in config:
        raise CheckpointError(f"{path} already has a quantization_config; give the fp model's")
    if not isinstance(config.get("num_hidden_layers"), int):
        raise CheckpointError(f"{path} has no integer num_hidden_layers")
    return config


def _load(path: Path, what: str = "the conversion needs") -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist ({what} it)")
    try:
        # mmap: an 8B model.pt stays on disk until each tensor is converted.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated or foreign files raise pickle/zip/runtime errors
        raise CheckpointError(f"{path} cannot be read as a torch file: {exc}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict")
    return obj


def _linear_dumps(
    state: dict[str, Any], scales: dict[str, Any], precision: Precision
) -> dict[str, _LinearDump]:
    """Every projection of model.pt with its scale.pt entries, by linear prefix."""
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{MODEL_FILE}: entry {name!r} is a {type(t).__name__}")
    by_prefix: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in scales.items():
        suffix = next((s for s in _SCALE_SUFFIXES if key.endswith(s)), None)
        if suffix is None or not isinstance(t, torch.Tensor):
            raise CheckpointError(
                f"{SCALES_FILE}: entry {key!r} is not a weight scale or zero tensor (expected "
                f"<linear>{{{', '.join(_SCALE_SUFFIXES)}}})"
            )
        prefix = key.removesuffix(suffix)
        if f"{prefix}.weight" not in state:
            raise CheckpointError(f"{SCALES_FILE}: {key} belongs to no weight in {MODEL_FILE}")
        by_prefix.setdefault(prefix, {})[suffix] = t
    dumps: dict[str, _LinearDump] = {}
    for name, weight in state.items():
        if not is_quantized_projection(name):
            continue
        prefix = name.removesuffix(".weight")
        entries = by_prefix.pop(prefix, {})
        if ".weight.scale.0" not in entries:
            raise CheckpointError(f"{SCALES_FILE}: {prefix}.weight.scale.0 is missing")
        if weight.dim() != 2 or not weight.is_floating_point():
            raise CheckpointError(
                f"{MODEL_FILE}: {name} must be a float [N, K] weight, found {weight.dtype} "
                f"{list(weight.shape)}"
            )
        dumps[prefix] = _LinearDump(
            prefix,
            weight,
            entries[".weight.scale.0"],
            entries.get(".weight.scale.1"),
            entries.get(".weight.zero"),
            entries.get(".weight.scaled_zero"),
        )
        _check_dump_kind(dumps[prefix], precision)
    if by_prefix:  # scales of weights that are not decoder projections
        raise CheckpointError(
            f"{SCALES_FILE}: scales for {', '.join(sorted(by_prefix))}, which are not decoder "
            "projections (only model.layers.*.{q,k,v,o,gate,up,down}_proj are quantized)"
        )
    return dumps


def _check_dump_kind(d: _LinearDump, precision: Precision) -> None:
    """ConfigError when the entries of scale.pt say the dump holds another precision."""
    has_zero = d.scaled_zero is not None or (d.zero is not None and bool(d.zero.any()))
    if precision.weight_bits == 8:
        if d.scale1 is not None or has_zero:
            raise ConfigError(
                f"{d.name} has {'group scales' if d.scale1 is not None else 'zero points'} "
                f"(a W4 dump), but the requested precision is {precision.name}; use a w4a8 one"
            )
        return
    if d.zero is None and d.scaled_zero is None:
        raise CheckpointError(
            f"{SCALES_FILE}: {d.name}.weight.zero (or .weight.scaled_zero) is missing; "
            f"{precision.name} weights are asymmetric uint4"
        )
    if d.zero is not None and d.scaled_zero is not None:
        raise CheckpointError(
            f"{SCALES_FILE}: {d.name} has both .weight.zero and .weight.scaled_zero"
        )
    if precision.group_size == GROUP_SIZE_128 and d.scale1 is None:
        raise ConfigError(
            f"{d.name} has no level-1 group scale ({d.name}.weight.scale.1): the dump is "
            "per-channel, use --group-size -1"
        )
    if precision.group_size != GROUP_SIZE_128 and d.scale1 is not None:
        raise ConfigError(
            f"{d.name} has a level-1 group scale ({d.name}.weight.scale.1): the dump is g128, "
            "use --group-size 128"
        )


def _check_all_projections(
    dumps: dict[str, _LinearDump], config: dict[str, Any], dump: Path
) -> None:
    projections = [("self_attn", p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    projections += [("mlp", p) for p in ("gate_proj", "up_proj", "down_proj")]
    for i in range(int(config["num_hidden_layers"])):
        for block, proj in projections:
            name = f"model.layers.{i}.{block}.{proj}"
            if name not in dumps:
                raise CheckpointError(f"{dump / MODEL_FILE}: {name}.weight is missing")


def _convert_linear(d: _LinearDump, precision: Precision) -> tuple[QuantizedWeight, float]:
    n, k = d.weight.shape
    try:
        weight_format(precision).check_shape(n, k)
    except ValueError as exc:
        raise CheckpointError(f"{d.name}: {exc}") from None
    w = d.weight.float()
    s = _values(d.scale0, (n,), f"{d.name}.weight.scale.0").half().float()
    if precision.weight_bits == 8:
        x = w / s[:, None]
        q = _codes(x, d.name, "int8 code")
        _check_range(q, -W8_QMAX, W8_QMAX, d.name, "int8 code")
        return W8A8Weight(q.to(torch.int8), s.half()), _residual(x, q)
    if precision.group_size == GROUP_SIZE_128:
        return _convert_g128(d, w, s)
    if d.zero is not None:
        z = _integers(_values(d.zero, (n,), f"{d.name}.weight.zero"), f"{d.name}.weight.zero")
        if bool((z < 0).any()):
            z = z + 8  # signed (sint4) zero points → unsigned codes
        x = w / s[:, None] + z[:, None]
        szeros = (z * s).half()
    else:
        zs = _values(d.scaled_zero, (n,), f"{d.name}.weight.scaled_zero")
        x = (w + zs[:, None]) / s[:, None]
        if bool((x.round() < 0).any()):  # signed (sint4) codes: shift the codes and the zero by 8
            x, zs = x + 8, zs + 8 * s
        szeros = zs.half()
    q = _codes(x, d.name, "uint4 code")
    _check_range(q, 0, W4_LEVELS, d.name, "uint4 code")
    packed = W4A8PerChannelWeight(pack_w4(q.to(torch.uint8)), s.half(), szeros)
    return packed, _residual(x, q)


def _convert_g128(
    d: _LinearDump, w: torch.Tensor, s1: torch.Tensor
) -> tuple[W4A8PerGroupWeight, float]:
    n, k = w.shape
    g = k // GROUP_SIZE_128
    assert d.scale1 is not None  # _check_dump_kind
    s2 = _integers(
        _values(d.scale1, (n, g), f"{d.name}.weight.scale.1"), f"{d.name}.weight.scale.1"
    )
    _check_range(s2, 1, 127, d.name, "group scale (weight.scale.1)")
    x1 = w / s1[:, None]
    w8 = _codes(x1, d.name, "level-1 int8 code")
    _check_range(w8, -128, 127, d.name, "level-1 int8 code")
    w8g = w8.reshape(n, g, GROUP_SIZE_128)
    if d.zero is not None:
        z = _integers(_values(d.zero, (n, g), f"{d.name}.weight.zero"), f"{d.name}.weight.zero")
        if bool((z < 0).any()):
            z = z + 8  # signed (sint4) zero points → unsigned codes
        zq = z * s2
    else:
        zq = _integers(
            _values(d.scaled_zero, (n, g), f"{d.name}.weight.scaled_zero"),
            f"{d.name}.weight.scaled_zero",
        )
    shifted = w8g + zq[..., None]
    if bool((torch.remainder(shifted, s2[..., None]) != 0).any()):
        raise CheckpointError(
            f"{d.name}: level-1 codes round(W / scale.0) + zero are not multiples of their group "
            "scale (weight.scale.1): the weight is not on the g128 grid"
        )
    q = shifted / s2[..., None]
    if bool((q < 0).any()):  # signed (sint4) codes: shift the codes and the zero by 8
        q, zq = q + 8, zq + 8 * s2
    _check_range(q, 0, W4_LEVELS, d.name, "uint4 code")
    # −z·s2 is stored in int8; z·s2 ≤ 128 keeps it there (our quantizer gives ≤ 127).
    _check_range(zq, 0, 128, d.name, "scaled zero (z · scale.1)")
    packed = W4A8PerGroupWeight(
        pack_w4(q.reshape(n, k).to(torch.uint8)),
        s1.half(),
        permute_group_columns(s2.t().to(torch.int8).contiguous()),
        permute_group_columns((-zq).t().to(torch.int8).contiguous()),
    )
    return packed, _residual(x1, w8)


def _values(t: torch.Tensor | None, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """fp32 `t` reshaped to `shape` (DeepCompressor keeps broadcast dims such as [N, 1, G, 1])."""
    assert t is not None
    numel = 1
    for size in shape:
        numel *= size
    if t.numel() != numel or t.is_complex() or t.dtype == torch.bool:
        raise CheckpointError(
            f"{SCALES_FILE}: {name} has shape {list(t.shape)}; expected {numel} values "
            f"({' x '.join(map(str, shape))})"
        )
    return t.float().reshape(shape)


def _integers(t: torch.Tensor, name: str) -> torch.Tensor:
    if not bool((t == t.round()).all()):
        raise CheckpointError(f"{SCALES_FILE}: {name} must hold integers")
    return t


def _codes(x: torch.Tensor, layer: str, what: str) -> torch.Tensor:
    """round(x), after checking every x is on the integer grid (module doc)."""
    q = x.round()
    off = (x - q).abs() > 2.0**-4 + 2.0**-9 * x.abs()
    if bool(off.any()):
        idx = tuple(int(i) for i in off.nonzero()[0])
        raise CheckpointError(
            f"{layer}: the fake-quant weight is not on the quantization grid of its scales: "
            f"{int(off.sum())} of {x.numel()} weights, e.g. at {list(idx)} the {what} would be "
            f"{float(x[idx]):.4f} (W / scale must be an integer up to fp16 rounding)"
        )
    return q


def _check_range(q: torch.Tensor, lo: int, hi: int, layer: str, what: str) -> None:
    if bool(((q < lo) | (q > hi)).any()):
        raise CheckpointError(
            f"{layer}: {what} out of [{lo}, {hi}] (found {int(q.min())} .. {int(q.max())})"
        )


def _residual(x: torch.Tensor, q: torch.Tensor) -> float:
    return float((x - q).abs().max()) if x.numel() else 0.0
