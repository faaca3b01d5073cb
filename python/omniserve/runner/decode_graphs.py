"""CUDA graphs of the model's forward for decode-only steps, one per padded batch size.

A decode step of a large batch launches thousands of small kernels (per layer: norms, GEMMs,
RoPE and the KV write, attention, activations); replaying them as one graph removes the CPU
launch cost, which otherwise bounds the step. Only the forward is captured: step inputs are built
as for any step, then copied into the graph's static buffers; logits and sampling run eagerly on
the rows that exist.

A step of n requests replays the graph of the smallest captured size B >= n. Rows n..B-1 are
padding: their KV writes go to the null page (`KVCache.null_rows`), which no request reads, and
their other inputs keep whatever valid values the buffers last held (any token id, position and
page-table row is safe to read). The attention kernel's launch is sized for `max_context_len`
(the engine's max_model_len) at capture, so one graph serves every context length. With
streaming heads the graphs also read each token's ring slot and the streaming pages each request
sees (`DecodeBatch.stream_table`, full table width), copied in the same way. With page selection
each size has two graphs, with and without the layers' selection (a step where no request
selects replays the second); both read the requests' views (count, tail) and the first also who
selects and where that goes, padding rows writing their selection to the scratch row. The launch
is then sized for what a view can hold (`PageSelection.max_visible`), not max_model_len.
"""

from __future__ import annotations

import torch
from torch import nn

from omniserve.formats.page_selection import PageSelection
from omniserve.layers.attention import (
    AttentionBatches,
    AttentionMetadata,
    DecodeBatch,
    DecodeSelection,
)
from omniserve.runner.kv_cache import KVCache
from omniserve.runner.step_inputs import StepInputs


def capture_sizes(max_batch: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, then every multiple of 8 up to `max_batch`, and
    `max_batch` itself (a step pads to the next size: at most 7 wasted rows above 8)."""
    sizes = [s for s in (1, 2, 4) if s < max_batch]
    sizes += list(range(8, max_batch, 8))
    return [*sizes, max_batch]


class DecodeGraphs:
    """Captured forwards of `model` over decode-only steps of up to `max_batch` requests."""

    def __init__(
        self,
        model: nn.Module,
        kv_cache: KVCache,
        windows: frozenset[int | None],
        max_batch: int,
        max_context_len: int,
        selection: PageSelection | None = None,
    ) -> None:
        """`max_context_len`: the most positions a decode query attends."""
        device = kv_cache.page_table.device
        self._page_table = kv_cache.page_table
        self.sizes = capture_sizes(max_batch)
        self._input_ids = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self._positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self._null_rows = kv_cache.null_rows(max_batch)
        self._write_index = self._null_rows.clone()
        self._write_slots = torch.zeros(max_batch, dtype=torch.long, device=device)
        self._seq_rows = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self._context_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        # Streaming heads: each token's ring slot, and the pages each request's streaming heads
        # see (padding rows read the null page).
        self._streaming = kv_cache.stream is not None
        width = kv_cache.stream_table.shape[1]
        self._stream_write_slots = torch.zeros(max_batch, dtype=torch.long, device=device)
        self._stream_table = torch.zeros(max_batch, width, dtype=torch.int32, device=device)
        self._stream_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        # Page selection: each request's view, and who selects this step and where to.
        self._selection = selection
        self._select_count = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self._select_tail = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self._select_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self._refresh = torch.zeros(max_batch, dtype=torch.bool, device=device)
        self._select_rows = torch.zeros(max_batch, dtype=torch.long, device=device)
        self._scratch_row = kv_cache.page_table.shape[0]  # the selected lists' last row
        self._write_rows = torch.full((max_batch,), self._scratch_row, device=device)
        self._columns = kv_cache.page_table.shape[1]
        # Every tensor a graph reads must outlive it: a graph replays raw addresses, and memory
        # freed behind it would be handed to other tensors. So the buffers are attributes, and
        # each graph keeps the metadata it was captured with.
        self._token_idx = torch.arange(max_batch, device=device)
        self._graphs: dict[
            tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, AttentionMetadata]
        ] = {}
        pool = torch.cuda.graph_pool_handle()
        # Largest first: the smaller graphs' activations fit in the memory the largest one pooled.
        variants = (False,) if selection is None else (True, False)
        for size, selects in ((s, v) for s in reversed(self.sizes) for v in variants):
            decode = DecodeBatch(
                token_idx=self._token_idx[:size],
                seq_rows=self._seq_rows[:size],
                context_lens=self._context_lens[:size],
                max_context_len=max_context_len,
                page_table=kv_cache.page_table,
                page_size=kv_cache.page_size,
                stream_table=self._stream_table[:size] if self._streaming else None,
                stream_context_lens=self._stream_lens[:size] if self._streaming else None,
                selection=None if selection is None else self._decode_selection(size, selects),
                whole_step=True,
            )
            meta = AttentionMetadata(
                self._write_index[:, :size],
                self._write_slots[:size],
                {w: AttentionBatches([], []) for w in windows},
                decode,
                self._stream_write_slots[:size] if self._streaming else None,
            )
            args = (self._input_ids[:size], self._positions[:size], meta)
            model(*args)  # eager warm-up: one-time work (kernel builds, workspaces) stays outside
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = model(*args)
            self._graphs[size, selects] = (graph, hidden, meta)
        self.max_batch = max_batch

    def _decode_selection(self, size: int, selects: bool) -> DecodeSelection:
        return DecodeSelection(
            rows=self._select_rows[:size],
            count=self._select_count[:size],
            tail=self._select_tail[:size],
            lens=self._select_lens[:size],
            visible=0,  # the torch path's gather size: unused by the kernel
            page_table=self._page_table,
            refresh=self._refresh[:size] if selects else None,
            write_rows=self._write_rows[:size] if selects else None,
            columns=self._columns,
        )

    def fits(self, step: StepInputs) -> bool:
        """Whether `step` is decode-only, on the decode kernel, and no larger than the graphs."""
        batch = step.attn.decode_batch
        n = step.input_ids.shape[0]
        return batch is not None and batch.token_idx.shape[0] == n and n <= self.max_batch

    def run(self, step: StepInputs) -> torch.Tensor:
        """Final hidden states [n, hidden] of a step that `fits`."""
        batch = step.attn.decode_batch
        assert batch is not None
        n = step.input_ids.shape[0]
        size = next(s for s in self.sizes if s >= n)
        self._input_ids[:n].copy_(step.input_ids)
        self._positions[:n].copy_(step.positions)
        self._write_index[:, :n].copy_(step.attn.write_index)
        self._write_index[:, n:size].copy_(self._null_rows[:, n:size])
        self._write_slots[:n].copy_(step.attn.write_slots)
        self._write_slots[n:size].zero_()
        # The graph reads the decodes in token order, whatever order the step lists them in.
        self._seq_rows.index_copy_(0, batch.token_idx, batch.seq_rows)
        self._context_lens.index_copy_(0, batch.token_idx, batch.context_lens)
        if self._streaming:
            assert step.attn.stream_write_slots is not None
            assert batch.stream_table is not None and batch.stream_context_lens is not None
            self._stream_write_slots[:n].copy_(step.attn.stream_write_slots)
            self._stream_write_slots[n:size].zero_()
            self._stream_table.index_copy_(0, batch.token_idx, batch.stream_table)
            self._stream_lens.index_copy_(0, batch.token_idx, batch.stream_context_lens)
        selects = False
        if (sel := batch.selection) is not None:
            self._select_rows.index_copy_(0, batch.token_idx, sel.rows)
            self._select_count.index_copy_(0, batch.token_idx, sel.count)
            self._select_tail.index_copy_(0, batch.token_idx, sel.tail)
            self._select_lens.index_copy_(0, batch.token_idx, sel.lens)
            selects = sel.refresh is not None
            if selects:
                assert sel.refresh is not None and sel.write_rows is not None
                self._refresh[n:size].zero_()
                self._refresh.index_copy_(0, batch.token_idx, sel.refresh)
                self._write_rows[n:size].fill_(self._scratch_row)
                self._write_rows.index_copy_(0, batch.token_idx, sel.write_rows)
        graph, hidden, _ = self._graphs[size, selects]
        graph.replay()
        return hidden[:n]
