"""The contract between the engine (which reads the scheduler's buffers) and the model runner.

A `StepPlan` is a set of int32 CPU tensors, views into the scheduler's step buffers sliced to this
step's counts. They are valid until the next `schedule()`; the runner copies what it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLAG_PREFILL = 1 << 0
FLAG_NEEDS_LOGITS = 1 << 1
FLAG_RESELECT = 1 << 2
FLAG_NEW_ROW = 1 << 3


@dataclass(frozen=True, slots=True)
class StepPlan:
    rows: torch.Tensor
    """int32 [n]: persistent batch row of each scheduled request (indexes per-row runner state)."""
    pos0: torch.Tensor
    """int32 [n]: tokens of the request already in the KV cache; positions start here."""
    num_new: torch.Tensor
    """int32 [n]: tokens computed this step for each request."""
    qstart: torch.Tensor
    """int32 [n+1]: prefix sums of num_new (cu_seqlens of the queries)."""
    flags: torch.Tensor
    """int32 [n]: FLAG_* bits."""
    input_ids: torch.Tensor
    """int32 [T]: every scheduled token, request after request."""
    page_updates: torch.Tensor
    """int32 [k, 3]: (row, column, page) writes into the dense page table, applied before the
    forward pass. Column c of a row holds the page of positions [c*page_size, (c+1)*page_size)."""

    @property
    def num_reqs(self) -> int:
        return int(self.rows.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
