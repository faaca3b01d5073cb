"""Streaming heads' prefill (layers/sparse_prefill.py): the FlexAttention block mask against the
dense Λ mask it stands for (CPU: its tiles; GPU: the attention itself), at odd lengths, page and
tile boundaries, with earlier chunks, and with queries on both sides of the prompt's end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omniserve.formats.streaming import StreamTable, StreamWindow
from omniserve.layers.sparse_prefill import (
    BLOCK,
    StreamPrefill,
    StreamWindows,
    block_mask,
    dense_mask,
    stream_prefill_attention,
)

PAGE = 64
WINDOWS = StreamWindows(StreamWindow(2, 5, PAGE), StreamWindow(1, 3, PAGE))

# (p0, end, prompt_len): a first chunk, later chunks reading the table, a chunk crossing the
# prompt's end (recompute after preemption), lengths off every boundary.
CASES = [(0, 1000, 1000), (0, 129, 4000), (700, 1901, 4000), (3000, 3555, 3300), (64, 200, 100)]


def _keys(p0: int, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Query positions and (earlier still held ++ own) key positions, as the step builds them."""
    table = StreamTable.serving(WINDOWS.prefill, WINDOWS.decode)
    q_pos = torch.arange(p0, end, device=device)
    return q_pos, torch.cat([table.held(p0, device), q_pos]) if p0 else q_pos


@pytest.mark.parametrize("p0,end,prompt_len", CASES)
def test_block_mask_marks_every_visible_tile_and_only_full_tiles_full(
    p0: int, end: int, prompt_len: int
) -> None:
    q_pos, k_pos = _keys(p0, end, torch.device("cpu"))
    dense = dense_mask(WINDOWS, q_pos, k_pos, prompt_len)
    mask = block_mask(WINDOWS, q_pos, k_pos, prompt_len)
    nq, nk = -(-dense.shape[0] // BLOCK), -(-dense.shape[1] // BLOCK)
    padded = F.pad(dense, (0, nk * BLOCK - dense.shape[1], 0, nq * BLOCK - dense.shape[0]))
    tiles = padded.view(nq, BLOCK, nk, BLOCK).transpose(1, 2)
    any_visible = tiles.any(-1).any(-1)
    kept = mask.to_dense()[0, 0].bool()
    assert (kept | ~any_visible).all(), "a tile with a visible key is skipped"
    full = torch.zeros(nq, nk, dtype=torch.bool)
    count, index = mask.full_kv_num_blocks[0, 0], mask.full_kv_indices[0, 0]
    for i in range(nq):
        full[i, index[i, : count[i]].long()] = True
    q_real = torch.arange(nq * BLOCK) < dense.shape[0]
    k_real = torch.arange(nk * BLOCK) < dense.shape[1]
    inside = (q_real[:, None] & k_real[None, :]).view(nq, BLOCK, nk, BLOCK).transpose(1, 2)
    all_visible = (tiles | ~inside).all(-1).all(-1)
    assert (all_visible | ~full).all(), "a tile marked full hides a key"
    # The structure is tight: tiles are kept roughly in proportion to the visible area.
    assert kept.sum() <= any_visible.sum() + 2 * nq


@pytest.mark.gpu
@pytest.mark.parametrize("p0,end,prompt_len", CASES)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_flex_attention_equals_the_dense_mask(
    p0: int, end: int, prompt_len: int, heads: tuple[int, int]
) -> None:
    device = torch.device("cuda")
    q_pos, k_pos = _keys(p0, end, device)
    g = torch.Generator(device=device).manual_seed(p0 + end)
    q_heads, kv_heads = heads

    def rand(h: int, n: int) -> torch.Tensor:
        return torch.randn(h, n, 128, generator=g, device=device, dtype=torch.bfloat16)

    q, k, v = rand(q_heads, len(q_pos)), rand(kv_heads, len(k_pos)), rand(kv_heads, len(k_pos))
    want = stream_prefill_attention(
        q, k, v, StreamPrefill(None, mask=dense_mask(WINDOWS, q_pos, k_pos, prompt_len)), 0.088
    )
    got = stream_prefill_attention(
        q,
        k,
        v,
        StreamPrefill(None, block_mask=block_mask(WINDOWS, q_pos, k_pos, prompt_len)),
        0.088,
    )
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_flex_compiles_a_few_graphs_for_every_head_count_and_length() -> None:
    """Layers stream different numbers of KV heads and chunks differ in length: the compiled
    kernel must not recompile per layer or chunk (past the recompile limit, torch falls back to
    an unfused FlexAttention that materialises every score and runs out of memory at 128K)."""
    from torch._dynamo.utils import counters

    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    before = counters["stats"]["unique_graphs"]
    for kv_heads in (1, 2, 3, 4, 5, 7, 8):
        for p0, end, prompt_len in CASES[:3]:
            q_pos, k_pos = _keys(p0, end, device)
            q, k, v = (
                torch.randn(h, n, 128, generator=g, device=device, dtype=torch.bfloat16)
                for h, n in (
                    (4 * kv_heads, len(q_pos)),
                    (kv_heads, len(k_pos)),
                    (kv_heads, len(k_pos)),
                )
            )
            mask = block_mask(WINDOWS, q_pos, k_pos, prompt_len)
            stream_prefill_attention(q, k, v, StreamPrefill(None, block_mask=mask), 0.088)
    assert counters["stats"]["unique_graphs"] - before <= 3
