"""The vocabulary-parallel token embedding (tensor parallelism)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omniserve.distributed import ParallelGroup
from omniserve.layers.linear import Part, TensorSlot


class VocabParallelEmbedding(nn.Module):
    """One rank's rows `part` of the embedding table. An id outside them looks up zeros, so the
    sum over the ranks, where exactly one holds each id's row, is the whole table's lookup (and
    exact: the other terms are zeros). Rows past the vocabulary (the last rank's padding) stay
    zero, which also makes them zero logits of a tied LM head, cut off after the gather."""

    def __init__(self, part: Part, hidden_size: int, group: ParallelGroup) -> None:
        super().__init__()
        self.part, self.group = part, group
        self.weight = nn.Parameter(torch.zeros(part.size, hidden_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids.long() - self.part.start
        outside = (local < 0) | (local >= self.part.size)
        rows = F.embedding(local.clamp(0, self.part.size - 1), self.weight)
        return self.group.all_reduce_sum(rows.masked_fill_(outside.unsqueeze(-1), 0.0))

    def checkpoint_slots(self, prefix: str) -> dict[str, TensorSlot]:
        shape = self.part.shape_of(self.weight.shape)
        return {f"{prefix}.weight": TensorSlot(self.weight, 0, shape, self.part)}
