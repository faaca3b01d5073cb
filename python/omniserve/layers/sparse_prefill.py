"""Prefill attention of streaming heads: the Λ mask (`formats/streaming.py`), dense or block-sparse.

A prefill chunk's streaming heads attend over the keys their table still holds of earlier chunks
followed by the chunk's own keys, under the Λ rule; a query before the request's prompt end uses
the prefill window, a later one (a recomputed output after preemption) the decode window, so
that a token's K/V never depend on how the scheduler split the request.

Two backends compute the same thing:
- `dense`: SDPA with an explicit boolean mask [queries, keys]. Exact, runs anywhere, but costs a
  dense attention and a mask of queries x keys; the CPU path and `attention_backend="torch"`.
- `flex`: FlexAttention (torch's block-sparse Triton attention, CUDA) with a `BlockMask` built
  from the rule's block structure, so that key tiles no query of a tile sees are skipped: the cost
  follows the tiles kept (sinks and the local band), as LServe's block-sparse kernel's does.
  The block mask is built once per chunk and step and shared by every layer.
`StreamPrefill` carries whichever the step built; `stream_prefill_attention` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F

from omniserve.formats.streaming import StreamWindow

BLOCK = 128
"""FlexAttention's tile (queries and keys)."""


@dataclass(frozen=True, slots=True)
class StreamPrefill:
    """What one prefill chunk's streaming heads see."""

    past_slots: torch.Tensor | None
    """long [Lp]: streaming-pool slots of the request's earlier tokens still in its table, oldest
    first; None for a chunk that starts its request."""
    mask: torch.Tensor | None = None
    """bool [queries, Lp + queries]: the Λ mask over (earlier ++ own) keys (dense backend)."""
    block_mask: Any = None
    """FlexAttention `BlockMask` of the same mask (flex backend)."""


@dataclass(frozen=True, slots=True)
class StreamWindows:
    """A request's two windows: for its prompt's queries and for the rest."""

    prefill: StreamWindow
    decode: StreamWindow

    def visible(
        self, q_pos: torch.Tensor, k_pos: torch.Tensor, prompt_len: int | torch.Tensor
    ) -> torch.Tensor:
        """The Λ rule with the window each query position takes (broadcast)."""
        return torch.where(
            q_pos < prompt_len,
            self.prefill.visible(q_pos, k_pos),
            self.decode.visible(q_pos, k_pos),
        )


def stream_prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stream: StreamPrefill, scale: float
) -> torch.Tensor:
    """q [q_heads, n, d], k / v [kv_heads, L, d] (earlier ++ own keys) -> [q_heads, n, d];
    the query heads of each KV head are consecutive."""
    gqa = q.shape[0] != k.shape[0]
    if stream.block_mask is not None:
        # Each KV head a batch entry of its query heads: layers stream different numbers of
        # heads, and a varying batch compiles once as a dynamic size, where a varying head
        # count would specialise (the GQA ratio is guarded) and recompile per layer.
        out = _flex()(
            q.unflatten(0, (k.shape[0], -1)),
            k[:, None],
            v[:, None],
            block_mask=stream.block_mask,
            scale=scale,
            enable_gqa=gqa,
        )
        return out.flatten(0, 1)
    out = F.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=stream.mask, scale=scale, enable_gqa=gqa
    )
    return out[0]


def dense_mask(
    windows: StreamWindows, q_pos: torch.Tensor, k_pos: torch.Tensor, prompt_len: int
) -> torch.Tensor:
    """bool [n, L] Λ mask of queries at `q_pos` [n] over keys at `k_pos` [L]."""
    return windows.visible(q_pos[:, None], k_pos[None, :], prompt_len)


def block_mask(
    windows: StreamWindows, q_pos: torch.Tensor, k_pos: torch.Tensor, prompt_len: int
) -> Any:
    """FlexAttention `BlockMask` of `dense_mask(...)`, built from tile bounds (never the dense
    mask): a key tile is *full* when every query of the query tile sees all of it under every
    window the query tile uses, *partial* (the mask is evaluated in the kernel) when some may
    see some of it, and skipped otherwise. Both tests are conservative, so the mask is exact.
    Positions must increase along `q_pos` and `k_pos`."""
    from torch.nn.attention.flex_attention import BlockMask

    device = q_pos.device
    n, num_keys = q_pos.shape[0], k_pos.shape[0]
    qa, qb = _tile_bounds(q_pos)
    ka, kb = _tile_bounds(k_pos)
    page = windows.prefill.page_size
    qa_page, qb_page = qa[:, None] // page, qb[:, None] // page
    ka_page, kb_page = ka[None, :] // page, kb[None, :] // page
    some = torch.zeros(qa.shape[0], ka.shape[0], dtype=torch.bool, device=device)
    every = torch.ones_like(some)
    # Which windows each query tile uses: prompt queries take the prefill window, later ones
    # the decode window.
    for window, used in (
        (windows.prefill, qa < prompt_len),
        (windows.decode, qb >= prompt_len),
    ):
        sink, local = window.sink_pages, window.local_pages
        some_w = (ka[None, :] <= qb[:, None]) & ((ka_page < sink) | (kb_page >= qa_page - local))
        every_w = (kb[None, :] <= qa[:, None]) & ((kb_page < sink) | (ka_page >= qb_page - local))
        some |= some_w & used[:, None]
        every &= every_w | ~used[:, None]
    full = every & some
    partial = some & ~full

    # Tensors, not Python ints, in the closure: the compiled kernel would specialise (recompile)
    # on every new chunk start and prompt length. Filled on the device: torch.tensor(int,
    # device=cuda) copies from pageable memory, which waits for the step in flight.
    p0, prompt = q_pos[0], torch.full((), prompt_len, device=device)

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return windows.visible(p0 + q_idx, k_pos[kv_idx], prompt)

    def counts_and_indices(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = tiles.sum(-1, dtype=torch.int32)
        order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return count[None, None], order[None, None]

    kv_num, kv_idx = counts_and_indices(partial)
    full_num, full_idx = counts_and_indices(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(n, num_keys),
    )


def _tile_bounds(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last position of each tile of BLOCK consecutive entries of `pos`."""
    starts = torch.arange(0, pos.shape[0], BLOCK, device=pos.device)
    ends = (starts + BLOCK).clamp_max(pos.shape[0]) - 1
    return pos[starts], pos[ends]


@cache
def _flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    # Compiled once per process; dynamic shapes so that chunk and context lengths do not each
    # trigger a recompile.
    return torch.compile(flex_attention, dynamic=True)
