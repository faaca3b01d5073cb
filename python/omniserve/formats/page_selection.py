"""Query-aware KV page selection (LServe's dynamic sparsity): key statistics, page scores, the
top-k rule, and the selected view of a request's pages.

Key statistics. Each KV head's keys are summarised per *logical page*: `logical_tokens`
consecutive slots of the dense pool (a physical page of `page_size` tokens holds
page_size // logical_tokens of them). For each, the channel-wise min and max of the keys as the
cache holds them (after RoPE; dequantized for a KV8/KV4 cache) are kept at

    stat row = cache row // logical_tokens            stats: [stat rows + 1, 2 (min, max), head_dim]

in the compute dtype (cache rows as `runner/kv_cache.py` lays them out; every head's base row is
a multiple of page_size, so stat rows never straddle heads). The write of a logical page's first
token (slot offset 0) resets its statistics, so a page reused after a free, a preemption or a
recompute never mixes in an earlier owner's keys, and nothing has to be cleared at allocation.
The last stat row is scratch: writes that must not land anywhere go there.

Scores. For query q, a logical page's score is sum_c max(q_c * kmax_c, q_c * kmin_c), an upper
bound of q.k over the page's keys (Quest's bound); a physical page's score is the max over its
logical pages and, when a GQA group selects together, over the group's query heads.

Selection. A request whose newest token is in page-table column `tail` chooses, per selecting
head, the `k` best of columns [0, tail) (ties: the lower column), kept in ascending order, and
sees every column from `tail` on: the newest page, and those its next tokens open before the
next selection. A request with tail <= k sees all its pages (count 0, tail 0: the dense view).

Selected view. Attention walks virtual positions u in [0, count * page_size + ctx - tail *
page_size): virtual page j = u // page_size is column columns[j] for j < count, else column
tail + j - count, at offset u % page_size. The CUDA kernels (`cuda/common/decode_attention.cuh`,
`cuda/page_scores.cu`) implement these same definitions; the torch reference uses the functions
here, and nothing else computes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN, MAX = 0, 1
"""Index of the min and the max in a stat row's second dimension."""


@dataclass(frozen=True, slots=True)
class PageSelection:
    """How decode selects pages: sizes in tokens and pages, and who selects together."""

    page_size: int
    logical_tokens: int
    """Tokens per logical page (the statistics' granularity); divides page_size."""
    budget_pages: int
    """Pages a selected request attends: `k` chosen ones plus its newest page."""
    interval: int
    """Decode steps between two selections of a request."""
    per_query_head: bool = False
    """Each query head selects its own pages (else a GQA group shares one list)."""

    def __post_init__(self) -> None:
        if self.page_size % self.logical_tokens:
            raise ValueError(
                f"logical pages of {self.logical_tokens} tokens do not divide pages of "
                f"{self.page_size}"
            )
        if self.budget_pages < 2:
            raise ValueError(f"a budget of {self.budget_pages} pages selects nothing (>= 2)")

    @property
    def k(self) -> int:
        """Pages chosen by score (the budget without the newest page)."""
        return self.budget_pages - 1

    @property
    def logical_per_page(self) -> int:
        return self.page_size // self.logical_tokens

    def max_visible(self, max_context_len: int) -> int:
        """A bound of the positions a decode query attends: a view is made when its request has
        at most one page past `k` (the tail page), and is reused for `interval` - 1 more tokens;
        so k + 1 pages and those tokens, sparse or dense."""
        bound = self.budget_pages * self.page_size + self.interval
        return min(max_context_len, bound)

    def view(self, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(count, tail) of requests whose selection chooses among `tail` columns: k and tail
        where tail > k, else the dense view (0, 0)."""
        sparse = tail > self.k
        return torch.where(sparse, self.k, 0).int(), torch.where(sparse, tail, 0).int()


def update_key_stats(
    stats: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor, logical_tokens: int
) -> None:
    """Fold keys [*shape, head_dim] written at cache `rows` (long [*shape]) into `stats`, in
    write order: a token at offset 0 of its logical page first resets that page. Fixed shapes
    (no host sync): CUDA graphs capture it."""
    rows, keys = rows.reshape(-1), keys.reshape(-1, keys.shape[-1]).to(stats.dtype)
    index = rows // logical_tokens
    scratch = stats.shape[0] - 1
    first = rows % logical_tokens == 0
    # Only first tokens write their page's reset, others the scratch row: no two writes of one
    # index_put disagree (padding tokens all reset the null page's first logical page alike).
    reset = torch.stack([keys, keys], 1)  # a page's first key is its min and max
    stats.index_put_((torch.where(first, index, scratch),), reset)
    expand = index[:, None].expand_as(keys)
    stats[:, MIN].scatter_reduce_(0, expand, keys, "amin")
    stats[:, MAX].scatter_reduce_(0, expand, keys, "amax")


def page_stat_rows(
    head_base: torch.Tensor, pages: torch.Tensor, page_size: int, logical_tokens: int
) -> torch.Tensor:
    """Stat row of logical page 0 of each of `pages` (long [*shape]) for each KV head: long
    [*shape, kv_heads] (`head_base`: long [kv_heads], each head's cache row of slot 0)."""
    return (head_base + pages[..., None] * page_size) // logical_tokens


def page_scores(
    q: torch.Tensor,
    stats: torch.Tensor,
    stat_rows: torch.Tensor,
    candidates: torch.Tensor,
    logical_per_page: int,
) -> torch.Tensor:
    """Scores fp32 [g, S, P] of each request's first P page-table columns for S selecting heads.

    q [g, S, G, head_dim]: the queries (after RoPE) of each selecting head, G query heads that
    select together (1: per query head); stat_rows long [g, S, P]: stat row of logical page 0 of
    each column's page for the KV head of each selecting head; candidates int [g]: columns
    chosen among; columns at or past it score -inf."""
    offsets = torch.arange(logical_per_page, device=stat_rows.device)
    lo_hi = stats[stat_rows[..., None] + offsets].float()  # [g, S, P, L, 2, D]
    qf = q.float()[:, :, None, None, :, :]  # [g, S, 1, 1, G, D]
    bound = torch.maximum(qf * lo_hi[..., MIN, None, :], qf * lo_hi[..., MAX, None, :])
    scores = bound.sum(-1).amax(dim=(-1, -2))  # over the group's heads and logical pages
    columns = torch.arange(scores.shape[-1], device=scores.device)
    return scores.masked_fill(columns >= candidates[:, None, None], float("-inf"))


def top_pages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k best columns int32 [g, S, k] of scores [g, S, P >= k], ascending; ties go to the
    lower column (a stable sort), so the choice is deterministic."""
    best = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return best.sort(dim=-1).values.int()


def selected_columns(
    columns: torch.Tensor, count: torch.Tensor, tail: torch.Tensor, num_pages: int
) -> torch.Tensor:
    """Page-table column of each of the first `num_pages` virtual pages (see the module
    docstring): long [g, S, num_pages] from columns int [g, S, k] and count / tail int [g]."""
    j = torch.arange(num_pages, device=columns.device)
    index = j.clamp_max(columns.shape[-1] - 1).expand(*columns.shape[:2], -1)
    chosen = columns.long().gather(-1, index)
    rest = tail.long()[:, None, None] + j - count.long()[:, None, None]
    return torch.where(j < count[:, None, None], chosen, rest)


def visible_len(
    ctx: torch.Tensor, count: torch.Tensor, tail: torch.Tensor, page_size: int
) -> torch.Tensor:
    """Positions a request of `ctx` tokens attends in its selected view (all of them when dense)."""
    return count * page_size + ctx - tail * page_size
