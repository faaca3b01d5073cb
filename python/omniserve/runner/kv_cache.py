"""The paged KV cache (dense pool): page storage, the persistent page table, and the arithmetic
from token positions to cache rows.

A page holds `page_size` consecutive positions of one request, for all KV heads of a layer; every
layer uses the same page ids. Page 0 is the null page: the scheduler never hands it to a request,
so writes of padding tokens may land there. A position's *slot* is page * page_size + offset in
the page. Each layer's K (and V) is stored heads-outermost, [kv_heads, num_slots, head_dim], and
attention sees it flattened to rows: head h of slot s is row h * num_slots + s. Gathering rows
indexed [kv_heads, ...] then reads whole head_dim rows (a fast row gather) straight into the
[kv_heads, ..., head_dim] batches attention's matmuls want, with no transposing copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from omniserve.layers.attention import PagedAttention


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_page(self) -> int:
        """K and V of one page across all layers."""
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * itemsize


class KVCache:
    def __init__(
        self,
        spec: KVCacheSpec,
        num_pages: int,
        max_num_seqs: int,
        max_pages_per_seq: int,
        device: torch.device,
    ) -> None:
        self.spec = spec
        self.num_pages = num_pages
        self.page_size = spec.page_size
        # One allocation for every layer's K and V. Zero-filled so that no slot ever holds NaN bits
        # (a masked-out NaN key would still poison softmax(QKᵀ)V through 0 * NaN).
        self.num_slots = num_pages * spec.page_size
        self.storage = torch.zeros(
            spec.num_layers, 2, spec.num_kv_heads * self.num_slots, spec.head_dim,
            dtype=spec.dtype, device=device,
        )
        self._head_base = torch.arange(spec.num_kv_heads, device=device) * self.num_slots
        self.page_table = torch.zeros(
            max_num_seqs, max_pages_per_seq, dtype=torch.int32, device=device
        )

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes

    def bind(self, layers: Sequence[PagedAttention]) -> None:
        """Point each attention layer at its [kv_heads * num_slots, head_dim] K and V rows."""
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.storage[i, 0], self.storage[i, 1]

    def apply_page_updates(self, updates: torch.Tensor) -> None:
        """Write (row, column, page) triples [k, 3] (on the cache's device) into the page table."""
        if updates.shape[0]:
            index = updates[:, :2].long()
            self.page_table[index[:, 0], index[:, 1]] = updates[:, 2]

    def index(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Cache rows (long [kv_heads, *shape]) of `positions` in the requests at page-table `rows`
        (broadcast together to `shape`). The one place that turns positions into addresses."""
        pages = self.page_table[rows, positions // self.page_size].long()
        slots = pages * self.page_size + positions % self.page_size
        return self._head_base.view(-1, *[1] * slots.dim()) + slots
