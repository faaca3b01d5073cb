"""Query-aware page selection's kernels against `formats/page_selection.py`, on the GPU: the page
scores (cuda/page_scores.cu) against `page_selection.page_scores`, and decode attention over
selected views (cuda/decode_attention.cu with `SelectedPages`) against an fp32 reference that
gathers each view's rows through `selected_columns` and `visible_len`; on the CPU, the wrappers'
checks. Also the key statistics the fused RoPE + KV write (cuda/rope_kv_write.cu) folds at
decode, against `update_key_stats`.

The attention cases are `PagedCase`s (tests/test_kernels_attention.py): random rows of every
cache format, shuffled pages and page-table rows, optionally streaming heads. A selection picks,
for each request whose context spans more than k + 1 pages, a tail column (its newest page, or up
to two pages before it) and k random columns below it per launched head; the others get the
dense view (count = tail = 0), which must be bit-identical to the kernel without a selection."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pytest
import torch

from omniserve.formats import page_selection as ps
from omniserve.formats.kv import CacheRows
from omniserve.kernels import attention as kernel
from omniserve.kernels import page_select, rope_kv
from omniserve.runner.kv_cache import DenseRows, QuantizedRows, StaticInt8Rows
from test_kernels_attention import (
    CONTEXTS,
    KV_BITS,
    LAYOUTS,
    STREAM_CONTEXTS,
    STREAM_FORMATS,
    TOLERANCE,
    PagedCase,
)

gpu = pytest.mark.gpu


@dataclass
class Selection:
    """A selection of `launched` heads' views over a case's requests (host copies beside the
    kernel's `SelectedPages`)."""

    columns: torch.Tensor  # int32 [page-table rows, launched, k]
    count: torch.Tensor  # int32 [B]
    tail: torch.Tensor  # int32 [B]

    def pages(self) -> kernel.SelectedPages:
        return kernel.SelectedPages(self.columns.cuda(), self.count.cuda(), self.tail.cuda())


def make_selection(
    case: PagedCase, launched: int, k: int, seed: int, dense: bool = False
) -> Selection:
    """Views of every request of `case` for `launched` heads: where it spans more than k + 1
    pages, a tail column in [k + 1, last page] and k ascending random columns below it for each
    head; else (or everywhere, with `dense`) the dense view. Rows of `columns` no request uses,
    and the unused views' entries, hold random valid columns."""
    g = torch.Generator().manual_seed(seed)
    rows, width = case.page_table.shape
    columns = torch.randint(width, (rows, launched, k), generator=g, dtype=torch.int32)
    count = torch.zeros(len(case.contexts), dtype=torch.int32)
    tail = torch.zeros_like(count)
    for b, ctx in enumerate(case.contexts):
        last = (ctx - 1) // case.page_size
        if dense or last <= k:
            continue
        tail[b] = int(torch.randint(max(k + 1, last - 2), last + 1, (), generator=g))
        count[b] = k
        for h in range(launched):
            chosen = torch.randperm(int(tail[b]), generator=g)[:k].sort().values
            columns[int(case.seq_rows[b]), h] = chosen.int()
    return Selection(columns, count, tail)


def view_lengths(case: PagedCase, sel: Selection) -> torch.Tensor:
    ctx = torch.tensor(case.contexts, dtype=torch.int32)
    return ps.visible_len(ctx, sel.count, sel.tail, case.page_size)


def view_rows(
    case: PagedCase, sel: Selection, b: int, head: int, kv: int, streams: bool
) -> torch.Tensor:
    """Cache rows launched head `head` (of KV head `kv`) of request b attends: its streaming
    table's positions if it streams, else its selected view through `selected_columns`."""
    size, base = case.page_size, case.head_base[kv]
    if streams:
        u = torch.arange(case.stream_contexts[b])
        return base + case.stream_table[b, u // size] * size + u % size
    length = int(view_lengths(case, sel)[b])
    row = int(case.seq_rows[b])
    columns = ps.selected_columns(
        sel.columns[row : row + 1, head : head + 1],
        sel.count[b : b + 1],
        sel.tail[b : b + 1],
        -(-length // size),
    )[0, 0]
    u = torch.arange(length)
    pages = case.request_pages[b][columns[u // size]]
    return base + pages * size + u % size


def reference(case: PagedCase, sel: Selection, launched: int) -> torch.Tensor:
    """fp32 attention of each launched head's query heads to the rows `view_rows` gives it."""
    group_q = case.heads // launched  # query heads per launched head
    group_kv = launched // case.kv_heads  # launched heads per KV head (1, or the GQA group)
    out = torch.empty(case.q.shape, dtype=torch.float32, device="cuda")
    for b in range(len(case.contexts)):
        for h in range(launched):
            kv = h // group_kv
            rows = view_rows(case, sel, b, h, kv, case.is_stream[kv]).cuda()
            k, v = case.dequantized[0][rows], case.dequantized[1][rows]
            heads = slice(h * group_q, (h + 1) * group_q)
            p = (case.q[b, heads].float() @ k.T * case.scale).softmax(-1)
            out[b, heads] = p @ v
    return out


def run_selected(
    case: PagedCase,
    sel: Selection,
    launched: int,
    max_context_len: int | None = None,
    partition: int | None = None,
) -> torch.Tensor:
    """The kernel over the case's cache with the selection, launched over `launched` heads (the
    case's KV heads, or its query heads: per-query-head selection run "as MHA")."""
    repeat = launched // case.kv_heads
    base = case.head_base.repeat_interleave(repeat).cuda()
    streaming = None
    if case.streaming is not None:
        s = case.streaming
        streaming = kernel.StreamingHeads(
            base, s.is_stream.repeat_interleave(repeat), s.table, s.context_lens
        )
    if max_context_len is None:  # the tightest bound: the longest view or streaming context
        max_context_len = max(view_lengths(case, sel).tolist() + case.stream_contexts)
    return kernel.decode_attention(
        case.q,
        case.operands[0],
        case.operands[1],
        case.page_table,
        case.seq_rows,
        case.context_lens,
        page_size=case.page_size,
        num_kv_heads=launched,
        max_context_len=max_context_len,
        scale=case.scale,
        partition=partition,
        streaming=streaming,
        selected=sel.pages(),
        head_base=None if streaming is not None else base,
    )


def _check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, **TOLERANCE[dtype])


# --- decode attention over selected views ---------------------------------------------------

MODES = {"kv_head": False, "query_head": True}
"""Who selects: each KV head for its GQA group, or each query head (a launch "as MHA")."""


@gpu
@pytest.mark.parametrize("per_query_head", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("bits", KV_BITS.values(), ids=KV_BITS.keys())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_selected_views_match_reference(
    layout: tuple[int, int, int], dtype: torch.dtype, bits: int | str | None, per_query_head: bool
) -> None:
    """Sparse and dense views side by side (b7-mixed: 2 of 7 requests span more than k + 1
    pages), every format; requests in the dense view equal the kernel without a selection bit
    for bit (same launch size and partition)."""
    case = PagedCase(layout, CONTEXTS["b7-mixed"], bits, dtype)
    launched = case.heads if per_query_head else case.kv_heads
    sel = make_selection(case, launched, k=4, seed=1)
    got = run_selected(case, sel, launched, max_context_len=max(case.contexts), partition=128)
    _check(got, reference(case, sel, launched), dtype)
    if not per_query_head:
        plain = case.run(partition=128)
        dense = sel.count == 0
        assert dense.any() and not dense.all()
        assert torch.equal(got[dense.cuda()], plain[dense.cuda()])


@gpu
@pytest.mark.parametrize("bits", KV_BITS.values(), ids=KV_BITS.keys())
@pytest.mark.parametrize("partition", [32, 64, 512, None])
def test_selected_views_split_partitions(bits: int | str | None, partition: int | None) -> None:
    """Page size 64 (KV4 tiles inside virtual pages), long contexts with views across several
    partitions, the launch sized by the views (the tightest max_context_len)."""
    contexts = [4097, 65, 3000, 129, 64 * 40 + 1, 20000]
    case = PagedCase(LAYOUTS["gqa32x8-d128"], contexts, bits, torch.float16, page_size=64)
    sel = make_selection(case, case.kv_heads, k=17, seed=2)
    got = run_selected(case, sel, case.kv_heads, partition=partition)
    _check(got, reference(case, sel, case.kv_heads), torch.float16)


@gpu
@pytest.mark.parametrize("per_query_head", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("dtype,bits", STREAM_FORMATS.values(), ids=STREAM_FORMATS.keys())
def test_selected_views_beside_streaming_heads(
    dtype: torch.dtype, bits: int | str | None, per_query_head: bool
) -> None:
    """Streaming heads attend their tables; only the dense heads read their selected views."""
    case = PagedCase(
        LAYOUTS["gqa32x8-d128"],
        CONTEXTS["b7-mixed"],
        bits,
        dtype,
        stream_heads=(1, 2, 5),
        stream_contexts=STREAM_CONTEXTS,
    )
    launched = case.heads if per_query_head else case.kv_heads
    sel = make_selection(case, launched, k=3, seed=3)
    _check(run_selected(case, sel, launched), reference(case, sel, launched), dtype)


@gpu
@pytest.mark.parametrize("streams", [False, True], ids=["dense", "streaming"])
@pytest.mark.parametrize("dtype,bits", STREAM_FORMATS.values(), ids=STREAM_FORMATS.keys())
def test_dense_views_are_bit_identical_to_no_selection(
    dtype: torch.dtype, bits: int | str | None, streams: bool
) -> None:
    """count = tail = 0 for every request is the dense view: the rows and order of the kernel
    without a selection (whose `columns` are never read), so the outputs are equal."""
    case = PagedCase(
        LAYOUTS["gqa32x8-d128"],
        CONTEXTS["b7-mixed"],
        bits,
        dtype,
        stream_heads=(0, 3) if streams else None,
        stream_contexts=STREAM_CONTEXTS if streams else None,
    )
    sel = make_selection(case, case.kv_heads, k=4, seed=4, dense=True)
    bound = max(case.contexts + case.stream_contexts)
    got = run_selected(case, sel, case.kv_heads, max_context_len=bound)
    assert torch.equal(got, case.run())


@gpu
@pytest.mark.parametrize("bits", [None, 4], ids=["kv16", "kv4"])
def test_selected_views_large_batch(bits: int | None) -> None:
    contexts = torch.randint(1, 3000, (64,), generator=torch.Generator().manual_seed(5)).tolist()
    case = PagedCase(LAYOUTS["gqa32x8-d128"], contexts, bits, torch.float16)
    sel = make_selection(case, case.kv_heads, k=31, seed=6)
    _check(
        run_selected(case, sel, case.kv_heads), reference(case, sel, case.kv_heads), torch.float16
    )


@gpu
def test_bad_selection_inputs_are_named() -> None:
    case = PagedCase(LAYOUTS["gqa4x2-d64"], [20, 300], None, torch.float16)
    sel = make_selection(case, case.kv_heads, k=4, seed=7)
    ops = kernel.EXTENSION.load()
    (k, _), (v, _) = case.operands
    args = (case.q, k, v, None, None, None, None, case.page_table, case.seq_rows, case.context_lens)
    base = case.head_base.cuda()
    views = sel.pages()
    good = (views.columns, views.count, views.tail)

    def call(window: int, head_base: torch.Tensor | None, *selection: torch.Tensor | None) -> None:
        ops.decode_attention(
            *args, 16, 2, 300, window, 0.125, 128, head_base, None, None, None, *selection
        )

    call(0, base, *good)  # the good inputs pass
    bad = {
        "pass all of sel_columns, sel_count and sel_tail or none": (0, base, *good[:2], None),
        "streaming heads and page selections need head_base": (0, None, *good),
        "page selection and a sliding window do not combine, got window 8": (8, base, *good),
        "sel_columns must be int32 [rows >= 4, 2, k >= 1]": (0, base, good[0][:, :1], *good[1:]),
        "sel_count must be a contiguous vector of 2 entries": (
            0,
            base,
            good[0],
            good[1][:1],
            good[2],
        ),
        "sel_tail must be int32, got Long": (0, base, *good[:2], good[2].long()),
    }
    for message, inputs in bad.items():
        with pytest.raises(RuntimeError, match=re.escape(message)):
            call(*inputs)


# --- page scores ----------------------------------------------------------------------------


@dataclass
class ScoreCase:
    """Key statistics of a layer's KV heads (each at its own base row, regions shuffled with
    unused rows between them, min <= max), strided post-RoPE queries, and g requests' page-table
    rows of random pages; `run` scores with the kernel, `reference` with page_selection's."""

    q: torch.Tensor
    stats: torch.Tensor
    head_base: torch.Tensor
    page_table: torch.Tensor
    seq_rows: torch.Tensor
    candidates: torch.Tensor
    page_size: int
    logical_tokens: int

    @classmethod
    def random(
        cls,
        layout: tuple[int, int, int],
        batch: int,
        max_pages: int,
        dtype: torch.dtype,
        page_size: int,
        logical_per_page: int,
        seed: int,
    ) -> ScoreCase:
        heads, kv_heads, head_dim = layout
        g = torch.Generator(device="cuda").manual_seed(seed)
        cpu = torch.Generator().manual_seed(seed)
        pool = max_pages + 5  # pages per KV head's region
        base = torch.empty(kv_heads, dtype=torch.int64)
        rows = 0
        for h in torch.randperm(kv_heads, generator=cpu).tolist():
            rows += page_size  # rows no head owns
            base[h] = rows
            rows += pool * page_size
        logical_tokens = page_size // logical_per_page
        lo = torch.randn(rows // logical_tokens + 1, head_dim, generator=g, device="cuda").to(dtype)
        spread = torch.rand(lo.shape, generator=g, device="cuda") * 2
        hi = (lo.float() + spread).to(dtype)  # rounding is monotone: hi >= lo still
        stats = torch.stack([lo, hi], 1)
        stats[:, :, ::7] *= 4  # outlier channels, as post-RoPE keys have
        # Queries as a view into a fused qkv buffer: strided heads and requests.
        qkv = torch.randn(batch, heads + 2 * kv_heads, head_dim, generator=g, device="cuda")
        q = (2 * qkv).to(dtype)[:, :heads]
        page_table = torch.randint(pool, (batch + 2, max_pages), generator=cpu, dtype=torch.int32)
        seq_rows = torch.randperm(batch + 2, generator=cpu)[:batch].int()
        # Every count of candidates: none, a few, all, and more than are scored.
        candidates = torch.randint(max_pages + 3, (batch,), generator=cpu, dtype=torch.int32)
        candidates[0] = 0
        if batch > 1:
            candidates[1] = max_pages
        return cls(
            q,
            stats,
            base.cuda(),
            page_table.cuda(),
            seq_rows.cuda(),
            candidates.cuda(),
            page_size,
            logical_tokens,
        )

    def run(
        self, select_kv: torch.Tensor, select_q0: torch.Tensor, group: int, columns: int
    ) -> torch.Tensor:
        out = torch.full(
            (self.q.shape[0], len(select_kv), columns), math.nan, device="cuda"
        )  # every entry must be written
        page_select.page_scores(
            self.q,
            self.stats,
            self.head_base,
            select_kv.cuda(),
            select_q0.cuda(),
            self.page_table,
            self.seq_rows,
            self.candidates,
            out,
            group=group,
            page_size=self.page_size,
            logical_tokens=self.logical_tokens,
        )
        return out

    def reference(
        self, select_kv: torch.Tensor, select_q0: torch.Tensor, group: int, columns: int
    ) -> torch.Tensor:
        pages = self.page_table[self.seq_rows.long(), :columns].long()
        base = self.head_base[select_kv.cuda()]
        stat_rows = ps.page_stat_rows(base, pages, self.page_size, self.logical_tokens)
        q_heads = select_q0.cuda()[:, None] + torch.arange(group, device="cuda")
        return ps.page_scores(
            self.q[:, q_heads],
            self.stats,
            stat_rows.permute(0, 2, 1),
            self.candidates,
            self.page_size // self.logical_tokens,
        )


def selecting_heads(
    layout: tuple[int, int, int], per_query_head: bool, skip: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(select_kv, select_q0, group) of the KV heads not in `skip` (streaming ones, say): each KV
    head with its GQA group, or each of its query heads alone."""
    heads, kv_heads, _ = layout
    group = heads // kv_heads
    kv = torch.tensor([h for h in range(kv_heads) if h not in skip], dtype=torch.int64)
    if per_query_head:
        q = (kv[:, None] * group + torch.arange(group)).flatten()
        return q // group, q, 1
    return kv, kv * group, group


SCORE_LAYOUTS = {
    "gqa32x8-d128": (32, 8, 128),
    "gqa16x2-d128": (16, 2, 128),  # groups of 8
    "gqa4x2-d64": (4, 2, 64),
    "mha4-d128": (4, 4, 128),
    "gqa8x1-d64": (8, 1, 64),
}
LOGICAL = {  # (page size, logical pages per page)
    "p64-l4": (64, 4),
    "p16-l1": (16, 1),
    "p32-l2": (32, 2),
    "p48-l3": (48, 3),
    "p64-l8": (64, 8),
    "p64-l16": (64, 16),
}
SCORE_TOLERANCE = {"atol": 5e-3, "rtol": 1e-5}
"""fp32 sums of head_dim terms in another order (and with FMAs) than torch's."""


@gpu
@pytest.mark.parametrize("logical", LOGICAL.values(), ids=LOGICAL.keys())
@pytest.mark.parametrize("per_query_head", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("layout", SCORE_LAYOUTS.values(), ids=SCORE_LAYOUTS.keys())
def test_page_scores_match_reference(
    layout: tuple[int, int, int],
    dtype: torch.dtype,
    per_query_head: bool,
    logical: tuple[int, int],
) -> None:
    page_size, per_page = logical
    case = ScoreCase.random(layout, 5, 37, dtype, page_size, per_page, seed=8)
    select_kv, select_q0, group = selecting_heads(layout, per_query_head)
    for columns in (37, 30):  # all of the page table's columns, or fewer
        got = case.run(select_kv, select_q0, group, columns)
        torch.testing.assert_close(
            got, case.reference(select_kv, select_q0, group, columns), **SCORE_TOLERANCE
        )


@gpu
@pytest.mark.parametrize("per_query_head", MODES.values(), ids=MODES.keys())
def test_page_scores_of_some_heads(per_query_head: bool) -> None:
    """Only the dense heads select (here KV heads 0, 2, 3 and 6 of 8 stream)."""
    layout = SCORE_LAYOUTS["gqa32x8-d128"]
    case = ScoreCase.random(layout, 3, 50, torch.bfloat16, 64, 4, seed=9)
    select_kv, select_q0, group = selecting_heads(layout, per_query_head, skip=(0, 2, 3, 6))
    got = case.run(select_kv, select_q0, group, 50)
    want = case.reference(select_kv, select_q0, group, 50)
    torch.testing.assert_close(got, want, **SCORE_TOLERANCE)


@gpu
@pytest.mark.parametrize("per_query_head", MODES.values(), ids=MODES.keys())
def test_page_scores_long_contexts(per_query_head: bool) -> None:
    """128K tokens at page 64 for 8 requests: blocks span several rounds of columns."""
    layout = SCORE_LAYOUTS["gqa32x8-d128"]
    case = ScoreCase.random(layout, 8, 2048, torch.bfloat16, 64, 4, seed=10)
    case.candidates[2:] = 2048 - torch.arange(6, dtype=torch.int32, device="cuda")
    select_kv, select_q0, group = selecting_heads(layout, per_query_head)
    got = case.run(select_kv, select_q0, group, 2048)
    want = case.reference(select_kv, select_q0, group, 2048)
    torch.testing.assert_close(got, want, **SCORE_TOLERANCE)


@gpu
def test_page_scores_choose_the_reference_pages() -> None:
    """The selection the engine makes from the kernel's scores is the reference's: top_pages of
    both, up to a rare near-tie (the kernel and torch sum in different orders)."""
    layout = SCORE_LAYOUTS["gqa32x8-d128"]
    case = ScoreCase.random(layout, 4, 300, torch.float16, 64, 4, seed=11)
    select_kv, select_q0, group = selecting_heads(layout, False)
    got = ps.top_pages(case.run(select_kv, select_q0, group, 300), 63)
    want = ps.top_pages(case.reference(select_kv, select_q0, group, 300), 63)
    # A near-tie at the k-th score may swap one column (and shift the ascending list) in a few.
    assert int((got != want).any(-1).sum()) <= 1


@gpu
def test_bad_score_inputs_are_named() -> None:
    layout = SCORE_LAYOUTS["gqa4x2-d64"]
    case = ScoreCase.random(layout, 2, 8, torch.float16, 16, 4, seed=12)
    select_kv, select_q0, group = selecting_heads(layout, False)
    select_kv, select_q0 = select_kv.cuda(), select_q0.cuda()
    out = torch.empty(2, 2, 8, device="cuda")
    ops = page_select.EXTENSION.load()

    def call(**change: object) -> None:
        kwargs: dict[str, object] = {
            "q": case.q,
            "stats": case.stats,
            "head_base": case.head_base,
            "select_kv": select_kv,
            "select_q0": select_q0,
            "page_table": case.page_table,
            "seq_rows": case.seq_rows,
            "candidates": case.candidates,
            "out": out,
            "group": group,
            "page_size": 16,
            "logical_tokens": 4,
        }
        ops.page_scores(**{**kwargs, **change})

    call()
    bad = {
        "head_dim must be 64 or 128, got 32": {"q": case.q[..., :32]},
        "stats must be contiguous, 16-byte aligned Half [rows, 2, 64]": {
            "stats": case.stats.bfloat16()
        },
        "select_kv must be a contiguous int64 vector": {"select_kv": select_kv.int()},
        "select_q0 must have one entry per selecting head (2), got 1": {"select_q0": select_q0[:1]},
        "candidates must have one entry per request (2), got 1": {
            "candidates": case.candidates[:1]
        },
        "out must be fp32 [2, 2, columns <= 8]": {"out": torch.empty(2, 2, 9, device="cuda")},
        "group must be 1, 2, 4 or 8 query heads, got 3": {"group": 3},
        "logical pages of 5 tokens must divide pages of 16": {"logical_tokens": 5},
    }
    for message, change in bad.items():
        with pytest.raises(RuntimeError, match=re.escape(message)):
            call(**change)


# --- key statistics folded by the fused RoPE + KV write --------------------------------------


def _cache_rows(fmt: int | str | None, rows: int, head_dim: int, dtype: torch.dtype) -> CacheRows:
    """Random rows of one cache format: dense, per-row KV8/KV4, per-tensor static KV8."""
    g = torch.Generator(device="cuda").manual_seed(14)
    if fmt is None:
        return DenseRows(torch.randn(rows, head_dim, generator=g, device="cuda").to(dtype))
    if fmt == "static":
        codes = torch.randint(-127, 128, (rows, head_dim), generator=g, device="cuda")
        return StaticInt8Rows(codes.to(torch.int8), torch.tensor(0.05, device="cuda"), dtype)
    assert isinstance(fmt, int)
    width = head_dim * fmt // 8
    codes = torch.randint(256, (rows, width), generator=g, device="cuda").to(torch.uint8)
    params = torch.rand(rows, 2, generator=g, device="cuda").half()
    return QuantizedRows(codes, params, fmt, dtype)


def _clone(rows: CacheRows) -> CacheRows:
    if isinstance(rows, DenseRows):
        return DenseRows(rows.data.clone())
    if isinstance(rows, StaticInt8Rows):
        return StaticInt8Rows(rows.codes.clone(), rows.scale, rows.dtype)
    assert isinstance(rows, QuantizedRows)
    return QuantizedRows(rows.codes.clone(), rows.params.clone(), rows.bits, rows.dtype)


@gpu
@pytest.mark.parametrize("fmt", [None, 8, 4, "static"], ids=["kv16", "kv8", "kv4", "kv8static"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_rope_kv_write_folds_key_stats(
    head_dim: int, dtype: torch.dtype, fmt: int | str | None
) -> None:
    """A decode step: 12 tokens on distinct pages, at first slots of logical pages (reset) and
    elsewhere (fold), and 3 padding tokens on the null page's slot 0. The statistics equal
    update_key_stats' of the keys the kernel returns, except the null page's first logical page
    (where the padding tokens' resets race, in torch's index_put as well); everything else the
    kernel writes and returns is as without statistics."""
    heads, kv_heads, page, logical_tokens = 8, 4, 16, 4
    num_slots = 40 * page
    cpu = torch.Generator().manual_seed(15)
    g = torch.Generator(device="cuda").manual_seed(15)
    offsets = torch.randint(page, (12,), generator=cpu)
    offsets[::3] = offsets[::3] // logical_tokens * logical_tokens  # some first slots
    pages = torch.randperm(39, generator=cpu)[:12] + 1
    slots = torch.cat([pages * page + offsets, torch.zeros(3, dtype=torch.int64)])
    write_index = (torch.arange(kv_heads)[:, None] * num_slots + slots).cuda()
    tokens = len(slots)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=g, device="cuda")
    qkv = qkv.to(dtype)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], 1)
    angles = torch.rand(tokens, 1, head_dim // 2, generator=g, device="cuda") * 6.3
    rope = (angles.cos().to(dtype), angles.sin().to(dtype))
    lo = torch.randn(
        kv_heads * num_slots // logical_tokens + 1, head_dim, generator=g, device="cuda"
    )
    stats = torch.stack([lo, lo + 1], 1).to(dtype)
    keep = torch.tensor([True, False, True, True], device="cuda")

    k_rows, v_rows = (_cache_rows(fmt, kv_heads * num_slots, head_dim, dtype) for _ in range(2))
    plain = rope_kv.rope_kv_write(q, k, v, rope, write_index, _clone(k_rows), _clone(v_rows))
    key_stats = rope_kv.KeyStats(stats.clone(), keep, logical_tokens)
    got = rope_kv.rope_kv_write(q, k, v, rope, write_index, k_rows, v_rows, key_stats)
    for a, b in zip(got, plain):
        assert torch.equal(a, b)
    want = stats.clone()
    ps.update_key_stats(want, write_index[keep], got[1][:, keep].transpose(0, 1), logical_tokens)
    null = torch.arange(kv_heads, device="cuda") * num_slots // logical_tokens
    raced = torch.zeros(len(want), dtype=torch.bool, device="cuda")
    raced[null] = True
    raced[-1] = True  # the scratch row: where the reference sends non-first tokens' resets
    assert torch.equal(key_stats.stats[~raced], want[~raced])

    ops = rope_kv.EXTENSION.load()
    (kd, kp), (vd, vp) = k_rows.kernel_operands(), v_rows.kernel_operands()
    args = (q, k, v, *rope, write_index, kd, vd)
    operands = (kp, vp, None, None)
    if fmt == "static":
        operands = (None, None, kp, vp)
    elif fmt is None:
        operands = (None, None, None, None)
    with pytest.raises(RuntimeError, match="pass both stats and stat_heads or neither"):
        ops.rope_kv_write(*args, *operands, stats, None, logical_tokens)
    with pytest.raises(
        RuntimeError, match=re.escape("stat_heads must be a contiguous bool vector of 4")
    ):
        ops.rope_kv_write(*args, *operands, stats, keep[:3], logical_tokens)
    with pytest.raises(RuntimeError, match="stats must be contiguous"):
        ops.rope_kv_write(*args, *operands, stats[:5], keep, logical_tokens)


# --- the wrappers' checks (CPU) -------------------------------------------------------------


def test_selected_pages_checks_its_tensors() -> None:
    good = {
        "columns": torch.zeros(4, 2, 3, dtype=torch.int32),
        "count": torch.zeros(3, dtype=torch.int32),
        "tail": torch.zeros(3, dtype=torch.int32),
    }
    kernel.SelectedPages(**good)
    bad = {
        "SelectedPages.columns must be a 3-D torch.int32 tensor, got torch.int64 [4, 2, 3]": {
            "columns": good["columns"].long()
        },
        "SelectedPages.count must be a 1-D torch.int32 tensor, got torch.int32 [3, 1]": {
            "count": good["count"][:, None]
        },
        "SelectedPages.tail is on meta, columns on cpu": {"tail": good["tail"].to("meta")},
        "SelectedPages.count [3] and tail [2] must have one entry per request each": {
            "tail": good["tail"][:2]
        },
    }
    for message, change in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            kernel.SelectedPages(**{**good, **change})


def test_decode_attention_needs_one_layout_for_a_selection() -> None:
    """A selection runs with per-head base rows, from head_base or from StreamingHeads, never
    both; the wrapper says so before it loads (or needs) the extension."""
    q = torch.zeros(3, 4, 64, dtype=torch.float16)
    rows = (torch.zeros(64, 64, dtype=torch.float16), None)
    table, lens = torch.zeros(3, 2, dtype=torch.int32), torch.ones(3, dtype=torch.int32)
    base = torch.arange(2) * 32
    streaming = kernel.StreamingHeads(base, torch.tensor([True, False]), table, lens)
    selected = kernel.SelectedPages(torch.zeros(3, 2, 1, dtype=torch.int32), lens - 1, lens - 1)
    common = {
        "page_size": 16,
        "num_kv_heads": 2,
        "max_context_len": 32,
        "scale": 0.125,
        "partition": 128,
    }
    with pytest.raises(ValueError, match="pass head_base or streaming"):
        kernel.decode_attention(
            q, rows, rows, table, lens, lens, **common, streaming=streaming, head_base=base
        )
    with pytest.raises(ValueError, match="selected pages need the heads' base rows"):
        kernel.decode_attention(q, rows, rows, table, lens, lens, **common, selected=selected)


def test_page_select_unsupported() -> None:
    assert page_select.unsupported(128, 4, torch.bfloat16) is None
    assert page_select.unsupported(64, 1, torch.float16) is None
    assert "head_dim 96" in str(page_select.unsupported(96, 4, torch.float16))
    assert "3 query heads per selecting head" in str(page_select.unsupported(128, 3, torch.float16))
    assert "torch.float32" in str(page_select.unsupported(128, 4, torch.float32))
