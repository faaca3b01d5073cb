"""Page selection's definitions (`formats/page_selection.py`) against brute-force readings of them:
key statistics under resets and page reuse, Quest's bound, deterministic top-k, and the selected
view's columns."""

from __future__ import annotations

import pytest
import torch

from omniserve.formats import page_selection as ps
from omniserve.formats.page_selection import PageSelection

LOGICAL = 4


def test_statistics_follow_writes_and_reset_at_each_logical_page_start() -> None:
    g = torch.Generator().manual_seed(0)
    stats = torch.zeros(6 + 1, 2, 3)
    written: dict[int, list[torch.Tensor]] = {}
    # Rows 0..23 in three steps (a prefill chunk split mid-page, then single tokens), then rows
    # 8..11 rewritten by a new owner: its first write must drop the old keys.
    for rows in ([0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11, 12], [13], [14], list(range(15, 24))):
        keys = torch.randn(len(rows), 3, generator=g)
        ps.update_key_stats(stats, torch.tensor(rows), keys, LOGICAL)
        for r, k in zip(rows, keys, strict=True):
            if r % LOGICAL == 0:
                written[r // LOGICAL] = [k]
            else:
                written[r // LOGICAL].append(k)
    reuse = torch.randn(2, 3, generator=g)
    ps.update_key_stats(stats, torch.tensor([8, 9]), reuse, LOGICAL)
    written[2] = list(reuse)
    for page, keys in written.items():
        stacked = torch.stack(keys)
        assert torch.equal(stats[page, ps.MIN], stacked.min(0).values), page
        assert torch.equal(stats[page, ps.MAX], stacked.max(0).values), page


def test_statistics_of_padding_writes_stay_on_the_null_page() -> None:
    stats = torch.zeros(4 + 1, 2, 2)
    keys = torch.tensor([[1.0, -1.0], [5.0, 5.0], [7.0, 7.0], [-3.0, 2.0]])
    # Three padding tokens write row 0 (the null page's slot 0) beside a real token at row 4.
    ps.update_key_stats(stats, torch.tensor([0, 0, 0, 4]), keys, LOGICAL)
    assert torch.equal(stats[0, ps.MIN], torch.tensor([1.0, -1.0]))
    assert torch.equal(stats[0, ps.MAX], torch.tensor([7.0, 7.0]))
    assert torch.equal(stats[1], torch.tensor([[-3.0, 2.0], [-3.0, 2.0]])), "min/max of one key"
    assert torch.equal(stats[2:4], torch.zeros(2, 2, 2)), "no other page touched"


def test_scores_bound_every_key_and_reduce_over_logical_pages_and_heads() -> None:
    g = torch.Generator().manual_seed(1)
    page, group, dim, pages = 8, 2, 5, 3
    keys = torch.randn(pages * page, dim, generator=g)
    stats = torch.zeros(pages * page // LOGICAL + 1, 2, dim)
    ps.update_key_stats(stats, torch.arange(pages * page), keys, LOGICAL)
    q = torch.randn(1, 1, group, dim, generator=g)
    stat_rows = ps.page_stat_rows(torch.tensor([0]), torch.arange(pages)[None], page, LOGICAL)
    scores = ps.page_scores(q, stats, stat_rows.permute(0, 2, 1), torch.tensor([pages]), 2)
    for c in range(pages):
        dots = q[0, 0] @ keys[c * page : (c + 1) * page].T  # [group, page]
        assert scores[0, 0, c] >= dots.max() - 1e-5, "an upper bound of q.k"
        logical = [stats[2 * c + j] for j in range(2)]
        brute = max(
            float(torch.maximum(qh * s[ps.MAX], qh * s[ps.MIN]).sum())
            for qh in q[0, 0]
            for s in logical
        )
        assert scores[0, 0, c].item() == pytest.approx(brute, rel=1e-6)
    masked = ps.page_scores(q, stats, stat_rows.permute(0, 2, 1), torch.tensor([2]), 2)
    assert masked[0, 0, 2] == float("-inf"), "columns past the candidates never win"


def test_top_pages_break_ties_by_the_lower_column_and_come_ascending() -> None:
    scores = torch.tensor([[[1.0, 3.0, 2.0, 3.0, 3.0, float("-inf")]]])
    assert ps.top_pages(scores, 2).tolist() == [[[1, 3]]]
    assert ps.top_pages(scores, 4).tolist() == [[[1, 2, 3, 4]]]
    assert ps.top_pages(scores, 2).dtype == torch.int32


def test_selected_view_walks_the_chosen_columns_then_the_tail() -> None:
    columns = torch.tensor([[[1, 4], [0, 2]]], dtype=torch.int32)  # one request, two heads
    count, tail = torch.tensor([2], dtype=torch.int32), torch.tensor([7], dtype=torch.int32)
    view = ps.selected_columns(columns, count, tail, 4)
    assert view.tolist() == [[[1, 4, 7, 8], [0, 2, 7, 8]]]
    # Context 7 * 16 + 5 = 117 tokens: 2 chosen pages and the 5 tokens of the newest one.
    assert ps.visible_len(torch.tensor([117]), count, tail, 16).tolist() == [37]
    dense = ps.selected_columns(columns, torch.zeros(1, dtype=torch.int32), torch.zeros(1), 3)
    assert dense.tolist() == [[[0, 1, 2], [0, 1, 2]]], "count = tail = 0 is the dense view"


def test_view_is_dense_until_the_context_outgrows_the_budget() -> None:
    selection = PageSelection(page_size=16, logical_tokens=4, budget_pages=3, interval=4)
    count, tail = selection.view(torch.tensor([0, 2, 3, 9]))
    assert (count.tolist(), tail.tolist()) == ([0, 0, 2, 2], [0, 0, 3, 9])
    # k chosen pages + the tail page + what `interval` steps add.
    assert selection.max_visible(10_000) == 3 * 16 + 4
    with pytest.raises(ValueError, match="do not divide"):
        PageSelection(page_size=16, logical_tokens=5, budget_pages=3, interval=4)
    with pytest.raises(ValueError, match="selects nothing"):
        PageSelection(page_size=16, logical_tokens=4, budget_pages=1, interval=4)
