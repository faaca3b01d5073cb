"""Turns a `StepPlan` (int32 CPU tensors) into the device tensors one forward pass needs.

Per step, everything the device needs from the plan is packed into one persistent (pinned, on
CUDA) host buffer and sent with one copy into a persistent device buffer; positions, cache rows
and masks are then computed on the device from those views, with no per-token Python work. The
host side only looks at per-request counts (n numbers) to decide the shape of the work: which
requests prefill, and how decode requests are grouped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omniserve.layers.attention import (
    AttentionBatches,
    AttentionMetadata,
    DecodeBatch,
    DecodeGroup,
    PrefillChunk,
)
from omniserve.runner.kv_cache import KVCache
from omniserve.runner.step_plan import FLAG_NEEDS_LOGITS, StepPlan


@dataclass(frozen=True, slots=True)
class StepInputs:
    input_ids: torch.Tensor
    """int32 [T] on the device."""
    positions: torch.Tensor
    """long [T] on the device."""
    attn: AttentionMetadata
    sampled_idx: torch.Tensor
    """long [k] on the CPU: requests (indices into the plan) whose last token is sampled."""
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
    ) -> None:
        """`windows`: the sliding windows of the model's layers (None: full attention);
        `gather_budget`: most tokens one decode group gathers (its padded [g, L] size);
        `decode_kernel`: describe decodes as one `DecodeBatch` for the CUDA kernel (page table and
        lengths) instead of gathered decode groups."""
        self.kv_cache = kv_cache
        self.decode_kernel = decode_kernel
        self.windows = windows
        self.gather_budget = gather_budget
        self.device = device
        # Layout: input_ids [T], rows, pos0, num_new [n each], qstart [n+1], decode order [<= n],
        # sampled requests [<= n], page updates [3 per page at most].
        capacity = max_num_batched_tokens + 6 * max_num_seqs + 1 + 3 * kv_cache.num_pages
        self._host = torch.empty(capacity, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._dev = torch.empty(capacity, dtype=torch.int32, device=device)
        # The copy out of the pinned buffer is asynchronous: the next step may refill the buffer
        # only once it is done (a step that samples nothing never synchronises on its own).
        self._copied = torch.cuda.Event() if device.type == "cuda" else None

    def build(self, plan: StepPlan) -> StepInputs:
        """Also applies the plan's page updates to the page table (cache rows depend on them)."""
        n, num_tokens = plan.num_reqs, plan.num_tokens
        ctx = plan.pos0 + plan.num_new
        decode = (plan.num_new == 1).nonzero().squeeze(1)
        # Longest context first, so that each decode group pads its requests to similar lengths.
        order = decode[torch.argsort(ctx[decode], descending=True, stable=True)]
        sampled_idx = ((plan.flags & FLAG_NEEDS_LOGITS) != 0).nonzero().squeeze(1)

        parts = [
            plan.input_ids,
            plan.rows,
            plan.pos0,
            plan.num_new,
            plan.qstart,
            order.int(),
            sampled_idx.int(),
            plan.page_updates.flatten(),
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
        rows, pos0, num_new, qstart, order_d, sampled_d = (v.long() for v in views[1:7])
        self.kv_cache.apply_page_updates(updates.view(-1, 3))

        arange_t = torch.arange(num_tokens, device=self.device)
        req_of_token = torch.repeat_interleave(
            torch.arange(n, device=self.device), num_new, output_size=num_tokens
        )
        positions = pos0[req_of_token] + arange_t - qstart[req_of_token]
        write_index = self.kv_cache.index(rows[req_of_token], positions)

        # (request index, pos0, num_new, first token) of each prefill chunk, as Python ints.
        prefill = (plan.num_new > 1).nonzero().squeeze(1)
        prefill_reqs = list(
            zip(
                prefill.tolist(),
                plan.pos0[prefill].tolist(),
                plan.num_new[prefill].tolist(),
                plan.qstart[prefill].tolist(),
            )
        )
        decode_ctx = ctx[order].tolist()
        decode_batch = None
        if self.decode_kernel and decode_ctx:
            # int32 views straight from the step buffer: the kernel reads them as they are.
            decode_batch = DecodeBatch(
                token_idx=qstart[order_d],
                seq_rows=views[1][order_d],
                context_lens=views[2][order_d] + 1,
                max_context_len=decode_ctx[0],  # longest first
                page_table=self.kv_cache.page_table,
                page_size=self.kv_cache.page_size,
            )
        by_window = {
            w: AttentionBatches(
                self._prefills(prefill_reqs, rows, w),
                []
                if self.decode_kernel
                else self._decode_groups(decode_ctx, order_d, rows, pos0, qstart, w),
            )
            for w in self.windows
        }
        return StepInputs(
            input_ids=input_ids,
            positions=positions,
            attn=AttentionMetadata(write_index, by_window, decode_batch),
            sampled_idx=sampled_idx,
            logits_idx=qstart[1:][sampled_d] - 1,
        )

    def _prefills(
        self, prefill_reqs: list[tuple[int, int, int, int]], rows: torch.Tensor, window: int | None
    ) -> list[PrefillChunk]:
        chunks = []
        for i, p0, count, first in prefill_reqs:
            end = p0 + count
            # The first query sees the keys from kv_start on; later queries, suffixes of those.
            kv_start = 0 if window is None else max(0, p0 - window + 1)
            kv_index = None
            if p0 > 0:
                kv_pos = torch.arange(kv_start, end, device=self.device)
                kv_index = self.kv_cache.index(rows[i], kv_pos)
            mask = None
            if window is not None and end - window > kv_start:  # the window cuts some query
                q_pos = torch.arange(p0, end, device=self.device)[:, None]
                k_pos = torch.arange(kv_start, end, device=self.device)[None, :]
                mask = (k_pos <= q_pos) & (k_pos > q_pos - window)
            chunks.append(PrefillChunk(first, first + count, kv_index, mask))
        return chunks

    def _decode_groups(
        self,
        ctx_sorted: list[int],
        order: torch.Tensor,
        rows: torch.Tensor,
        pos0: torch.Tensor,
        qstart: torch.Tensor,
        window: int | None,
    ) -> list[DecodeGroup]:
        """Groups of consecutive decode requests (longest first) whose padded [g, L] gather stays
        within the budget; one group unless the batch holds many long contexts."""
        groups = []
        start = 0
        while start < len(ctx_sorted):
            width = ctx_sorted[start] if window is None else min(ctx_sorted[start], window)
            end = min(len(ctx_sorted), start + max(1, self.gather_budget // width))
            reqs = order[start:end]
            ctx = pos0[reqs] + 1
            first = torch.zeros_like(ctx) if window is None else (ctx - window).clamp_min(0)
            k_pos = first[:, None] + torch.arange(width, device=self.device)
            mask = k_pos < ctx[:, None]
            # Padding reads position 0 of the request: a real row, masked out.
            kv_index = self.kv_cache.index(rows[reqs][:, None], k_pos.where(mask, 0))
            groups.append(DecodeGroup(qstart[reqs], kv_index, mask))
            start = end
        return groups
