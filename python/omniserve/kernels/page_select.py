"""Page scores of query-aware page selection (`cuda/page_scores.cu`) next to their torch reference.

The reference, and the contract (statistics layout, scores, the -inf past the candidates), is
`formats/page_selection.page_scores`; the kernel computes the same bound from the same key
statistics, reading each request's pages through the page table itself instead of taking
gathered stat rows, for every selecting head of a layer in one launch. `unsupported` says which
layers it cannot serve. The top-k (`page_selection.top_pages`) stays in torch.
"""

from __future__ import annotations

import torch

from omniserve.kernels.build import Extension

EXTENSION = Extension(
    "omniserve_page_select",
    ("page_scores.cu", "page_scores_bindings.cpp"),
    # No transcendental or division to speed up; flush-to-zero would only lose tiny scores.
    fast_math=False,
)

HEAD_DIMS = (64, 128)
GROUP_SIZES = (1, 2, 4, 8)
"""Query heads one selecting head scores with (1: per-query-head selection)."""
DTYPES = (torch.float16, torch.bfloat16)


def unsupported(head_dim: int, group: int, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot score for a layer of this head_dim, selecting group size and compute
    dtype, None if it can."""
    if dtype not in DTYPES:
        return f"dtype {dtype} not supported (float16, bfloat16)"
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} not supported ({', '.join(map(str, HEAD_DIMS))})"
    if group not in GROUP_SIZES:
        return (
            f"{group} query heads per selecting head not supported "
            f"({', '.join(map(str, GROUP_SIZES))})"
        )
    return None


def page_scores(
    q: torch.Tensor,
    stats: torch.Tensor,
    head_base: torch.Tensor,
    select_kv: torch.Tensor,
    select_q0: torch.Tensor,
    page_table: torch.Tensor,
    seq_rows: torch.Tensor,
    candidates: torch.Tensor,
    out: torch.Tensor,
    *,
    group: int,
    page_size: int,
    logical_tokens: int,
) -> None:
    """Scores of the first P page-table columns of g requests for S selecting heads, into `out`
    (fp32 [g, S, P], every entry written): `formats/page_selection.page_scores` of

        q[:, select_q0[s] + arange(group)]           (the group's queries of selecting head s)
        stat rows (head_base[select_kv[s]] + page_table[seq_rows[b], c] * page_size)
                  // logical_tokens                  (`page_selection.page_stat_rows`)

    q [g, Hq, head_dim] fp16/bf16 after RoPE (channels contiguous, heads 16-byte aligned; other
    strides free); stats [stat rows + 1, 2, head_dim] in q's dtype (`page_selection`'s layout),
    contiguous; head_base int64 [kv_heads] (each KV head's row of slot 0, a multiple of
    page_size); select_kv / select_q0 int64 [S]: the KV head and first query head of each
    selecting head; page_table int32 [R, P_max] with P <= P_max; seq_rows int32 [g]: each
    request's page-table row; candidates int32 [g]: columns from candidates[b] on score -inf
    (their page-table entries are not read). group: query heads per selecting head (the GQA
    group size when a group selects together, 1 per query head); page_size / logical_tokens:
    the logical pages per page (any whole number). Index values are not checked against the
    tensors they index (that would need them on the host). Allocates nothing and never
    synchronizes: CUDA graphs capture it."""
    EXTENSION.load().page_scores(
        q,
        stats,
        head_base,
        select_kv,
        select_q0,
        page_table,
        seq_rows,
        candidates,
        out,
        group,
        page_size,
        logical_tokens,
    )
