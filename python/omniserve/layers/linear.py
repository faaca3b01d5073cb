"""The dense linear layer, and how its parameters map onto checkpoint tensors.

Every projection of a model goes through `Linear`, so a quantized linear (W8A8, W4A8) replaces it
by providing the same two things: `forward(x)` and `checkpoint_slots(prefix)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, slots=True)
class TensorSlot:
    """Where one checkpoint tensor lands: rows [start, start + shape[0]) of `param`."""

    param: torch.Tensor
    start: int
    shape: tuple[int, ...]

    def load(self, tensor: torch.Tensor) -> None:
        self.param.data[self.start : self.start + self.shape[0]].copy_(tensor)


class Linear(nn.Module):
    """y = x Wᵀ (+ b), with W of shape [sum(out_sizes), in_features].

    A fused projection (q/k/v, gate/up) is one matmul over concatenated outputs; `shard_names`
    names the sibling checkpoint modules whose weights fill each slice, in order, so checkpoints
    keep HF's unfused names. Parameters are created uninitialised: the loader fills all of them.
    """

    def __init__(
        self,
        in_features: int,
        out_sizes: Sequence[int],
        bias: bool = False,
        shard_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_sizes = tuple(out_sizes)
        self.shard_names = checked_shard_names(out_sizes, shard_names)
        self.weight = nn.Parameter(torch.empty(sum(out_sizes), in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(sum(out_sizes)), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def checkpoint_slots(self, prefix: str) -> dict[str, TensorSlot]:
        """Checkpoint tensor names this layer reads, for a module registered at `prefix`."""
        return fused_slots(
            prefix, self.shard_names, self.out_sizes, {"weight": self.weight, "bias": self.bias}
        )


def checked_shard_names(
    out_sizes: Sequence[int], shard_names: Sequence[str] | None
) -> tuple[str, ...] | None:
    """`shard_names` as a tuple, after checking it names every output slice."""
    if shard_names is None:
        return None
    if len(shard_names) != len(out_sizes):
        raise ValueError("shard_names must name every output slice")
    return tuple(shard_names)


def shard_prefixes(prefix: str, shard_names: Sequence[str] | None) -> list[str]:
    """Checkpoint module names of a layer's output slices: its siblings `shard_names` when fused
    (q/k/v_proj next to qkv_proj), else the layer's own name."""
    if shard_names is None:
        return [prefix]
    parent = prefix.rpartition(".")[0]
    return [f"{parent}.{shard}" if parent else shard for shard in shard_names]


def fused_slots(
    prefix: str,
    shard_names: Sequence[str] | None,
    out_sizes: Sequence[int],
    params: dict[str, torch.Tensor | None],
) -> dict[str, TensorSlot]:
    """Slots of `params` (each [sum(out_sizes), ...] or None) split over the output slices, named
    `<shard prefix>.<param name>`; shared by the fp and the quantized linear layers."""
    prefixes = shard_prefixes(prefix, shard_names)
    sizes = out_sizes if shard_names is not None else [sum(out_sizes)]
    slots: dict[str, TensorSlot] = {}
    start = 0
    for shard, size in zip(prefixes, sizes):
        for name, p in params.items():
            if p is not None:
                slots[f"{shard}.{name}"] = TensorSlot(p, start, (size, *p.shape[1:]))
        start += size
    return slots
