"""Attention over the paged KV cache: the torch reference (CPU and GPU).

Each step first writes the step's keys/values (after RoPE) into their cache slots, then computes:
- prefill chunks (requests with more than one new token), one SDPA call per request: a first chunk
  attends causally to its own keys; a later chunk reads all earlier keys of its request from the
  cache, so chunked prefill is exact;
- decode tokens (one new token), batched: their keys are gathered from the cache into a padded
  [g, L] block with a validity mask, one batched attention per group of requests. Padding plus one
  gather is the simplest exact batched form that runs on CPU and GPU with no compilation
  (FlexAttention needs torch.compile to be fast and is GPU-only in practice); groups bound the
  padded block's memory. Where the model's kernel choices (kernels/dispatch.py) take it, the paged
  decode kernel (`kernels/attention.py`) replaces this for every decode request at once
  (`AttentionMetadata.decode_batch`), reading the cache through the page table.

Every query sees keys and values exactly as the cache holds them: dequantized for a KV8/KV4 cache,
whether read from the pages (later chunks, decode) or, for a chunk that starts its request, taken
from what this step just stored (`CacheRows.store` returns it, with no gather). So a request's
outputs do not depend on how the scheduler splits or batches it (chunked prefill, preemption and
recompute, decode), as with a dense cache. Prefill could read the current chunk's unquantized
K/V (QServe prefills on the fp16 qkv buffer); we give that up for this invariance, at the cost of
one quantize-dequantize of the step's own K/V (docs/architecture.md#what-attention-reads).

The model hands each layer its q and k before RoPE (`rotate_and_attend`): where the kernel choices
take it, one kernel (`kernels/rope_kv.py`) rotates q and k and writes K and V to the cache, dense
or quantized, in one launch instead of dozens of small torch ops; elsewhere the reference,
`apply_rotary` then the cache rows' `store`, does it, with bit-identical results.

Streaming heads (LServe static sparsity, `formats/streaming.py`): a layer's KV heads may be split
into dense heads, which see their whole causal context through the dense pool, and streaming
heads, which see only their sink and local pages (the Λ rule) through the streaming pool. Each
kind attends separately (its query heads with its KV heads); prefill reads a streaming head's
earlier chunks from its table *before* the step writes, since the step's own tokens may take
ring slots those chunks still need. `HeadLayout` says where each head's rows are.

Page selection (LServe dynamic sparsity, `formats/page_selection.py`): every K write also folds
the dense heads' keys into the layer's key statistics; a decode request whose selection is
refreshed this step scores its pages with its query and keeps the best `k` columns per selecting
head in the layer's persistent lists; a decode query of a dense head then attends its selected
view (those columns and the pages from the tail on) instead of its whole context.

The runner builds the per-step `AttentionMetadata` (cache slots, masks, groups) once for all
layers; each layer turns slots into its rows with its `HeadLayout`. Cache rows are indexed
[kv_heads, ...]: see `runner/kv_cache.py` for the layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from omniserve.formats import page_selection as ps
from omniserve.formats.kv import CacheRows
from omniserve.formats.page_selection import PageSelection
from omniserve.kernels import page_select, rope_kv
from omniserve.kernels.attention import SelectedPages, StreamingHeads, decode_attention
from omniserve.layers.rotary import apply_rotary
from omniserve.layers.sparse_prefill import StreamPrefill, stream_prefill_attention


@dataclass(frozen=True, slots=True)
class HeadLayout:
    """Where one layer's KV heads live in its cache rows, and which of them stream."""

    base: torch.Tensor
    """long [kv_heads]: the row of slot 0 of each KV head (`runner/kv_cache.py`)."""
    stream: torch.Tensor | None
    """bool [kv_heads]: the streaming heads; None when every head is dense."""
    dense_kv: torch.Tensor
    """long: the dense KV heads."""
    stream_kv: torch.Tensor
    """long: the streaming KV heads."""
    dense_q: torch.Tensor
    """long: the query heads of the dense KV heads (GQA groups)."""
    stream_q: torch.Tensor
    """long: the query heads of the streaming KV heads."""

    @classmethod
    def dense(cls, base: torch.Tensor, group: int) -> HeadLayout:
        none = torch.zeros(base.shape[0], dtype=torch.bool, device=base.device)
        return cls._of(base, none, group, stream=None)

    @classmethod
    def split(cls, base: torch.Tensor, is_stream: torch.Tensor, group: int) -> HeadLayout:
        return cls._of(base, is_stream, group, stream=is_stream)

    @classmethod
    def _of(
        cls, base: torch.Tensor, is_stream: torch.Tensor, group: int, stream: torch.Tensor | None
    ) -> HeadLayout:
        def q_heads(kv: torch.Tensor) -> torch.Tensor:
            return (kv[:, None] * group + torch.arange(group, device=kv.device)).flatten()

        dense_kv, stream_kv = (~is_stream).nonzero().squeeze(1), is_stream.nonzero().squeeze(1)
        return cls(base, stream, dense_kv, stream_kv, q_heads(dense_kv), q_heads(stream_kv))

    def rows(self, slots: torch.Tensor, stream_slots: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [kv_heads, *shape] of each head at dense `slots` or, for streaming heads, at
        `stream_slots` (same shape)."""
        base = self.base.view(-1, *[1] * slots.dim())
        if self.stream is None:
            return base + slots
        assert stream_slots is not None
        stream = self.stream.view(-1, *[1] * slots.dim())
        return base + torch.where(stream, stream_slots, slots)

    def dense_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Rows [dense heads, *shape] of the dense heads at `slots`."""
        return self.base[self.dense_kv].view(-1, *[1] * slots.dim()) + slots

    def stream_rows(self, stream_slots: torch.Tensor) -> torch.Tensor:
        """Rows [streaming heads, *shape] of the streaming heads at `stream_slots`."""
        return self.base[self.stream_kv].view(-1, *[1] * stream_slots.dim()) + stream_slots


@dataclass(frozen=True, slots=True)
class SelectHeads:
    """The heads of one layer that select pages, and the query heads each scores with."""

    index: torch.Tensor
    """long [S]: each one's place in the layer's selected lists (a KV head, or a query head)."""
    kv: torch.Tensor
    """long [S]: the KV head whose pages it selects."""
    q0: torch.Tensor
    """long [S]: its first query head; it scores with `group` consecutive ones."""
    group: int

    @classmethod
    def of(cls, heads: HeadLayout, group: int, per_query_head: bool) -> SelectHeads:
        """The dense heads: each KV head for its GQA group, or each query head alone."""
        if per_query_head:
            return cls(heads.dense_q, heads.dense_q // group, heads.dense_q, 1)
        return cls(heads.dense_kv, heads.dense_kv, heads.dense_kv * group, group)


@dataclass(frozen=True, slots=True)
class DecodeSelection:
    """The selected views of a set of decode requests (`formats/page_selection.py`), in the
    order of the `DecodeBatch` or `DecodeGroup` that holds it."""

    rows: torch.Tensor
    """long [g]: each request's page-table row (and row of the selected lists)."""
    count: torch.Tensor
    """int32 [g]: selected columns in its view (0: dense)."""
    tail: torch.Tensor
    """int32 [g]: the first column it sees from there on (0: dense)."""
    lens: torch.Tensor
    """int32 [g]: positions each one attends in its view (`page_selection.visible_len`)."""
    visible: int
    """The most positions one of them attends (sizes the torch path's gather)."""
    page_table: torch.Tensor
    """int32 [max_num_seqs, max_pages]: the cache's persistent page table."""
    refresh: torch.Tensor | None = None
    """bool [g]: the requests that select this step (before attending); None when none do."""
    write_rows: torch.Tensor | None = None
    """long [g]: where each request's new selection goes: its row where it refreshes, else the
    selected lists' scratch row; set with `refresh`."""
    columns: int = 0
    """Page-table columns scored per request (>= every refreshing request's tail); set with
    `refresh`."""


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Queries [start, end) of the step's tokens, all of one request."""

    start: int
    end: int
    kv_slots: torch.Tensor | None
    """long [L]: dense-pool slots of the keys the chunk sees, oldest first; None when the chunk
    starts the request (its keys are exactly its own tokens, no cache read needed)."""
    mask: torch.Tensor | None
    """bool [end - start, L]: key visible to query; None means plain causal, aligned so that the
    last query sees the last key (the sliding window cuts nothing)."""
    stream: StreamPrefill | None = None
    """What the chunk's streaming heads see; None without streaming heads."""


@dataclass(frozen=True, slots=True)
class DecodeGroup:
    """Requests with one new token each, attended together."""

    token_idx: torch.Tensor
    """long [g]: index of each request's token in the step."""
    slots: torch.Tensor | None
    """long [g, L]: dense-pool slots of each request's visible keys, padded with a valid slot;
    None with page selection (`selection` says what the dense heads see)."""
    mask: torch.Tensor | None
    """bool [g, L]: False on padding; None with page selection."""
    stream_slots: torch.Tensor | None = None
    """long [g, Ls]: streaming-pool slots of what each request's streaming heads see, padded;
    None without streaming heads."""
    stream_mask: torch.Tensor | None = None
    """bool [g, Ls]: False on padding."""
    selection: DecodeSelection | None = None
    """The dense heads' selected views, with page selection on."""


@dataclass(frozen=True, slots=True)
class AttentionBatches:
    prefills: list[PrefillChunk]
    decodes: list[DecodeGroup]


@dataclass(frozen=True, slots=True)
class DecodeBatch:
    """All decode requests of a step, as the paged decode kernel reads them (every layer and
    window shares it): the cache's page table addressed by request rows and context lengths."""

    token_idx: torch.Tensor
    """long [g]: index of each request's token in the step."""
    seq_rows: torch.Tensor
    """int32 [g]: each request's page-table row."""
    context_lens: torch.Tensor
    """int32 [g]: tokens each request attends (its new token included)."""
    max_context_len: int
    page_table: torch.Tensor
    """int32 [max_num_seqs, max_pages]: the cache's persistent page table."""
    page_size: int
    stream_table: torch.Tensor | None = None
    """int32 [g, W]: per request, the streaming pages its streaming heads see, oldest first
    (`StreamTable.visible_pages` through its table); None without streaming heads."""
    stream_context_lens: torch.Tensor | None = None
    """int32 [g]: tokens on those pages (the last page ends at the request's new token)."""
    selection: DecodeSelection | None = None
    """The dense heads' selected views, with page selection on."""
    whole_step: bool = False
    """Whether token_idx is every token of the step in order (a decode-only step): the kernel
    then reads q and its output is the step's, with no gather or scatter."""


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    write_index: torch.Tensor
    """long [kv_heads, T]: cache rows each token's key/value heads are written to, in a layer
    whose heads are all dense."""
    write_slots: torch.Tensor
    """long [T]: each token's dense-pool slot (the null page's slot 0 for padding)."""
    by_window: dict[int | None, AttentionBatches]
    """The attention work for each sliding window size used by the model (None: full attention)."""
    decode_batch: DecodeBatch | None = None
    """Set when the runner runs decode with the CUDA kernel; `by_window` then has no decode
    groups."""
    stream_write_slots: torch.Tensor | None = None
    """long [T]: each token's streaming-pool slot, the null page's slot 0 for padding and for
    tokens a later token of the step overwrites (`StreamTable.survives`); None without
    streaming heads."""

    def write_rows(self, heads: HeadLayout) -> torch.Tensor:
        """Rows [kv_heads, T] the step's keys/values are written to in a layer laid out as
        `heads`."""
        if heads.stream is None:
            return self.write_index
        return heads.rows(self.write_slots, self.stream_write_slots)


class PagedAttention(nn.Module):
    """Multi-head attention (MHA or GQA) of one layer reading and writing that layer's pages.

    `k_cache`/`v_cache` are the layer's K and V cache rows and `heads` where each KV head's rows
    are, bound by the runner's KV cache after allocation. `fused_rope_kv`: RoPE and the K/V write
    run as the fused kernel (`rotate_and_attend`), as kernels/dispatch.py chose for the model;
    the decode kernel runs where the step's metadata carries a `DecodeBatch`, which the runner
    builds on its choice.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        sliding_window: int | None,
        *,
        fused_rope_kv: bool,
    ) -> None:
        super().__init__()
        self.fused_rope_kv = fused_rope_kv
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self._group = num_heads // num_kv_heads
        self.sliding_window = sliding_window
        self.k_cache: CacheRows
        self.v_cache: CacheRows
        self.heads: HeadLayout
        self.selection: PageSelection | None = None
        self.key_stats: torch.Tensor
        self.selected: torch.Tensor
        self.select_heads: SelectHeads
        self._per_query_heads: tuple[int, torch.Tensor, torch.Tensor | None]
        """(heads, base rows, streaming) of a per-query-head decode launch."""
        self._stat_heads: torch.Tensor
        """bool [kv_heads]: the heads that keep key statistics (the dense ones)."""

    def bind_selection(
        self, selection: PageSelection, key_stats: torch.Tensor, selected: torch.Tensor
    ) -> None:
        """Turn on page selection with the layer's key statistics and selected lists
        (`runner/kv_cache.py` binds them, after `heads`)."""
        self.selection, self.key_stats, self.selected = selection, key_stats, selected
        self.select_heads = SelectHeads.of(self.heads, self._group, selection.per_query_head)
        stream = self.heads.stream
        self._stat_heads = (
            torch.ones(self.num_kv_heads, dtype=torch.bool, device=key_stats.device)
            if stream is None
            else ~stream
        )
        self._per_query_heads = (
            self.num_heads,
            self.heads.base.repeat_interleave(self._group),
            None if stream is None else stream.repeat_interleave(self._group),
        )

    def rotate_and_attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Attention of q [T, heads, head_dim] and k [T, kv_heads, head_dim] before RoPE, with the
        step's (cos, sin) = `rope` (`RotaryEmbedding.forward`), and v -> [T, heads, head_dim].

        With `fused_rope_kv` the kernel rotates q and k and stores K and V in one launch (and,
        in a step of decodes only, folds the keys into the page-selection statistics);
        otherwise `apply_rotary` and `forward`'s store do. Either way `forward` (and any hook on
        it) receives the rotated q and k."""
        if self.fused_rope_kv:
            past = self._stream_past(meta)
            rows = meta.write_rows(self.heads)
            stats = None
            if self.selection is not None and not meta.by_window[self.sliding_window].prefills:
                stats = rope_kv.KeyStats(
                    self.key_stats, self._stat_heads, self.selection.logical_tokens
                )
            q, k, v = rope_kv.rope_kv_write(q, k, v, rope, rows, self.k_cache, self.v_cache, stats)
            return self(
                q, k, v, meta, stored=True, stream_past=past, rows=rows, folded=stats is not None
            )
        return self(apply_rotary(q, *rope), apply_rotary(k, *rope), v, meta)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        *,
        stored: bool = False,
        stream_past: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
        rows: torch.Tensor | None = None,
        folded: bool = False,
    ) -> torch.Tensor:
        """q [T, heads, head_dim], k/v [T, kv_heads, head_dim], after RoPE -> [T, heads, head_dim].

        k and v are first written to the cache, unless `stored`: the caller already wrote them and
        passes them as reads of the cache return them (`rotate_and_attend`'s fused kernel), with
        what the streaming heads' prefill chunks read of earlier chunks before that write
        (`stream_past`), the rows it wrote (`rows`) and whether it also folded the keys into the
        statistics (`folded`)."""
        if rows is None:
            rows = meta.write_rows(self.heads)
        if not stored:
            stream_past = self._stream_past(meta)
            k = self.k_cache.store(rows, k.transpose(0, 1)).transpose(0, 1)
            v = self.v_cache.store(rows, v.transpose(0, 1)).transpose(0, 1)
        if self.selection is not None and not folded:
            self._fold_key_stats(rows, k)
        batch = meta.decode_batch
        if batch is not None and batch.whole_step:
            return self._decode_kernel(q, batch)
        batches = meta.by_window[self.sliding_window]
        out = torch.empty_like(q)
        for i, chunk in enumerate(batches.prefills):
            past = None if stream_past is None else stream_past[i]
            out[chunk.start : chunk.end] = self._prefill(q, k, v, chunk, past)
        for group in batches.decodes:
            if group.selection is not None:
                self._select(q[group.token_idx], group.selection, None)
            out[group.token_idx] = self._decode(q, group)
        if batch is not None:
            out[batch.token_idx] = self._decode_kernel(q[batch.token_idx], batch)
        return out

    def _fold_key_stats(self, rows: torch.Tensor, k: torch.Tensor) -> None:
        """Fold the step's keys k [T, kv_heads, head_dim] (as the cache holds them), written at
        `rows` [kv_heads, T], into the dense heads' statistics."""
        assert self.selection is not None
        dense = self.heads.dense_kv
        keys = k[:, dense].transpose(0, 1)
        ps.update_key_stats(self.key_stats, rows[dense], keys, self.selection.logical_tokens)

    def _select(self, q: torch.Tensor, sel: DecodeSelection, seq_rows: torch.Tensor | None) -> None:
        """Refresh the selected lists of the requests that select this step, from their queries
        q [g, heads, head_dim]; `seq_rows` (int32 [g], the kernel batch's) runs the scoring
        kernel, None the torch reference."""
        if sel.refresh is None:
            return
        assert self.selection is not None and sel.write_rows is not None
        heads, sh, size = self.heads, self.select_heads, self.selection.page_size
        if seq_rows is not None:
            scores = torch.empty(
                q.shape[0], sh.index.shape[0], sel.columns, dtype=torch.float32, device=q.device
            )
            page_select.page_scores(
                q,
                self.key_stats,
                heads.base,
                sh.kv,
                sh.q0,
                sel.page_table,
                seq_rows,
                sel.tail,
                scores,
                group=sh.group,
                page_size=size,
                logical_tokens=self.selection.logical_tokens,
            )
        else:
            pages = sel.page_table[sel.rows, : sel.columns].long()
            stat_rows = ps.page_stat_rows(
                heads.base[sh.kv], pages, size, self.selection.logical_tokens
            ).permute(0, 2, 1)
            q_heads = sh.q0[:, None] + torch.arange(sh.group, device=q.device)
            scores = ps.page_scores(
                q[:, q_heads], self.key_stats, stat_rows, sel.tail, self.selection.logical_per_page
            )
        top = ps.top_pages(scores, self.selection.k)
        self.selected[sel.write_rows[:, None], sh.index] = top

    def _selected_rows(self, sel: DecodeSelection) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache rows [selecting heads, g, W] of the selected views and their validity [g, W]
        (W = `sel.visible`), for the torch path."""
        assert self.selection is not None
        sh, size, width = self.select_heads, self.selection.page_size, sel.visible
        lists = self.selected[sel.rows][:, sh.index]
        columns = ps.selected_columns(lists, sel.count, sel.tail, -(-width // size))
        u = torch.arange(width, device=columns.device)
        # Past a request's view the columns run on; clamped, they stay addressable and masked.
        column = columns[..., u // size].clamp_max(sel.page_table.shape[1] - 1)
        pages = sel.page_table[sel.rows[:, None, None], column].long()
        # Head-major and contiguous, as the dense path's rows: the gathered K/V batches then have
        # the same layout, so their matmuls round the same way (a dense view is bit-equal).
        slots = (pages * size + u % size).transpose(0, 1).contiguous()
        rows = self.heads.base[sh.kv].view(-1, 1, 1) + slots
        return rows, u < sel.lens[:, None]

    def _stream_past(
        self, meta: AttentionMetadata
    ) -> list[tuple[torch.Tensor, torch.Tensor] | None] | None:
        """Per prefill chunk, the K and V [stream heads, Lp, head_dim] its streaming heads read of
        the request's earlier chunks (None where there are none). Read before the step writes:
        its tokens may take ring slots that those chunks' queries still see."""
        if self.heads.stream is None:
            return None
        past: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for chunk in meta.by_window[self.sliding_window].prefills:
            if chunk.stream is None or chunk.stream.past_slots is None:
                past.append(None)
                continue
            rows = self.heads.stream_rows(chunk.stream.past_slots)
            past.append((self.k_cache.read(rows), self.v_cache.read(rows)))
        return past

    def _decode_kernel(self, q: torch.Tensor, batch: DecodeBatch) -> torch.Tensor:
        """The decode batch's output [g, heads, head_dim] from its queries q (the same), after
        refreshing the selected lists of the requests that select."""
        if batch.selection is not None:
            self._select(q, batch.selection, batch.seq_rows)
        num_kv, base, is_stream = self.num_kv_heads, self.heads.base, self.heads.stream
        if batch.selection is not None and self.select_heads.group == 1 < self._group:
            # Per query head: launched "as MHA", each query head a KV head of its own.
            num_kv, base, is_stream = self._per_query_heads
        streaming = selected = head_base = None
        if is_stream is not None:
            assert batch.stream_table is not None and batch.stream_context_lens is not None
            streaming = StreamingHeads(
                base, is_stream, batch.stream_table, batch.stream_context_lens
            )
        if (sel := batch.selection) is not None:
            selected = SelectedPages(self.selected, sel.count, sel.tail)
            head_base = base if streaming is None else None
        return decode_attention(
            q,
            self.k_cache.kernel_operands(),
            self.v_cache.kernel_operands(),
            batch.page_table,
            batch.seq_rows,
            batch.context_lens,
            page_size=batch.page_size,
            num_kv_heads=num_kv,
            max_context_len=batch.max_context_len,
            scale=self.scale,
            window=self.sliding_window,
            streaming=streaming,
            selected=selected,
            head_base=head_base,
        )

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        chunk: PrefillChunk,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        heads, own = self.heads, slice(chunk.start, chunk.end)
        q, k, v = q[own], k[own], v[own]
        if heads.stream is None:
            return self._dense_prefill(q, k, v, chunk, heads.rows)
        out = torch.empty_like(q)
        if heads.dense_kv.numel():
            dq, dk, dv = q[:, heads.dense_q], k[:, heads.dense_kv], v[:, heads.dense_kv]
            out[:, heads.dense_q] = self._dense_prefill(dq, dk, dv, chunk, heads.dense_rows)
        assert chunk.stream is not None
        sk, sv = k[:, heads.stream_kv].transpose(0, 1), v[:, heads.stream_kv].transpose(0, 1)
        if past is not None:
            sk, sv = torch.cat([past[0], sk], 1), torch.cat([past[1], sv], 1)
        sq = q[:, heads.stream_q].transpose(0, 1)
        o = stream_prefill_attention(sq, sk, sv, chunk.stream, self.scale)
        out[:, heads.stream_q] = o.transpose(0, 1)
        return out

    def _dense_prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        chunk: PrefillChunk,
        rows_of: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Causal attention of the chunk's queries q [n, h, d] over its own keys k/v [n, kv_h, d]
        or, for a later chunk, over the cache rows `rows_of(slots)` of all its keys."""
        # SDPA wants [batch, heads, seq, dim]; the batch is this one request.
        qc = q.transpose(0, 1).unsqueeze(0)
        if chunk.kv_slots is None:
            kc, vc = k.transpose(0, 1), v.transpose(0, 1)
        else:
            rows = rows_of(chunk.kv_slots)
            kc, vc = self.k_cache.read(rows), self.v_cache.read(rows)
        kc, vc = kc.unsqueeze(0), vc.unsqueeze(0)
        if chunk.mask is not None:
            mask: torch.Tensor | None = chunk.mask
        elif chunk.kv_slots is None:
            mask = None  # is_causal: flash-attention eligible
        else:
            # Causal with the queries at the end of the keys; kernels take it without a dense mask.
            mask = causal_lower_right(qc.shape[2], kc.shape[2])
        o = F.scaled_dot_product_attention(
            qc,
            kc,
            vc,
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
            enable_gqa=qc.shape[1] != kc.shape[1],
        )
        return o[0].transpose(0, 1)

    def _decode(self, q: torch.Tensor, group: DecodeGroup) -> torch.Tensor:
        heads = self.heads
        if heads.stream is None and group.selection is None:
            assert group.slots is not None and group.mask is not None
            return self._decode_heads(q[group.token_idx], heads.rows(group.slots, None), group.mask)
        qg = q[group.token_idx]
        out = torch.empty_like(qg)
        if heads.dense_kv.numel():
            if group.selection is None:
                assert group.slots is not None and group.mask is not None
                rows, mask = heads.dense_rows(group.slots), group.mask
            else:
                rows, mask = self._selected_rows(group.selection)
            out[:, heads.dense_q] = self._decode_heads(qg[:, heads.dense_q], rows, mask)
        if heads.stream is None:
            return out
        assert group.stream_slots is not None and group.stream_mask is not None
        rows = heads.stream_rows(group.stream_slots)
        out[:, heads.stream_q] = self._decode_heads(qg[:, heads.stream_q], rows, group.stream_mask)
        return out

    def _decode_heads(
        self, q: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """One query per request, q [g, h, d], over the cache rows [kv_h, g, L] of its keys."""
        # Two batched matmuls, KV-head-major. The query heads that share a KV head are stacked
        # against it, so each gathered key/value is read once (SDPA's masked paths would copy
        # K/V per query head); the gather lands directly in contiguous [kv_heads, g, L, dim]
        # batches.
        g, num_kv = q.shape[0], rows.shape[0]
        qg = q.view(g, num_kv, q.shape[1] // num_kv, self.head_dim)
        kg = self.k_cache.read(rows)  # [kv_heads, g, L, dim]
        vg = self.v_cache.read(rows)
        scores = (qg.transpose(0, 1) @ kg.transpose(2, 3)).float() * self.scale
        scores.masked_fill_(~mask[None, :, None, :], float("-inf"))  # [kv_heads, g, group, L]
        out = scores.softmax(-1).to(vg.dtype) @ vg  # [kv_heads, g, group, dim]
        return out.transpose(0, 1).reshape(g, q.shape[1], self.head_dim)
