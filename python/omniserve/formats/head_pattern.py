"""Head patterns: which KV heads of a model may become streaming heads (LServe / DuoAttention).

A pattern is DuoAttention's directory, read as DuoAttention writes it:

- `full_attention_heads.tsv`: one row per layer, one tab-separated column per KV head, each a
  learned gate α in [0, 1] (1: the head needs the whole context; 0: sinks and recent tokens are
  enough). Training clamps α to [0, 1], but a value written from bf16 may fall just below 0; such
  tiny excursions are clipped, clear ones refused.
- `config.json`: the training settings; `sink_size` and `recent_size` (tokens) are the streaming
  window the gates were learned under.

Serving binarises the gates with one quantile over all layers and heads (`streaming_heads`), so
how many heads of a layer stream varies from layer to layer, as in DuoAttention and LServe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from omniserve.errors import ConfigError

GATES_FILE = "full_attention_heads.tsv"
SETTINGS_FILE = "config.json"
GATE_TOLERANCE = 0.01
"""How far outside [0, 1] a stored gate may lie and still be clipped rather than refused."""


@dataclass(frozen=True)
class HeadPattern:
    gates: torch.Tensor
    """fp32 [layers, kv_heads], in [0, 1]."""
    sink_size: int | None
    """Sink tokens the gates were learned with (None: config.json does not say)."""
    recent_size: int | None
    """Recent (local) tokens the gates were learned with (None: config.json does not say)."""
    path: Path


def load_head_pattern(path: str | Path, num_layers: int, num_kv_heads: int) -> HeadPattern:
    """The pattern in directory `path` for a model of `num_layers` x `num_kv_heads` KV heads;
    ConfigError naming the file for anything missing, malformed or of another shape."""
    root = Path(path)
    shape = f"expected {num_layers} rows x {num_kv_heads} columns (layers x KV heads)"
    if not root.is_dir():
        raise ConfigError(
            f"head pattern {root}: no such directory ({GATES_FILE} + {SETTINGS_FILE})"
        )
    rows = _read_rows(_required(root / GATES_FILE), shape)
    columns = len(rows[0]) if rows else 0
    if (len(rows), columns) != (num_layers, num_kv_heads):
        raise ConfigError(f"{root / GATES_FILE}: {len(rows)} rows x {columns} columns, {shape}")
    gates = torch.tensor(rows, dtype=torch.float64)
    bad = ~gates.isfinite() | (gates < -GATE_TOLERANCE) | (gates > 1 + GATE_TOLERANCE)
    if bad.any():
        layer, head = (int(i) for i in bad.nonzero()[0])
        value = gates[layer, head].item()
        raise ConfigError(
            f"{root / GATES_FILE}: row {layer + 1} column {head + 1} is {value}; gates lie in [0, 1]"
        )
    sink_size, recent_size = _read_window(_required(root / SETTINGS_FILE))
    return HeadPattern(gates.clamp(0, 1).float(), sink_size, recent_size, root)


def save_head_pattern(
    path: str | Path,
    gates: torch.Tensor,
    *,
    sink_size: int | None,
    recent_size: int | None,
    **settings: Any,
) -> None:
    """Write `gates` [layers, kv_heads] and the settings as a pattern directory (created if
    needed), in DuoAttention's layout (numpy `savetxt` with tabs, as its training script writes)."""
    if gates.dim() != 2:
        raise ValueError(f"gates must be [layers, kv_heads], got shape {list(gates.shape)}")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    rows = gates.detach().to("cpu", torch.float64).tolist()
    text = "".join("\t".join(f"{g:.18e}" for g in row) + "\n" for row in rows)
    (root / GATES_FILE).write_text(text)
    config = {"sink_size": sink_size, "recent_size": recent_size, **settings}
    (root / SETTINGS_FILE).write_text(json.dumps(config, indent=2) + "\n")


def streaming_heads(gates: torch.Tensor, static_sparsity: float) -> torch.Tensor:
    """bool [layers, kv_heads], True for a streaming head: the round(static_sparsity * heads)
    heads with the lowest gates over the whole model. Equal gates are taken in (layer, head)
    order, so the choice is deterministic (DuoAttention adds random noise to break ties)."""
    if not 0.0 <= static_sparsity <= 1.0:  # also refuses NaN
        raise ConfigError(f"static_sparsity must be in [0, 1], got {static_sparsity}")
    flat = gates.detach().flatten()
    lowest = torch.sort(flat, stable=True).indices[: round(static_sparsity * flat.numel())]
    streaming = torch.zeros(flat.numel(), dtype=torch.bool, device=gates.device)
    streaming[lowest] = True
    return streaming.view(gates.shape)


def random_gates(num_layers: int, num_kv_heads: int, seed: int) -> torch.Tensor:
    """fp32 [num_layers, num_kv_heads] gates drawn uniformly from [0, 1): binarised at any
    sparsity, a random choice of that many streaming heads (the baseline a learned pattern must
    beat)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(num_layers, num_kv_heads, generator=generator)


def _required(file: Path) -> Path:
    if not file.is_file():
        raise ConfigError(
            f"{file}: missing; a head pattern directory holds {GATES_FILE} and {SETTINGS_FILE}"
        )
    return file


def _read_rows(file: Path, shape: str) -> list[list[float]]:
    lines = [line for line in file.read_text().splitlines() if line.strip()]
    rows: list[list[float]] = []
    for r, line in enumerate(lines):
        row: list[float] = []
        for c, cell in enumerate(line.split()):
            try:
                row.append(float(cell))
            except ValueError:
                raise ConfigError(
                    f"{file}: row {r + 1} column {c + 1} is not a number: {cell!r}"
                ) from None
        if rows and len(row) != len(rows[0]):
            raise ConfigError(
                f"{file}: row {r + 1} has {len(row)} columns, row 1 has {len(rows[0])}; {shape}"
            )
        rows.append(row)
    return rows


def _read_window(file: Path) -> tuple[int | None, int | None]:
    """(sink_size, recent_size) of a pattern's config.json."""
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file}: not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{file}: expected a JSON object of training settings")
    sizes = []
    for key in ("sink_size", "recent_size"):
        value = config.get(key)
        # bool is an int in Python; JSON true is no token count.
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 0
        ):
            raise ConfigError(
                f"{file}: {key} must be a token count (an integer >= 0), got {value!r}"
            )
        sizes.append(value)
    return sizes[0], sizes[1]
