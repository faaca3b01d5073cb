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

The runner builds the per-step `AttentionMetadata` (cache rows, masks, groups) once for all layers.
Cache rows are indexed [kv_heads, ...]: see `runner/kv_cache.py` for the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from omniserve.formats.kv import CacheRows
from omniserve.kernels import rope_kv
from omniserve.kernels.attention import decode_attention
from omniserve.layers.rotary import apply_rotary


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Queries [start, end) of the step's tokens, all of one request."""

    start: int
    end: int
    kv_index: torch.Tensor | None
    """long [kv_heads, L]: cache rows of the keys the chunk sees, oldest first; None when the chunk
    starts the request (its keys are exactly its own tokens, no cache read needed)."""
    mask: torch.Tensor | None
    """bool [end - start, L]: key visible to query; None means plain causal, aligned so that the
    last query sees the last key (the sliding window cuts nothing)."""


@dataclass(frozen=True, slots=True)
class DecodeGroup:
    """Requests with one new token each, attended together."""

    token_idx: torch.Tensor
    """long [g]: index of each request's token in the step."""
    kv_index: torch.Tensor
    """long [kv_heads, g, L]: cache rows of each request's visible keys, padded with a valid row."""
    mask: torch.Tensor
    """bool [g, L]: False on padding."""


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


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    write_index: torch.Tensor
    """long [kv_heads, T]: cache rows each token's key/value heads are written to."""
    by_window: dict[int | None, AttentionBatches]
    """The attention work for each sliding window size used by the model (None: full attention)."""
    decode_batch: DecodeBatch | None = None
    """Set when the runner runs decode with the CUDA kernel; `by_window` then has no decode
    groups."""


class PagedAttention(nn.Module):
    """Multi-head attention (MHA or GQA) of one layer reading and writing that layer's pages.

    `k_cache`/`v_cache` are the layer's K and V cache rows, bound by the runner's KV cache after
    allocation. `fused_rope_kv`: RoPE and the K/V write run as the fused kernel
    (`rotate_and_attend`), as kernels/dispatch.py chose for the model; the decode kernel runs where
    the step's metadata carries a `DecodeBatch`, which the runner builds on its choice.
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
        self.sliding_window = sliding_window
        self.k_cache: CacheRows
        self.v_cache: CacheRows

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

        With `fused_rope_kv` the kernel rotates q and k and stores K and V in one launch;
        otherwise `apply_rotary` and `forward`'s store do. Either way `forward` (and any hook on
        it) receives the rotated q and k."""
        if self.fused_rope_kv:
            q, k, v = rope_kv.rope_kv_write(
                q, k, v, rope, meta.write_index, self.k_cache, self.v_cache
            )
            return self(q, k, v, meta, stored=True)
        return self(apply_rotary(q, *rope), apply_rotary(k, *rope), v, meta)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        *,
        stored: bool = False,
    ) -> torch.Tensor:
        """q [T, heads, head_dim], k/v [T, kv_heads, head_dim], after RoPE -> [T, heads, head_dim].

        k and v are first written to the cache, unless `stored`: the caller already wrote them and
        passes them as reads of the cache return them (`rotate_and_attend`'s fused kernel)."""
        if not stored:
            k = self.k_cache.store(meta.write_index, k.transpose(0, 1)).transpose(0, 1)
            v = self.v_cache.store(meta.write_index, v.transpose(0, 1)).transpose(0, 1)
        batches = meta.by_window[self.sliding_window]
        out = torch.empty_like(q)
        for chunk in batches.prefills:
            out[chunk.start : chunk.end] = self._prefill(q, k, v, chunk)
        for group in batches.decodes:
            out[group.token_idx] = self._decode(q, group)
        if meta.decode_batch is not None:
            out[meta.decode_batch.token_idx] = self._decode_kernel(q, meta.decode_batch)
        return out

    def _decode_kernel(self, q: torch.Tensor, batch: DecodeBatch) -> torch.Tensor:
        return decode_attention(
            q[batch.token_idx],
            self.k_cache.kernel_operands(),
            self.v_cache.kernel_operands(),
            batch.page_table,
            batch.seq_rows,
            batch.context_lens,
            page_size=batch.page_size,
            num_kv_heads=self.num_kv_heads,
            max_context_len=batch.max_context_len,
            scale=self.scale,
            window=self.sliding_window,
        )

    def _prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: PrefillChunk
    ) -> torch.Tensor:
        # SDPA wants [batch, heads, seq, dim]; the batch is this one request.
        qc = q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
        if chunk.kv_index is None:
            kc = k[chunk.start : chunk.end].transpose(0, 1)
            vc = v[chunk.start : chunk.end].transpose(0, 1)
        else:
            kc, vc = self.k_cache.read(chunk.kv_index), self.v_cache.read(chunk.kv_index)
        kc, vc = kc.unsqueeze(0), vc.unsqueeze(0)
        if chunk.mask is not None:
            mask: torch.Tensor | None = chunk.mask
        elif chunk.kv_index is None:
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
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return o[0].transpose(0, 1)

    def _decode(self, q: torch.Tensor, group: DecodeGroup) -> torch.Tensor:
        # One query per request: two batched matmuls, KV-head-major. The query heads that share a
        # KV head are stacked against it, so each gathered key/value is read once (SDPA's masked
        # paths would copy K/V per query head); the gather lands directly in contiguous
        # [kv_heads, g, L, dim] batches.
        g, group_size = group.token_idx.shape[0], self.num_heads // self.num_kv_heads
        qg = q[group.token_idx].view(g, self.num_kv_heads, group_size, self.head_dim)
        kg = self.k_cache.read(group.kv_index)  # [kv_heads, g, L, dim]
        vg = self.v_cache.read(group.kv_index)
        scores = (qg.transpose(0, 1) @ kg.transpose(2, 3)).float() * self.scale
        scores.masked_fill_(~group.mask[None, :, None, :], float("-inf"))  # [kv_heads, g, group, L]
        out = scores.softmax(-1).to(vg.dtype) @ vg  # [kv_heads, g, group, dim]
        return out.transpose(0, 1).reshape(g, self.num_heads, self.head_dim)
