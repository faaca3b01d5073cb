"""Turns a `StepPlan` (int32 CPU tensors) into the device tensors one forward pass needs.

Per step, everything the device needs from the plan is packed into one persistent (pinned, on
CUDA) host buffer and sent with one copy into a persistent device buffer; positions, cache rows
and masks are then computed on the device from those views, with no per-token Python work. The
host side only looks at per-request counts (n numbers) to decide the shape of the work: which
requests prefill, and how decode requests are grouped.

With streaming heads (`StreamInputs`), the builder also addresses the streaming pool: each token's
ring slot (null when a later token of the step takes it), what each prefill chunk's streaming
heads read of earlier chunks and their Λ mask (`layers/sparse_prefill.py`), and the pages each
decode request's streaming heads see (`StreamTable.visible_pages`). A query takes the prefill
window while it is inside its request's prompt and the decode window after it.

With async scheduling a decode's input id may be a placeholder, `-(row + 1)`: the token its row
sampled in the step still in flight, which the builder keeps on the device (`record_sampled`)
and substitutes there, so the step never waits for the host to see that token.

With page selection (`formats/page_selection.py`) the builder keeps each row's current view
(selected count and tail) on the host: a prefill chunk makes it dense, a decode step flagged
FLAG_RESELECT replaces it by the view of its `select_pages` columns (and selects on the device,
in each layer, where that view is sparse); other steps reuse it. Decodes are then ordered and
grouped by the positions their views hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from omniserve.formats.page_selection import PageSelection, visible_len
from omniserve.formats.streaming import StreamTable
from omniserve.layers.attention import (
    AttentionBatches,
    AttentionMetadata,
    DecodeBatch,
    DecodeGroup,
    DecodeSelection,
    PrefillChunk,
)
from omniserve.layers.sparse_prefill import (
    BLOCK,
    StreamPrefill,
    StreamWindows,
    block_mask,
    dense_mask,
)
from omniserve.runner.kv_cache import KVCache
from omniserve.runner.step_plan import FLAG_NEEDS_LOGITS, FLAG_PREFILL, FLAG_RESELECT, StepPlan


@dataclass(frozen=True, slots=True)
class StreamInputs:
    """What the builder needs to address streaming heads."""

    windows: StreamWindows
    table: StreamTable
    prompt_lens: torch.Tensor
    """int32 CPU [max_num_seqs]: the prompt length of the request in each row (the runner keeps
    it as rows are bound)."""
    prefill: Literal["dense", "flex"]
    """How streaming heads' prefill masks are built (`layers/sparse_prefill.py`)."""


@dataclass(frozen=True, slots=True)
class StepInputs:
    input_ids: torch.Tensor
    """int32 [T] on the device."""
    positions: torch.Tensor
    """long [T] on the device."""
    attn: AttentionMetadata
    sampled_idx: torch.Tensor
    """long [k] on the CPU: requests (indices into the plan) whose last token is sampled."""
    sampled_rows: torch.Tensor
    """long [k] on the device: their rows."""
    logits_idx: torch.Tensor
    """long [k] on the device: the step token whose logits each of them samples from."""


class StepInputBuilder:
    def __init__(
        self,
        kv_cache: KVCache,
        windows: frozenset[int | None],
        max_num_seqs: int,
        max_num_batched_tokens: int,
        gather_budget: int,
        device: torch.device,
        decode_kernel: bool = False,
        stream: StreamInputs | None = None,
        selection: PageSelection | None = None,
    ) -> None:
        """`windows`: the sliding windows of the model's layers (None: full attention);
        `gather_budget`: most tokens one decode group gathers (its padded [g, L] size);
        `decode_kernel`: describe decodes as one `DecodeBatch` for the CUDA kernel (page table and
        lengths) instead of gathered decode groups; `stream`: the model's streaming heads, if
        any; `selection`: page selection at decode, if on."""
        self.kv_cache = kv_cache
        self.selection = selection
        self.max_num_seqs = max_num_seqs
        # Each row's current view (formats/page_selection.py), dense until its first selection.
        self._select_count = torch.zeros(max_num_seqs, dtype=torch.int32)
        self._select_tail = torch.zeros(max_num_seqs, dtype=torch.int32)
        self.decode_kernel = decode_kernel
        self.stream = stream
        self.windows = windows
        self.gather_budget = gather_budget
        self.device = device
        # Layout: input_ids [T], rows, pos0, num_new [n each], qstart [n+1], decode order [<= n],
        # sampled requests [<= n], page updates [3 per page at most], streaming table updates
        # [3 per streaming page at most], prompt lengths [n], selected views (count, tail, visible
        # positions, refresh, write row) [5 per decode].
        num_stream_pages = 0 if kv_cache.stream is None else kv_cache.stream.num_pages
        capacity = (
            max_num_batched_tokens
            + 12 * max_num_seqs
            + 1
            + 3 * (kv_cache.num_pages + num_stream_pages)
        )
        self._host = torch.empty(capacity, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._dev = torch.empty(capacity, dtype=torch.int32, device=device)
        # The copy out of the pinned buffer is asynchronous: the next step may refill the buffer
        # only once it is done (a step that samples nothing never synchronises on its own).
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        # The token each row sampled last, where the device made it: a placeholder input id
        # -(row + 1) (async scheduling) stands for it, so the step that uses it need not wait for
        # the host to see it.
        self._last_sampled = torch.zeros(max_num_seqs, dtype=torch.int32, device=device)

    def record_sampled(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Keep the tokens just sampled for `rows` (`StepInputs.sampled_rows`) for the
        placeholders of later steps."""
        self._last_sampled[rows] = tokens.to(self.device, torch.int32)

    def build(self, plan: StepPlan) -> StepInputs:
        """Also applies the plan's page updates to the page table (cache rows depend on them)."""
        n, num_tokens = plan.num_reqs, plan.num_tokens
        ctx = plan.pos0 + plan.num_new
        decode = (plan.num_new == 1).nonzero().squeeze(1)
        select = None if self.selection is None else self._select_views(plan, ctx)
        attended = ctx if select is None else select[2]
        # The kernel takes decodes in token order (a decode-only step then reads q and writes the
        # output in place); the torch path's groups, most positions first, pad their requests to
        # similar lengths.
        order = (
            decode
            if self.decode_kernel
            else decode[torch.argsort(attended[decode], descending=True, stable=True)]
        )
        sampled_idx = ((plan.flags & FLAG_NEEDS_LOGITS) != 0).nonzero().squeeze(1)
        prompt_lens = None if self.stream is None else self.stream.prompt_lens[plan.rows.long()]
        # The decodes' views, in decode order (host; the device copy is the buffer's last parts).
        select_host = None if select is None else [v[order] for v in select]

        parts = [
            plan.input_ids,
            plan.rows,
            plan.pos0,
            plan.num_new,
            plan.qstart,
            order.int(),
            sampled_idx.int(),
            plan.page_updates.flatten(),
            plan.stream_updates.flatten(),
            *([] if prompt_lens is None else [prompt_lens]),
            *(select_host or []),
        ]
        sizes = [p.numel() for p in parts]
        total = sum(sizes)
        if self._copied is not None:
            self._copied.synchronize()
        torch.cat(parts, out=self._host[:total])
        self._dev[:total].copy_(self._host[:total], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        views = self._dev[:total].split(sizes)
        input_ids, updates = views[0], views[7]
        if bool((plan.input_ids < 0).any()):
            input_ids = torch.where(
                input_ids < 0, self._last_sampled[(-1 - input_ids).clamp_min(0)], input_ids
            )
        rows, pos0, num_new, qstart, order_d, sampled_d = (v.long() for v in views[1:7])
        self.kv_cache.apply_page_updates(updates.view(-1, 3), views[8].view(-1, 3))

        arange_t = torch.arange(num_tokens, device=self.device)
        req_of_token = torch.repeat_interleave(
            torch.arange(n, device=self.device), num_new, output_size=num_tokens
        )
        positions = pos0[req_of_token] + arange_t - qstart[req_of_token]
        write_slots = self.kv_cache.slots(rows[req_of_token], positions)
        stream_write_slots = stream_pages = None
        if self.stream is not None:
            assert prompt_lens is not None
            last = (pos0 + num_new - 1)[req_of_token]
            keep = self.stream.table.survives(positions, last)
            ring = self.kv_cache.stream_slots(rows[req_of_token], positions)
            stream_write_slots = torch.where(keep, ring, 0)
            if len(order):
                # The longest list of visible pages sizes the gather; counted on the host.
                host_count = self._stream_pages(plan.pos0[order].long(), prompt_lens[order])[1]
                pages, count = self._stream_pages(pos0[order_d], views[9].long()[order_d])
                stream_pages = (pages, count, int(host_count.max()))

        # (request index, pos0, num_new, first token, prompt length) of each prefill chunk.
        prefill = (plan.num_new > 1).nonzero().squeeze(1)
        prefill_reqs = list(
            zip(
                prefill.tolist(),
                plan.pos0[prefill].tolist(),
                plan.num_new[prefill].tolist(),
                plan.qstart[prefill].tolist(),
                [0] * len(prefill) if prompt_lens is None else prompt_lens[prefill].tolist(),
            )
        )
        # Per decode, the positions its dense heads attend (its view's, with page selection).
        decode_ctx = attended[order].tolist()
        select_order = None
        if select_host is not None:
            select_order = (select_host, list(views[-len(select_host) :]))
        decode_batch = None
        if self.decode_kernel and decode_ctx:
            # int32 views straight from the step buffer: the kernel reads them as they are.
            stream_table = stream_lens = None
            if stream_pages is not None:
                stream_table, stream_lens = self._stream_decode(
                    rows[order_d], pos0[order_d], *stream_pages[:2]
                )
            selection, max_len = None, max(decode_ctx)
            if select_order is not None:
                selection = self._decode_selection(*select_order, rows[order_d], 0, len(order))
                if stream_pages is not None:  # streaming heads may see more than dense ones
                    max_len = max(max_len, stream_pages[2] * self.kv_cache.page_size)
            decode_batch = DecodeBatch(
                token_idx=qstart[order_d],
                seq_rows=views[1][order_d],
                context_lens=views[2][order_d] + 1,
                max_context_len=max_len,
                page_table=self.kv_cache.page_table,
                page_size=self.kv_cache.page_size,
                stream_table=stream_table,
                stream_context_lens=stream_lens,
                selection=selection,
                whole_step=len(decode_ctx) == num_tokens,
            )
        by_window = {
            w: AttentionBatches(
                self._prefills(prefill_reqs, rows, w),
                []
                if self.decode_kernel
                else self._decode_groups(
                    decode_ctx, order_d, rows, pos0, qstart, w, stream_pages, select_order
                ),
            )
            for w in self.windows
        }
        write_index = self.kv_cache.dense_rows(write_slots)
        return StepInputs(
            input_ids=input_ids,
            positions=positions,
            attn=AttentionMetadata(
                write_index, write_slots, by_window, decode_batch, stream_write_slots
            ),
            sampled_idx=sampled_idx,
            sampled_rows=rows[sampled_d],
            logits_idx=qstart[1:][sampled_d] - 1,
        )

    def _select_views(self, plan: StepPlan, ctx: torch.Tensor) -> list[torch.Tensor]:
        """Per request of the plan (int32 CPU [n] each): its view's selected count and tail, the
        positions it attends, whether it selects this step, and where its selection goes (its
        row, else the selected lists' scratch row). Updates the rows' views."""
        assert self.selection is not None
        rows = plan.rows.long()
        prefill = (plan.flags & FLAG_PREFILL) != 0
        reselect = (plan.flags & FLAG_RESELECT) != 0
        fresh_count, fresh_tail = self.selection.view(plan.select_pages)
        keep_count = torch.where(prefill, 0, self._select_count[rows])
        keep_tail = torch.where(prefill, 0, self._select_tail[rows])
        count = torch.where(reselect, fresh_count, keep_count).int()
        tail = torch.where(reselect, fresh_tail, keep_tail).int()
        self._select_count[rows], self._select_tail[rows] = count, tail
        refresh = reselect & (count > 0)
        lens = visible_len(ctx, count, tail, self.kv_cache.page_size).int()
        write_rows = torch.where(refresh, plan.rows, self.max_num_seqs).int()
        return [count, tail, lens, refresh.int(), write_rows]

    def _decode_selection(
        self,
        host: list[torch.Tensor],
        dev: list[torch.Tensor],
        rows: torch.Tensor,
        start: int,
        end: int,
    ) -> DecodeSelection:
        """The `DecodeSelection` of decodes [start, end) of those whose `_select_views` are
        `host` (CPU) and `dev` (the same on the device), in decode order; `rows`: their page-table
        rows."""
        host = [v[start:end] for v in host]
        count, tail, lens, refresh, write_rows = (v[start:end] for v in dev)
        rows = rows[start:end]
        refreshing = host[3].bool()
        selects = bool(refreshing.any())
        return DecodeSelection(
            rows=rows,
            count=count,
            tail=tail,
            lens=lens,
            visible=int(host[2].max()),
            page_table=self.kv_cache.page_table,
            refresh=refresh.bool() if selects else None,
            write_rows=write_rows.long() if selects else None,
            columns=int(host[1][refreshing].max()) if selects else 0,
        )

    def _prefills(
        self,
        prefill_reqs: list[tuple[int, int, int, int, int]],
        rows: torch.Tensor,
        window: int | None,
    ) -> list[PrefillChunk]:
        chunks = []
        for i, p0, count, first, prompt_len in prefill_reqs:
            end = p0 + count
            # The first query sees the keys from kv_start on; later queries, suffixes of those.
            kv_start = 0 if window is None else max(0, p0 - window + 1)
            kv_slots = None
            if p0 > 0:
                kv_pos = torch.arange(kv_start, end, device=self.device)
                kv_slots = self.kv_cache.slots(rows[i], kv_pos)
            mask = None
            if window is not None and end - window > kv_start:  # the window cuts some query
                q_pos = torch.arange(p0, end, device=self.device)[:, None]
                k_pos = torch.arange(kv_start, end, device=self.device)[None, :]
                mask = (k_pos <= q_pos) & (k_pos > q_pos - window)
            stream = None
            if self.stream is not None and window is None:
                stream = self._stream_prefill(rows[i], p0, end, prompt_len)
            chunks.append(PrefillChunk(first, first + count, kv_slots, mask, stream))
        return chunks

    def _stream_prefill(
        self, row: torch.Tensor, p0: int, end: int, prompt_len: int
    ) -> StreamPrefill:
        """The chunk [p0, end)'s streaming heads: the earlier positions their table holds (its sink
        pages, then the ring's pages), and the Λ mask over those and the chunk's own keys."""
        assert self.stream is not None
        past_slots = None
        k_pos = q_pos = torch.arange(p0, end, device=self.device)
        if p0 > 0:
            past = self.stream.table.held(p0, self.device)
            past_slots = self.kv_cache.stream_slots(row, past)
            k_pos = torch.cat([past, q_pos])
        windows = self.stream.windows
        # A chunk shorter than a tile has little to skip, and FlexAttention compiles its decoding
        # kernel for it, which fails to build at dynamic lengths: the dense mask is cheap there.
        if self.stream.prefill == "flex" and end - p0 >= BLOCK:
            return StreamPrefill(
                past_slots, block_mask=block_mask(windows, q_pos, k_pos, prompt_len)
            )
        return StreamPrefill(past_slots, mask=dense_mask(windows, q_pos, k_pos, prompt_len))

    def _decode_groups(
        self,
        ctx_sorted: list[int],
        order: torch.Tensor,
        rows: torch.Tensor,
        pos0: torch.Tensor,
        qstart: torch.Tensor,
        window: int | None,
        stream_pages: tuple[torch.Tensor, torch.Tensor, int] | None,
        select: tuple[list[torch.Tensor], list[torch.Tensor]] | None,
    ) -> list[DecodeGroup]:
        """Groups of consecutive decode requests (most positions first) whose padded [g, L]
        gather stays within the budget; one group unless the batch holds many long contexts.
        `ctx_sorted`: the positions each one's dense heads attend; `stream_pages`: the pages each
        one's streaming heads see (`_stream_pages`); `select`: their selected views
        (`_select_views`, on the host and the device); all in `order`."""
        groups = []
        start = 0
        while start < len(ctx_sorted):
            width = ctx_sorted[start] if window is None else min(ctx_sorted[start], window)
            end = min(len(ctx_sorted), start + max(1, self.gather_budget // width))
            reqs = order[start:end]
            slots = mask = selection = None
            if select is None:
                ctx = pos0[reqs] + 1
                first = torch.zeros_like(ctx) if window is None else (ctx - window).clamp_min(0)
                k_pos = first[:, None] + torch.arange(width, device=self.device)
                mask = k_pos < ctx[:, None]
                # Padding reads position 0 of the request: a real slot, masked out.
                slots = self.kv_cache.slots(rows[reqs][:, None], k_pos.where(mask, 0))
            else:
                selection = self._decode_selection(*select, rows[order], start, end)
            stream = {}
            if stream_pages is not None and window is None:
                pages, count, max_count = stream_pages
                stream = self._stream_gather(
                    rows[reqs], pos0[reqs], pages[start:end], count[start:end], max_count
                )
            groups.append(DecodeGroup(qstart[reqs], slots, mask, **stream, selection=selection))
            start = end
        return groups

    def _stream_pages(
        self, q_pos: torch.Tensor, prompt_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The logical pages [g, width] (and their number [g]) that the streaming heads of queries
        at `q_pos` see, each under its window (prefill inside its prompt, decode after)."""
        assert self.stream is not None
        prefill, decode = self.stream.windows.prefill, self.stream.windows.decode
        in_prompt = q_pos < prompt_lens
        sink = torch.where(in_prompt, prefill.sink_pages, decode.sink_pages)
        local = torch.where(in_prompt, prefill.local_pages, decode.local_pages)
        return self.stream.table.visible_pages(q_pos, sink, local)

    def _stream_gather(
        self,
        rows: torch.Tensor,
        q_pos: torch.Tensor,
        pages: torch.Tensor,
        count: torch.Tensor,
        max_count: int,
    ) -> dict[str, torch.Tensor]:
        """Streaming-pool slots [g, max_count * page] of what each request's streaming heads see,
        and their validity mask (the gather path's `DecodeGroup` fields)."""
        assert self.stream is not None
        page = self.kv_cache.page_size
        u = torch.arange(max_count * page, device=self.device)
        logical = pages[:, u // page]
        mask = u < ((count - 1) * page + q_pos % page + 1)[:, None]
        column = self.stream.table.column(logical)
        slots = self.kv_cache.stream_page_slots(rows[:, None], column) + u % page
        return {"stream_slots": slots, "stream_mask": mask}

    def _stream_decode(
        self, rows: torch.Tensor, q_pos: torch.Tensor, pages: torch.Tensor, count: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode kernel's view of the streaming heads (`DecodeBatch` fields): per request
        its visible streaming pages, oldest first, and the tokens on them."""
        assert self.stream is not None
        column = self.stream.table.column(pages)
        j = torch.arange(pages.shape[1], device=self.device)
        table = self.kv_cache.stream_table[rows[:, None], column].where(j < count[:, None], 0)
        lens = (count - 1) * self.kv_cache.page_size + q_pos % self.kv_cache.page_size + 1
        return table, lens.int()
