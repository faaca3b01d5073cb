"""The paged KV cache: page storage of the dense and streaming pools, the persistent page tables,
and the arithmetic from token positions to cache rows.

A page holds `page_size` consecutive positions of one request, for the KV heads of its pool; every
layer uses the same page ids. Page 0 of each pool is the null page: the scheduler never hands it
to a request, so writes of padding tokens (and of streaming K/V a step overwrites itself) land
there. A position's *slot* is page * page_size + offset in the page: in the dense pool through the
request's page table, in the streaming pool through its streaming table (`formats/streaming.py`:
sink pages and a ring). Each layer's K (and V) is stored heads-outermost and seen as rows: its
dense KV heads first, [dense_heads, dense_slots, head_dim], then its streaming heads,
[stream_heads, stream_slots, head_dim], so head h of slot s is row base[h] + s
(`layers/attention.HeadLayout`). Without streaming heads that is row h * num_slots + s. Gathering
rows indexed [kv_heads, ...] then reads whole head_dim rows (a fast row gather) straight into the
[kv_heads, ..., head_dim] batches attention's matmuls want, with no transposing copy. Layers may
split their heads differently (a learned pattern does), so each layer has its own row count.

A quantized cache (KV8/KV4, `formats/kv.py`) keeps the same rows in two tensors: the codes (uint8,
head_dim bytes per row for KV8, head_dim / 2 for KV4) and each row's fp16 (scale, zero). Both are
indexed by the same cache rows, so the page math is the same for every storage format; K and V are
quantized when written and dequantized to the compute dtype when read. On a Hopper GPU the
attention layer writes rows of every format with a fused kernel instead of `store`
(`kernels/rope_kv.py`, through `kernel_operands`), producing the same bits, and decodes read them
with the paged decode kernel (`kernels/attention.py`).

Per-tensor static KV8 (`kv_granularity` "per_tensor") stores int8 codes only: each layer's K and V
have one fixed scale (`static_scales`, from the checkpoint), so rows carry no parameters; the
kernels take that scale in place of per-row parameters. The FP8 cache (`kv_fp8`) is per-tensor
too, with e4m3 codes under unit scales; no CUDA kernel reads it yet, so attention over it runs
the torch path (kernels/dispatch.py).

With page selection at decode (LServe's dynamic sparsity, `formats/page_selection.py`) the cache
also keeps each layer's key statistics, one stat row per `logical_tokens` cache rows (min and max
per channel, in the compute dtype), and the selected page-table columns of every row's requests
per layer and selecting head: [layers, max_num_seqs + 1 (scratch), heads, k] int32, persistent
so that a selection serves the steps after it and CUDA graphs read it in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from omniserve.formats.fp8 import FP8_DTYPE
from omniserve.formats.kv import (
    PER_TENSOR,
    PER_TOKEN_HEAD,
    CacheRows,
    dequantize_kv,
    dequantize_kv_fp8,
    dequantize_kv_static,
    packed_dim,
    quantize_kv,
    quantize_kv_fp8,
    quantize_kv_static,
)
from omniserve.formats.page_selection import PageSelection
from omniserve.formats.streaming import StreamTable
from omniserve.layers.attention import HeadLayout, PagedAttention


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    """The compute dtype: what the cache stores when not quantized, and what reads return."""
    kv_bits: int | None = None
    """8 or 4 for a quantized cache (`formats/kv.py`); None stores `dtype`."""
    kv_granularity: str = PER_TOKEN_HEAD
    """PER_TOKEN_HEAD, or PER_TENSOR (static KV8: kv_bits 8, scales given to the KVCache)."""
    kv_fp8: bool = False
    """Per-tensor codes are e4m3 rather than int8 (`kv_cache_dtype` "fp8")."""
    stream_heads: tuple[tuple[int, ...], ...] = ()
    """Per layer, its streaming KV heads (sorted); () when no layer has any."""
    stat_tokens: int | None = None
    """Tokens per logical page where key statistics are kept (page selection), else None."""

    def __post_init__(self) -> None:
        if self.kv_granularity == PER_TENSOR and self.kv_bits != 8:
            raise ValueError(
                f"kv_granularity {PER_TENSOR!r} needs an int8 KV cache, got kv_bits={self.kv_bits}"
            )
        if self.kv_fp8 and self.kv_granularity != PER_TENSOR:
            raise ValueError(f"an FP8 KV cache is per-tensor (kv_granularity {PER_TENSOR!r})")
        if self.stream_heads and len(self.stream_heads) != self.num_layers:
            raise ValueError(
                f"stream_heads lists {len(self.stream_heads)} layers, the model has "
                f"{self.num_layers}"
            )

    def num_stream_heads(self, layer: int) -> int:
        return len(self.stream_heads[layer]) if self.stream_heads else 0

    @property
    def streaming(self) -> bool:
        """Whether the model has streaming heads (and the cache a streaming pool), on this rank
        or, under tensor parallelism, another: every rank keeps the pool's bookkeeping."""
        return bool(self.stream_heads)

    @property
    def bytes_per_row(self) -> int:
        """One (token, KV head) row: its values, plus an fp16 scale and zero per row when quantized
        per token (none with per-tensor scales)."""
        if self.kv_bits is None:
            return self.head_dim * self.dtype.itemsize
        if self.kv_granularity == PER_TENSOR:
            return self.head_dim
        return packed_dim(self.head_dim, self.kv_bits) + 2 * torch.float16.itemsize

    @property
    def bytes_per_page(self) -> int:
        """K and V of one dense page across all layers (their dense heads), and its key
        statistics where they are kept."""
        stream = sum(map(len, self.stream_heads))
        dense = self.num_layers * self.num_kv_heads - stream
        stats = 0
        if self.stat_tokens is not None:
            stats = self.page_size // self.stat_tokens * 2 * self.head_dim * self.dtype.itemsize
        return self.page_size * dense * (2 * self.bytes_per_row) + dense * stats

    @property
    def bytes_per_stream_page(self) -> int:
        """K and V of one streaming page across all layers (their streaming heads)."""
        return 2 * self.page_size * sum(map(len, self.stream_heads)) * self.bytes_per_row


@dataclass(frozen=True, slots=True)
class StreamPool:
    """The streaming pool's size and its tables' layout."""

    num_pages: int
    """Streaming pages, including the null page 0."""
    table: StreamTable


class DenseRows:
    """Cache rows stored in the compute dtype."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def store(self, index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.data[index] = x
        return x

    def read(self, index: torch.Tensor) -> torch.Tensor:
        return self.data[index]

    def kernel_operands(self) -> tuple[torch.Tensor, None]:
        return self.data, None


class QuantizedRows:
    """Cache rows stored as `quantize_kv` codes and per-row (scale, zero)."""

    def __init__(
        self, codes: torch.Tensor, params: torch.Tensor, bits: int, dtype: torch.dtype
    ) -> None:
        self.codes, self.params, self.bits, self.dtype = codes, params, bits, dtype

    def store(self, index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        codes, params = quantize_kv(x, self.bits)
        self.codes[index], self.params[index] = codes, params
        return dequantize_kv(codes, params, self.bits, self.dtype)

    def read(self, index: torch.Tensor) -> torch.Tensor:
        return dequantize_kv(self.codes[index], self.params[index], self.bits, self.dtype)

    def kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes, self.params


class StaticInt8Rows:
    """Cache rows stored as `quantize_kv_static` int8 codes under one fixed scale."""

    quantize = staticmethod(quantize_kv_static)
    dequantize = staticmethod(dequantize_kv_static)

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        self.codes, self.scale, self.dtype = codes, scale, dtype

    def store(self, index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        codes = self.quantize(x, self.scale)
        self.codes[index] = codes
        return self.dequantize(codes, self.scale, self.dtype)

    def read(self, index: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.codes[index], self.scale, self.dtype)

    def kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes, self.scale


class StaticFp8Rows(StaticInt8Rows):
    """Cache rows stored as `quantize_kv_fp8` e4m3 codes under one fixed scale."""

    quantize = staticmethod(quantize_kv_fp8)
    dequantize = staticmethod(dequantize_kv_fp8)


class KVCache:
    def __init__(
        self,
        spec: KVCacheSpec,
        num_pages: int,
        max_num_seqs: int,
        max_pages_per_seq: int,
        device: torch.device,
        static_scales: torch.Tensor | None = None,
        stream: StreamPool | None = None,
        selection: tuple[PageSelection, int] | None = None,
    ) -> None:
        """`static_scales`: fp32 [num_layers, 2 (K, V)], required exactly when the spec is
        per-tensor; `stream`: the streaming pool, required exactly when the spec has streaming
        heads; `selection`: page selection and the number of heads that select (KV or query
        heads), required exactly when the spec keeps key statistics."""
        if (static_scales is not None) != (spec.kv_granularity == PER_TENSOR):
            raise ValueError("static_scales must be given exactly for a per-tensor KV cache")
        if static_scales is not None and tuple(static_scales.shape) != (spec.num_layers, 2):
            raise ValueError(
                f"static_scales must be [{spec.num_layers}, 2], got {list(static_scales.shape)}"
            )
        if (stream is not None) != spec.streaming:
            raise ValueError("a streaming pool must be given exactly when some heads stream")
        if (selection is not None) != (spec.stat_tokens is not None):
            raise ValueError("page selection must be given exactly when key statistics are kept")
        if selection is not None and selection[0].logical_tokens != spec.stat_tokens:
            raise ValueError("page selection and key statistics disagree on logical pages")
        self.spec = spec
        self.static_scales = (
            None if static_scales is None else static_scales.to(device, torch.float32)
        )
        self.num_pages = num_pages
        self.page_size = spec.page_size
        self.stream = stream
        self.num_slots = num_pages * spec.page_size
        self.num_stream_slots = 0 if stream is None else stream.num_pages * spec.page_size
        heads = [spec.num_stream_heads(i) for i in range(spec.num_layers)]
        self._layer_rows = [
            (spec.num_kv_heads - s) * self.num_slots + s * self.num_stream_slots for s in heads
        ]
        # One allocation for every layer's K and V (layer-major, then K / V), zero-filled so that
        # no slot ever holds NaN bits (a masked-out NaN key would still poison softmax(QKᵀ)V
        # through 0 * NaN); zero codes with a zero scale dequantize to 0 as well.
        rows = 2 * sum(self._layer_rows)
        self.storage: torch.Tensor
        """[rows, head_dim] values, [rows, packed_dim] uint8 codes, or [rows, head_dim] int8 or
        e4m3 codes (per-tensor); `layer_storage` gives one layer's [2 (K, V), rows, ...] view."""
        self.params: torch.Tensor | None = None
        """[rows, 2 (scale, zero)] fp16 when quantized per token."""
        if spec.kv_bits is None:
            self.storage = torch.zeros(rows, spec.head_dim, dtype=spec.dtype, device=device)
        elif self.static_scales is not None:
            codes = FP8_DTYPE if spec.kv_fp8 else torch.int8
            self.storage = torch.zeros(rows, spec.head_dim, dtype=codes, device=device)
        else:
            width = packed_dim(spec.head_dim, spec.kv_bits)
            self.storage = torch.zeros(rows, width, dtype=torch.uint8, device=device)
            self.params = torch.zeros(rows, 2, dtype=torch.float16, device=device)
        self._head_base = torch.arange(spec.num_kv_heads, device=device) * self.num_slots
        self.page_table = torch.zeros(
            max_num_seqs, max_pages_per_seq, dtype=torch.int32, device=device
        )
        self.stream_table = torch.zeros(
            max_num_seqs,
            0 if stream is None else stream.table.width,
            dtype=torch.int32,
            device=device,
        )
        """int32 [max_num_seqs, table width]: each row's streaming table."""
        self.selection = None if selection is None else selection[0]
        self.key_stats: torch.Tensor | None = None
        """[stat rows, 2 (min, max), head_dim] of every layer (`layer_key_stats`)."""
        self.selected: torch.Tensor | None = None
        """int32 [layers, max_num_seqs + 1, selecting heads, k]: each row's selected columns;
        row max_num_seqs is scratch."""
        if selection is not None:
            page_select, select_heads = selection
            assert spec.stat_tokens is not None
            stat_rows = sum(rows // spec.stat_tokens + 1 for rows in self._layer_rows)
            self.key_stats = torch.zeros(
                stat_rows, 2, spec.head_dim, dtype=spec.dtype, device=device
            )
            self.selected = torch.zeros(
                spec.num_layers,
                max_num_seqs + 1,
                select_heads,
                page_select.k,
                dtype=torch.int32,
                device=device,
            )
        self._device = device

    @property
    def nbytes(self) -> int:
        extra = (t.nbytes for t in (self.params, self.key_stats, self.selected) if t is not None)
        return self.storage.nbytes + sum(extra)

    def layer_key_stats(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s key statistics, [rows // stat_tokens + 1, 2, head_dim] (a view; the
        last row is scratch)."""
        assert self.key_stats is not None and self.spec.stat_tokens is not None
        sizes = [rows // self.spec.stat_tokens + 1 for rows in self._layer_rows]
        start = sum(sizes[:layer])
        return self.key_stats[start : start + sizes[layer]]

    def layer_storage(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s K and V rows, [2, rows, ...] (a view)."""
        return self._layer_view(self.storage, layer)

    def _layer_view(self, storage: torch.Tensor, layer: int) -> torch.Tensor:
        start = 2 * sum(self._layer_rows[:layer])
        rows = self._layer_rows[layer]
        return storage[start : start + 2 * rows].view(2, rows, *storage.shape[1:])

    def bind(self, layers: Sequence[PagedAttention]) -> None:
        """Point each attention layer at its K and V rows and say where its heads are."""
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self._rows(i, 0), self._rows(i, 1)
            layer.heads = self._head_layout(i, layer.num_heads // layer.num_kv_heads)
            if self.selection is not None:
                assert self.selected is not None
                layer.bind_selection(self.selection, self.layer_key_stats(i), self.selected[i])

    def _head_layout(self, layer: int, group: int) -> HeadLayout:
        stream = self.spec.stream_heads[layer] if self.spec.stream_heads else ()
        if not stream:
            return HeadLayout.dense(self._head_base, group)
        is_stream = torch.zeros(self.spec.num_kv_heads, dtype=torch.bool)
        is_stream[list(stream)] = True
        # Dense heads first, in head order, then streaming heads (the module docstring).
        streams_before = torch.cumsum(is_stream, 0) - is_stream.long()
        dense_before = torch.arange(self.spec.num_kv_heads) - streams_before
        num_dense = self.spec.num_kv_heads - len(stream)
        base = torch.where(
            is_stream,
            num_dense * self.num_slots + streams_before * self.num_stream_slots,
            dense_before * self.num_slots,
        )
        return HeadLayout.split(base.to(self._device), is_stream.to(self._device), group)

    def _rows(self, layer: int, kv: int) -> CacheRows:
        data = self.layer_storage(layer)[kv]
        if self.static_scales is not None:
            rows = StaticFp8Rows if self.spec.kv_fp8 else StaticInt8Rows
            return rows(data, self.static_scales[layer, kv], self.spec.dtype)
        if self.params is None:
            return DenseRows(data)
        bits = self.spec.kv_bits
        assert bits is not None
        params = self._layer_view(self.params, layer)[kv]
        return QuantizedRows(data, params, bits, self.spec.dtype)

    def apply_page_updates(self, updates: torch.Tensor, stream: torch.Tensor | None = None) -> None:
        """Write (row, column, page) triples [k, 3] (on the cache's device) into the page table,
        and `stream`'s into the streaming tables."""
        for table, triples in ((self.page_table, updates), (self.stream_table, stream)):
            if triples is not None and triples.shape[0]:
                index = triples[:, :2].long()
                table[index[:, 0], index[:, 1]] = triples[:, 2]

    def slots(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Dense-pool slots (long, broadcast shape) of `positions` in the requests at page-table
        `rows`. The one place that turns positions into dense addresses."""
        pages = self.page_table[rows, positions // self.page_size].long()
        return pages * self.page_size + positions % self.page_size

    def stream_slots(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Streaming-pool slots of `positions` (still in their tables) in the requests at `rows`."""
        assert self.stream is not None
        column = self.stream.table.column(positions // self.page_size)
        return self.stream_page_slots(rows, column) + positions % self.page_size

    def stream_page_slots(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Slot 0 of the streaming pages at table `columns` of the requests at `rows`."""
        return self.stream_table[rows, columns].long() * self.page_size

    def index(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Cache rows (long [kv_heads, *shape]) of `positions` in the requests at page-table `rows`
        (broadcast together to `shape`) for a layer whose heads are all dense."""
        return self.dense_rows(self.slots(rows, positions))

    def dense_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Cache rows (long [kv_heads, *shape]) of dense `slots` in a layer of dense heads."""
        return self._head_base.view(-1, *[1] * slots.dim()) + slots

    def null_rows(self, count: int) -> torch.Tensor:
        """Cache rows (long [kv_heads, count]) of slot 0 of the null page, for `count` tokens:
        where padding tokens write, since no request's page table points there."""
        return self._head_base[:, None].expand(-1, count).clone()
