"""The dense linear layer, and how its parameters map onto checkpoint tensors.

Every projection of a model goes through `Linear`, so a quantized linear (W8A8, W4A8) replaces it
by providing the same two things: `forward(x)` and `checkpoint_slots(prefix)`.

Under tensor parallelism (Megatron-style) a layer holds one rank's part of the checkpoint's
weight (`ParallelSplit`): a column-parallel layer some output rows of each slice, a row-parallel one
some input columns, its output summed over the ranks. The checkpoint tensors stay whole and the
slots take each rank's part of them at load time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from omniserve.distributed import ParallelGroup

_W = TypeVar("_W", bound="_Narrowable")


class _Narrowable(Protocol):
    """A stored weight format (formats/weight.py), which takes a channel range whole."""

    def narrow(self: _W, dim: int, start: int, size: int) -> _W: ...


@dataclass(frozen=True, slots=True)
class Part:
    """One rank's part of a tensor: `size` entries of dim `dim` from `start`, of `full`. A part
    that runs past the end (the last rank of a padded vocabulary) holds fewer; the rest of its
    place stays zero."""

    dim: int
    start: int
    size: int
    full: int

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """This part of a tensor whose dim `dim` is the full extent."""
        return t.narrow(self.dim, self.start, max(min(self.size, self.full - self.start), 0))

    def shape_of(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The full tensor's shape, of a part's shape."""
        return tuple(self.full if d == self.dim else n for d, n in enumerate(shape))


@dataclass(frozen=True, slots=True)
class TensorSlot:
    """Where one checkpoint tensor of `shape` lands: rows [start, ...) of `param`, which hold all
    of it, or only `part` of it (tensor parallelism)."""

    param: torch.Tensor
    start: int
    shape: tuple[int, ...]
    part: Part | None = None

    def load(self, tensor: torch.Tensor) -> None:
        if self.part is None:
            self.param.data[self.start : self.start + self.shape[0]].copy_(tensor)
            return
        piece = self.part.take(tensor)
        rows = self.part.size if self.part.dim == 0 else self.shape[0]
        place = self.param.data[self.start : self.start + rows]
        place.zero_()  # where the part does not reach: a padded vocabulary's last rows
        place[tuple(slice(0, n) for n in piece.shape)].copy_(piece)


@dataclass(frozen=True, slots=True)
class ParallelSplit:
    """How a linear layer is split over the ranks of `group`. Column-parallel (`rows`): the layer
    holds, of each output slice of the checkpoint, the rows `rows[i]`, and its bias with them.
    Row-parallel (`columns`): it holds the input columns `columns` of the weight, and its output
    is summed over the ranks before the bias, which every rank holds whole, is added once."""

    group: ParallelGroup
    rows: tuple[Part, ...] | None = None
    columns: Part | None = None

    @property
    def row_parallel(self) -> bool:
        return self.columns is not None

    def checkpoint_shape(self, slice_index: int, n: int, k: int) -> tuple[int, int]:
        """(N, K) in the checkpoint of output slice `slice_index`'s weight, of which this rank
        holds [n, k]."""
        part = self.part(slice_index)
        if part is None:
            return n, k
        return (part.full, k) if part.dim == 0 else (n, part.full)

    def narrow(self, slice_index: int, weight: _W) -> _W:
        """This rank's part of output slice `slice_index`'s stored weight (the format's
        `narrow`; the weight itself where this rank holds all of it)."""
        part = self.part(slice_index)
        return weight if part is None else weight.narrow(part.dim, part.start, part.size)

    def part(self, slice_index: int, ndim: int = 2) -> Part | None:
        """The part of a checkpoint tensor that a parameter of output slice `slice_index` with
        `ndim` dims (2: a weight, 1: a bias or a per-channel tensor) holds; None: all of it."""
        if self.rows is not None:
            return self.rows[slice_index]
        return self.columns if ndim == 2 else None


class Linear(nn.Module):
    """y = x Wᵀ (+ b), with W of shape [sum(out_sizes), in_features].

    A fused projection (q/k/v, gate/up) is one matmul over concatenated outputs; `shard_names`
    names the sibling checkpoint modules whose weights fill each slice, in order, so checkpoints
    keep HF's unfused names. Parameters are created uninitialised: the loader fills all of them.
    With `split` the sizes are this rank's (tensor parallelism).
    """

    def __init__(
        self,
        in_features: int,
        out_sizes: Sequence[int],
        bias: bool = False,
        shard_names: Sequence[str] | None = None,
        split: ParallelSplit | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_sizes = tuple(out_sizes)
        self.shard_names = checked_shard_names(out_sizes, shard_names)
        self.split = split
        self.weight = nn.Parameter(torch.empty(sum(out_sizes), in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(sum(out_sizes)), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split is not None and self.split.row_parallel:
            y = self.split.group.all_reduce_sum(F.linear(x, self.weight))
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)

    def checkpoint_slots(self, prefix: str) -> dict[str, TensorSlot]:
        """Checkpoint tensor names this layer reads, for a module registered at `prefix`."""
        return fused_slots(
            prefix,
            self.shard_names,
            self.out_sizes,
            {"weight": self.weight, "bias": self.bias},
            self.split,
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
    split: ParallelSplit | None = None,
) -> dict[str, TensorSlot]:
    """Slots of `params` (each [sum(out_sizes), ...] or None) split over the output slices, named
    `<shard prefix>.<param name>`, each holding this rank's part under `split`; shared by the fp
    and the quantized linear layers."""
    prefixes = shard_prefixes(prefix, shard_names)
    sizes = out_sizes if shard_names is not None else [sum(out_sizes)]
    slots: dict[str, TensorSlot] = {}
    start = 0
    for i, (shard, size) in enumerate(zip(prefixes, sizes)):
        for name, p in params.items():
            if p is None:
                continue
            shape = (size, *p.shape[1:])
            part = None if split is None else split.part(i, p.dim())
            if part is not None:
                shape = part.shape_of(shape)
            slots[f"{shard}.{name}"] = TensorSlot(p, start, shape, part)
        start += size
    return slots
