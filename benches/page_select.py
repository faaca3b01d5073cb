"""Query-aware page selection's decode kernels on the GPU: page scoring, and decode attention over
the selected pages against dense decode attention over the whole context.

For a Llama-3-8B layer (32 query / 8 KV heads, head_dim 128, fp16; pages of 64 tokens, logical
pages of 16, so 4 per page) and B requests of C tokens (128K by default, batch 1 and 8), times
(CUDA events, L2 flushed before each call, median of repeats; `omniserve.bench.kernels_attention`'s
method) and reports GB/s on the bytes each call reads:
- `score kv_head`: the scoring kernel, each KV head for its GQA group of 4 (8 selecting heads), over
  the C / 64 − 1 columns before the newest page; bytes: the statistics of those pages (4 logical
  pages x 2 rows x 256 B each, per KV head), queries, page-table entries and the fp32 scores;
- `score query_head`: the same for each query head alone (32 selecting heads, 4 per KV head). The
  bytes are the same statistics, read once per query head from the GPU's point of view but mostly
  from L2 (the four heads of a KV head read them together); GB/s counts them once;
- `torch score kv_head` / `torch top-k`: the torch reference of the scores
  (`page_selection.page_scores`), and `top_pages` on the kernel's scores (the selection's other
  step, in torch in the engine);
- per cache format (fp16, KV8, KV4, static KV8): `dense <fmt>`, the decode kernel over all C
  tokens; `selected <fmt>`, the decode kernel over each request's selected view (the budget's
  k = budget / 64 − 1 chosen pages and the newest one: `budget` tokens) with the same cache, and
  `selected_qh <fmt>` over per-query-head views (a launch "as MHA": each query head reads its own
  `budget` tokens). Bytes: K and V rows read (as `kernels_attention` counts them), queries,
  outputs, page-table entries and selected columns read.
`speedup` is the dense call's time over the selected call's (add the scoring's share per step,
1 / interval of it, for the whole cost of a step).

    python benches/page_select.py --batches 1 8 --context 131072 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
from functools import partial
from typing import Any

import torch

from omniserve.bench.kernels_attention import (
    COPY_CEILING_GBPS,
    HEAD_DIM,
    HEADS,
    KV_FORMATS,
    KV_HEADS,
    PAGE_SIZE,
    _PagedCase,
    _row_bytes,
    _time_us,
)
from omniserve.formats import page_selection as ps
from omniserve.kernels import page_select
from omniserve.kernels.attention import SelectedPages, decode_attention

LOGICAL_TOKENS = 16
GROUP = HEADS // KV_HEADS


def _row(name: str, base: dict[str, Any], us: float, nbytes: int, **extra: Any) -> dict[str, Any]:
    gbps = nbytes / us / 1e3
    return {
        **base,
        "variant": name,
        "us": us,
        "bytes": nbytes,
        "gbps": gbps,
        "frac_of_copy_ceiling": gbps / COPY_CEILING_GBPS,
        **extra,
    }


def _score_rows(
    q: torch.Tensor, page_table: torch.Tensor, num_slots: int, base: dict[str, Any], repeats: int
) -> list[dict[str, Any]]:
    """The scoring kernel in both modes, the torch reference of its kv_head scores, top-k."""
    batch, pages = page_table.shape
    candidates = pages - 1  # every column before the newest page
    stat_rows = KV_HEADS * num_slots // LOGICAL_TOKENS
    stats = torch.randn(stat_rows + 1, 2, HEAD_DIM, device="cuda", dtype=torch.float16)
    stats = torch.stack([stats.amin(1), stats.amax(1)], 1)  # min <= max, as update_key_stats keeps
    head_base = torch.arange(KV_HEADS, device="cuda") * num_slots
    seq_rows = torch.arange(batch, dtype=torch.int32, device="cuda")
    tails = torch.full((batch,), candidates, dtype=torch.int32, device="cuda")
    logical_per_page = PAGE_SIZE // LOGICAL_TOKENS
    stat_bytes = batch * KV_HEADS * candidates * logical_per_page * 2 * HEAD_DIM * 2
    rows = []
    scores: dict[str, torch.Tensor] = {}
    for mode, group in (("kv_head", GROUP), ("query_head", 1)):
        heads = torch.arange(HEADS // group, device="cuda")
        out = torch.empty(batch, len(heads), candidates, device="cuda")
        run = partial(
            page_select.page_scores,
            q,
            stats,
            head_base,
            heads * group // GROUP,  # each one's KV head
            heads * group,  # its first query head
            page_table,
            seq_rows,
            tails,
            out,
            group=group,
            page_size=PAGE_SIZE,
            logical_tokens=LOGICAL_TOKENS,
        )
        run()
        scores[mode] = out
        other = q.nbytes + batch * candidates * 4 + out.nbytes  # queries, page table, scores
        rows.append(_row(f"score {mode}", base, _time_us(run, repeats), stat_bytes + other))

    pages_read = page_table[:, :candidates].long()
    stat_index = ps.page_stat_rows(head_base, pages_read, PAGE_SIZE, LOGICAL_TOKENS)
    q_groups = q.view(batch, KV_HEADS, GROUP, HEAD_DIM)

    def reference() -> torch.Tensor:
        return ps.page_scores(q_groups, stats, stat_index.permute(0, 2, 1), tails, logical_per_page)

    need = 3 * batch * KV_HEADS * candidates * logical_per_page * GROUP * HEAD_DIM * 4
    if need * 1.2 < torch.cuda.mem_get_info()[0]:
        want = reference()
        ref_us = _time_us(reference, repeats)
        rows.append(
            _row(
                "torch score kv_head",
                base,
                ref_us,
                rows[0]["bytes"],
                max_abs_diff_vs_kernel=float((want - scores["kv_head"]).abs().max()),
            )
        )
        del want
    else:
        rows.append({**base, "variant": "torch score kv_head", "skipped": "not enough memory"})
    k = base["budget"] // PAGE_SIZE - 1
    top_us = _time_us(lambda: ps.top_pages(scores["kv_head"], k), repeats)
    rows.append(_row("torch top-k", base, top_us, scores["kv_head"].nbytes))
    return rows


def _selection(batch: int, pages: int, heads: int, k: int) -> SelectedPages:
    """k sorted random columns below the newest page per (request, head); the newest page last."""
    chosen = torch.rand(batch, heads, pages - 1, device="cuda").argsort(-1)[..., :k]
    columns = chosen.sort(-1).values.int()
    count = torch.full((batch,), k, dtype=torch.int32, device="cuda")
    return SelectedPages(columns, count, torch.full_like(count, pages - 1))


def _decode_rows(
    case: _PagedCase, num_slots: int, base: dict[str, Any], repeats: int
) -> list[dict[str, Any]]:
    batch, pages = case.page_table.shape
    budget = base["budget"]
    k = budget // PAGE_SIZE - 1
    view = k * PAGE_SIZE + case.context - (pages - 1) * PAGE_SIZE  # tokens each view holds
    shared = _selection(batch, pages, KV_HEADS, k)
    per_query = _selection(batch, pages, HEADS, k)
    head_base = torch.arange(KV_HEADS, device="cuda") * num_slots
    io = 2 * case.q.nbytes
    rows = []
    for seed, (name, bits) in enumerate(KV_FORMATS.items()):
        kv_bytes = 2 * batch * KV_HEADS * case.context * _row_bytes(bits)
        if kv_bytes * 1.1 > torch.cuda.mem_get_info()[0]:
            rows.append({**base, "variant": f"dense {name}", "skipped": "not enough memory"})
            continue
        cache = case.cache(bits, seed)
        dense_us = _time_us(partial(case.ours, cache), repeats)
        rows.append(_row(f"dense {name}", base, dense_us, case.nbytes(bits)))
        views = (("selected", shared, KV_HEADS), ("selected_qh", per_query, HEADS))
        for label, sel, launched in views:
            run = partial(
                decode_attention,
                case.q,
                cache[0].kernel_operands(),
                cache[1].kernel_operands(),
                case.page_table,
                case.seq_rows,
                case.lens,
                page_size=PAGE_SIZE,
                num_kv_heads=launched,
                max_context_len=view,
                scale=HEAD_DIM**-0.5,
                selected=sel,
                head_base=head_base.repeat_interleave(launched // KV_HEADS),
            )
            run()
            nbytes = 2 * batch * launched * view * _row_bytes(bits) + io
            nbytes += batch * launched * k * 4 + batch * (k + 1) * 4  # columns, page-table entries
            us = _time_us(run, repeats)
            rows.append(_row(f"{label} {name}", base, us, nbytes, speedup=dense_us / us))
        del cache
        torch.cuda.empty_cache()
    return rows


def measure(batch: int, context: int, budget: int, repeats: int) -> list[dict[str, Any]]:
    pages = math.ceil(context / PAGE_SIZE)
    num_pages = 1 + batch * pages
    num_slots = num_pages * PAGE_SIZE
    page_table = (1 + torch.randperm(num_pages - 1, device="cuda")).int().view(batch, pages)
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.float16)
    base = {"op": "page_select", "batch": batch, "context": context, "budget": budget}
    rows = _score_rows(q, page_table, num_slots, base, repeats)
    torch.cuda.empty_cache()
    rows += _decode_rows(_PagedCase(q, page_table, context, num_slots), num_slots, base, repeats)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'batch':>5} {'context':>8} {'variant':>22} {'µs':>10} {'GB/s':>8} {'% copy':>7} "
        f"{'speedup':>8}"
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(
                f"{r['batch']:>5} {r['context']:>8} {r['variant']:>22}  skipped: {r['skipped']}"
            )
            continue
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        lines.append(
            f"{r['batch']:>5} {r['context']:>8} {r['variant']:>22} {r['us']:>10.2f} "
            f"{r['gbps']:>8.0f} {100 * r['frac_of_copy_ceiling']:>6.0f}% {speedup:>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--budget", type=int, default=4096, help="tokens per selected view")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls; the median is kept")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the page-selection benchmark needs a CUDA device")
    if args.budget % PAGE_SIZE or args.budget < 2 * PAGE_SIZE or args.budget >= args.context:
        parser.error(f"--budget must be whole pages of {PAGE_SIZE}, >= 2 of them, below --context")
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for batch in args.batches:
            rows += measure(batch, args.context, args.budget, args.repeats)
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
