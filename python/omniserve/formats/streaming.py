"""Streaming heads' visibility rule (the Λ mask) and the streaming table's ring index.

A streaming KV head (LServe / DuoAttention) keeps only a few pages of a request: its first
`sink_pages` pages and the `local_pages` pages before the query's own page, plus that page. The
rule is page-granular, in KV pages of `page_size` tokens, so that what a query may see is exactly
what a streaming table holds (token windows are rounded up to whole pages by the engine's config):

    key j is visible to the query at position i  iff  j <= i  and
        (j // page_size < sink_pages  or  j // page_size >= i // page_size - local_pages)

A request's streaming table (allocated by the scheduler at admission, fixed for the request's
life) has `sink_pages` columns for the sink pages, then a ring of `ring_pages` columns: logical
page k >= sink_pages lives in column sink_pages + (k - sink_pages) % ring_pages. A ring one page
longer than the largest window's local pages holds every page any query may see (prefill's and
decode's windows differ). The runner, the attention layers and the calibration tool use these
definitions; nothing else computes visibility or ring columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class StreamWindow:
    """What a streaming head sees, in pages (see the module docstring)."""

    sink_pages: int
    local_pages: int
    page_size: int

    def __post_init__(self) -> None:
        if self.sink_pages < 0 or self.local_pages < 0 or self.page_size < 1:
            raise ValueError(f"invalid streaming window {self}")

    @classmethod
    def of_tokens(cls, sink: int, local: int, page_size: int) -> StreamWindow:
        """The window of `sink` and `local` tokens, each rounded up to whole pages."""
        return cls(-(-sink // page_size), -(-local // page_size), page_size)

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Whether key position `k_pos` is visible to query position `q_pos` (broadcast)."""
        k_page, q_page = k_pos // self.page_size, q_pos // self.page_size
        near = (k_page < self.sink_pages) | (k_page >= q_page - self.local_pages)
        return (k_pos <= q_pos) & near


@dataclass(frozen=True, slots=True)
class StreamTable:
    """The column layout of every request's streaming table."""

    sink_pages: int
    ring_pages: int
    page_size: int

    @classmethod
    def serving(cls, *windows: StreamWindow) -> StreamTable:
        """The smallest table that holds what any of `windows` sees."""
        sink = max(w.sink_pages for w in windows)
        return cls(sink, max(w.local_pages for w in windows) + 1, windows[0].page_size)

    @property
    def width(self) -> int:
        """Columns of a full table (a request too short to wrap the ring gets fewer)."""
        return self.sink_pages + self.ring_pages

    def column(self, page: torch.Tensor) -> torch.Tensor:
        """Column holding logical page `page` (an integer tensor)."""
        ring = self.sink_pages + (page - self.sink_pages) % self.ring_pages
        return torch.where(page < self.sink_pages, page, ring)

    def survives(self, pos: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Whether the K/V of token `pos`, written in a step whose last token of the same request
        is at `last`, is still in the table after the step: a later token of that step may take
        its ring slot. A step writes only survivors, so that no two of its writes hit one slot
        (their order would be undefined)."""
        page = pos // self.page_size
        return (page < self.sink_pages) | (page > last // self.page_size - self.ring_pages)

    def held(self, end: int, device: torch.device) -> torch.Tensor:
        """The positions (long, increasing) a request's table holds once it holds `end` tokens:
        its sink pages, then the ring's pages."""
        page = self.page_size
        sink_end = min(end, self.sink_pages * page)
        ring_start = max(self.sink_pages * page, ((end - 1) // page - self.ring_pages + 1) * page)
        sinks = torch.arange(sink_end, device=device)
        return torch.cat([sinks, torch.arange(ring_start, max(ring_start, end), device=device)])

    def visible_pages(
        self, q_pos: torch.Tensor, sink: torch.Tensor, local: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The logical pages that queries at `q_pos` [g] see under windows of `sink` / `local`
        pages [g] (each <= this table's), oldest first: long [g, width], padded with page 0, and
        their number [g]. Page i of the list holds visible positions pages[i] * page_size + o,
        all of them but the last page's, which ends at the query."""
        q_page = q_pos // self.page_size
        num_sink = torch.minimum(sink, q_page + 1)
        first_local = torch.maximum(sink, q_page - local)
        count = num_sink + (q_page - first_local + 1).clamp_min(0)
        j = torch.arange(self.width, device=q_pos.device)
        pages = torch.where(j < num_sink[:, None], j, first_local[:, None] + j - num_sink[:, None])
        return torch.where(j < count[:, None], pages, 0), count
