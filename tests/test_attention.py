"""Paged attention (+ the step inputs that drive it) against a dense reference, on random q/k/v."""

from __future__ import annotations

import pytest
import torch

from omniserve.layers.attention import PagedAttention
from omniserve.runner.kv_cache import KVCache, KVCacheSpec
from omniserve.runner.step_inputs import StepInputBuilder
from tiny_models import MIXED_STEPS, PagedRequests

PAGE_SIZE, NUM_PAGES, HEAD_DIM = 16, 40, 8
CPU = torch.device("cpu")


def _reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos0: int, window: int | None
) -> torch.Tensor:
    """Attention of queries [n, heads, dim] at positions pos0.. over all of their request's keys
    [pos0 + n, kv_heads, dim], with an explicit causal (and sliding-window) mask."""
    group = q.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    q_pos = torch.arange(pos0, pos0 + q.shape[0])[:, None]
    k_pos = torch.arange(keys.shape[0])[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    scores = torch.einsum("qhd,khd->hqk", q, k) * HEAD_DIM**-0.5
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (4, 4)])
@pytest.mark.parametrize("window", [None, 5, 20])
@pytest.mark.parametrize("gather_budget", [24, 4096])
def test_paged_attention_matches_dense_reference(
    num_heads: int, num_kv_heads: int, window: int | None, gather_budget: int
) -> None:
    torch.manual_seed(0)
    spec = KVCacheSpec(1, PAGE_SIZE, num_kv_heads, HEAD_DIM, torch.float32)
    cache = KVCache(spec, NUM_PAGES, max_num_seqs=6, max_pages_per_seq=8, device=CPU)
    layer = PagedAttention(num_heads, num_kv_heads, HEAD_DIM, window, fused_rope_kv=False)
    cache.bind([layer])
    # A budget of 24 slots splits the decode batch into several groups (one per long request).
    inputs = StepInputBuilder(cache, frozenset({window}), 6, 128, gather_budget, CPU)
    reqs = PagedRequests(PAGE_SIZE, NUM_PAGES)
    history: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for step in MIXED_STEPS:
        plan = reqs.step([(row, [0] * n) for row, n in step])
        num_tokens = plan.num_tokens
        q = torch.randn(num_tokens, num_heads, HEAD_DIM)
        k = torch.randn(num_tokens, num_kv_heads, HEAD_DIM)
        v = torch.randn(num_tokens, num_kv_heads, HEAD_DIM)
        out = layer(q, k, v, inputs.build(plan).attn)

        for i, (row, n) in enumerate(step):
            start, pos0 = int(plan.qstart[i]), int(plan.pos0[i])
            old_k, old_v = history.get(row, (k[:0], v[:0]))
            keys = torch.cat([old_k, k[start : start + n]])
            values = torch.cat([old_v, v[start : start + n]])
            history[row] = (keys, values)
            expected = _reference(q[start : start + n], keys, values, pos0, window)
            torch.testing.assert_close(out[start : start + n], expected, atol=1e-5, rtol=1e-5)
    # Real tokens never touch the null page.
    assert not cache.storage.view(2, num_kv_heads, -1, HEAD_DIM)[:, :, :PAGE_SIZE].any()


def test_cache_rows_follow_the_page_table() -> None:
    spec = KVCacheSpec(1, PAGE_SIZE, 2, HEAD_DIM, torch.float32)
    cache = KVCache(spec, 8, max_num_seqs=2, max_pages_per_seq=4, device=CPU)
    cache.apply_page_updates(torch.tensor([[1, 0, 5], [1, 1, 2]], dtype=torch.int32))
    positions = torch.tensor([0, 15, 16, 31])
    slots = [80, 95, 32, 47]  # page 5 then page 2, 16 slots each
    head_stride = 8 * PAGE_SIZE
    rows = [slots, [s + head_stride for s in slots]]
    assert cache.index(torch.tensor(1), positions).tolist() == rows
    assert cache.page_table[0].tolist() == [0, 0, 0, 0]
