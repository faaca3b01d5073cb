"""Paged decode attention (`cuda/decode_attention.cu`) next to its torch reference.

The reference is `PagedAttention`'s gather path (`layers/attention.py`); `decode_attention` here
is the CUDA kernel over the same cache rows, driven by the engine's int32 page table and context
lengths instead of gathered row indices. `unsupported` says which layer shapes the kernel does
not handle; kernels/dispatch.py decides, once per model, which path every layer's decodes take.
A layer with streaming heads (LServe) passes `StreamingHeads`: its dense and streaming KV heads
then attend in the same launch, each through its own table. With page selection (LServe's dynamic
sparsity, `formats/page_selection.py`) it passes `SelectedPages`: every dense head then attends
its request's selected view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

from omniserve.formats.kv import row_params_or_scale
from omniserve.kernels.build import Extension

EXTENSION = Extension(
    "omniserve_decode_attention",
    (
        "decode_attention.cu",
        "decode_attention_kv16.cu",
        "decode_attention_kv8.cu",
        "decode_attention_kv4.cu",
        "decode_attention_kv8_static.cu",
        "decode_attention_fp8_static.cu",
        "decode_attention_bindings.cpp",
    ),
    # Safe: the approximate exp2 and division err far below the fp16/bf16 rounding of the output,
    # and the code conversions are integer tricks that fast math does not touch.
    fast_math=True,
)

HEAD_DIMS = (64, 128)
GROUP_SIZES = (1, 2, 4, 8)
"""Query heads per KV head the kernel is instantiated for (MHA = 1)."""
PARTITIONS = (1024, 512, 256, 128)
"""Tokens per split of the three-phase kernel (16-bit and KV8 rows), largest first. Longer
partitions stream more bytes per block between synchronizations, which brings long contexts
closer to the copy rate (1024 was added for that; time it with `benches/kernels.py`)."""
KV4_PARTITIONS = (4096, 2048, 1024, 512, 256, 128)
"""Tokens per split of the streaming KV4 kernel, largest first. It keeps no per-token state, so a
split may be long: one split per request, where that still fills the GPU, also saves the combine
step (time it with `benches/kernels.py`)."""


@cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


DTYPES = (torch.float16, torch.bfloat16)


def unsupported(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot handle a layer of this shape and compute dtype, None if it can."""
    if dtype not in DTYPES:
        return f"dtype {dtype} not supported (float16, bfloat16)"
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} not supported ({', '.join(map(str, HEAD_DIMS))})"
    if num_heads % num_kv_heads or num_heads // num_kv_heads not in GROUP_SIZES:
        return (
            f"{num_heads} query heads over {num_kv_heads} KV heads not supported (query heads "
            f"per KV head: {', '.join(map(str, GROUP_SIZES))})"
        )
    return None


def choose_partition(
    batch: int, num_kv_heads: int, visible_len: int, device: torch.device, kv4: bool
) -> int:
    """The largest partition that still fills the GPU: for the three-phase kernel two blocks per
    SM, for the KV4 kernel (which streams a split without pausing) one block per SM. Small batches
    of long contexts get more, shorter partitions (more parallelism, one more combine step)."""
    partitions, target = (KV4_PARTITIONS, 1) if kv4 else (PARTITIONS, 2)
    for partition in partitions:
        if batch * num_kv_heads * math.ceil(visible_len / partition) >= target * _num_sms(device):
            return partition
    return partitions[-1]


def _check_operands(
    operands: object, expected: dict[str, tuple[torch.dtype, int]], anchor: str
) -> None:
    """ValueError unless each named field of `operands` has its (dtype, dims) and sits on the
    device of field `anchor`."""
    owner, device = type(operands).__name__, getattr(operands, anchor).device
    for name, (dtype, dim) in expected.items():
        t: torch.Tensor = getattr(operands, name)
        if t.dtype != dtype or t.dim() != dim:
            raise ValueError(
                f"{owner}.{name} must be a {dim}-D {dtype} tensor, got {t.dtype} {list(t.shape)}"
            )
        if t.device != device:
            raise ValueError(f"{owner}.{name} is on {t.device}, {anchor} on {device}")


@dataclass(frozen=True, slots=True)
class StreamingHeads:
    """Which KV heads of a layer stream and where their rows are (see `decode_attention`).

    Every KV head h has its own base row: position t of a dense head is row `head_base[h] +
    page_table[seq_rows[b], t // page_size] * page_size + t % page_size`, as without streaming
    heads (where head_base[h] is h * num_slots). A streaming head attends every virtual position
    u in [0, context_lens[b]), at row `head_base[h] + table[b, u // page_size] * page_size +
    u % page_size`: the caller builds `table` (indexed by the batch index b, not by seq_rows) to
    hold exactly the pages the head may see, oldest first. Streaming heads ignore the layer's
    sliding window. Base rows and table entries are not checked against the cache's size (that
    would need their values on the host)."""

    head_base: torch.Tensor
    """int64 [kv_heads] on the device: the row of slot 0 of each KV head."""
    is_stream: torch.Tensor
    """bool [kv_heads] on the device; the kernel reads it as is (one byte per head)."""
    table: torch.Tensor
    """int32 [B, W]: the streaming heads' pages of each request, W * page_size >= every
    streaming context length."""
    context_lens: torch.Tensor
    """int32 [B], >= 1: positions each request's streaming heads attend."""

    def __post_init__(self) -> None:
        expected = {
            "head_base": (torch.int64, 1),
            "is_stream": (torch.bool, 1),
            "table": (torch.int32, 2),
            "context_lens": (torch.int32, 1),
        }
        _check_operands(self, expected, "head_base")
        if self.is_stream.shape != self.head_base.shape:
            raise ValueError(
                f"StreamingHeads.is_stream {list(self.is_stream.shape)} must match head_base "
                f"{list(self.head_base.shape)} (one entry per KV head)"
            )
        if self.context_lens.shape[0] != self.table.shape[0]:
            raise ValueError(
                f"StreamingHeads.context_lens {list(self.context_lens.shape)} must have one entry "
                f"per table row ({self.table.shape[0]})"
            )


@dataclass(frozen=True, slots=True)
class SelectedPages:
    """The selected views the dense (non-streaming) heads attend (see `decode_attention`).

    For request b and launched KV head h, the view's virtual page j is page-table column
    `columns[seq_rows[b], h, j]` for j < count[b], else column `tail[b] + j - count[b]`, over
    `page_selection.visible_len(context_lens[b], count[b], tail[b], page_size)` positions;
    count = tail = 0 is the dense view (the same rows in the same order as without a selection).
    Entries are not checked against the page table (that would need their values on the host)."""

    columns: torch.Tensor
    """int32 [R, H, k] on the device, R >= the page table's rows (indexed by seq_rows like it),
    H the launch's KV heads: each (row, head)'s chosen columns, ascending (`top_pages`), the
    first count[b] of which are read. Each row contiguous; rows may be strided."""
    count: torch.Tensor
    """int32 [B]: columns each request's view takes from `columns` (<= k); 0 for the dense view."""
    tail: torch.Tensor
    """int32 [B]: the column of each request's first page past them (its newest pages from
    there on; `PageSelection.view`); 0 for the dense view."""

    def __post_init__(self) -> None:
        expected = {
            "columns": (torch.int32, 3),
            "count": (torch.int32, 1),
            "tail": (torch.int32, 1),
        }
        _check_operands(self, expected, "columns")
        if self.count.shape != self.tail.shape:
            raise ValueError(
                f"SelectedPages.count {list(self.count.shape)} and tail {list(self.tail.shape)} "
                f"must have one entry per request each"
            )


def decode_attention(
    q: torch.Tensor,
    k_rows: tuple[torch.Tensor, torch.Tensor | None],
    v_rows: tuple[torch.Tensor, torch.Tensor | None],
    page_table: torch.Tensor,
    seq_rows: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    page_size: int,
    num_kv_heads: int,
    max_context_len: int,
    scale: float,
    window: int | None = None,
    partition: int | None = None,
    streaming: StreamingHeads | None = None,
    selected: SelectedPages | None = None,
    head_base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query token per request over its paged cache, [B, q_heads, head_dim].

    q [B, q_heads, head_dim] fp16/bf16; k_rows / v_rows: (rows, params) of one layer's cache as
    `CacheRows.kernel_operands` gives them (`runner/kv_cache.py`): params None for a cache in q's
    dtype, fp16 [rows, 2] scale and zero beside uint8 codes, or a one-element fp32 scale beside the
    int8 codes of per-tensor static KV8; page_table int32 [R, max_pages]; seq_rows int32 [B] (each
    request's page-table row); context_lens int32 [B] (tokens each request attends, its new token
    included, all >= 1); max_context_len >= every context length, dense and streaming (sizes the
    launch: a smaller value yields NaN outputs, never a silent truncation); window: dense heads
    attend only the last `window` tokens; streaming: the layer's streaming heads and their tables
    (`StreamingHeads`), None when every head is dense. The partition is chosen for the dense
    heads' visible length, the splits cover it and streaming contexts up to min(max_context_len,
    W * page_size) (the streaming table's width W); a streaming head's splits past its context end
    at once. Nothing here synchronizes with the device or allocates by value: CUDA graphs capture
    it.

    selected: the dense heads' selected views (`SelectedPages`); a dense head's context is then
    its view's length, which is what max_context_len must bound (`PageSelection.max_visible`
    does), and no window may be given. head_base (int64 [num_kv_heads]: each launched head's
    row of slot 0, as `StreamingHeads.head_base`) gives the layout where `streaming` does not:
    a selection needs one of the two; without either the layout is the runner's, head h at rows
    h * (cache rows / num_kv_heads).

    Per-query-head selection runs as a launch "as MHA": q [B, Hq, D] with num_kv_heads = Hq, so
    that launched head i is query head i; head_base (or streaming's head_base and is_stream) is
    the layer's, repeat_interleave'd by the GQA group size Hq / kv_heads, and `columns` is
    [R, Hq, k]. Each query head then reads its own pages (and a KV page its group shares once
    per query head).
    """
    if head_base is not None and streaming is not None:
        raise ValueError("pass head_base or streaming (whose head_base it is), not both")
    if selected is not None and head_base is None and streaming is None:
        raise ValueError("selected pages need the heads' base rows: pass head_base or streaming")
    (k, k_params), (v, v_params) = k_rows, v_rows
    kv4 = k.dtype == torch.uint8 and 2 * k.shape[-1] == q.shape[-1]
    visible = max_context_len if window is None else min(max_context_len, window)
    if partition is None:
        partition = choose_partition(q.shape[0], num_kv_heads, max(visible, 1), q.device, kv4)
    (k_params, k_scale), (v_params, v_scale) = map(row_params_or_scale, (k_params, v_params))
    heads = (
        (head_base, None, None, None)
        if streaming is None
        else (streaming.head_base, streaming.is_stream, streaming.table, streaming.context_lens)
    )
    views = (None,) * 3 if selected is None else (selected.columns, selected.count, selected.tail)
    return EXTENSION.load().decode_attention(
        q,
        k,
        v,
        k_params,
        v_params,
        k_scale,
        v_scale,
        page_table,
        seq_rows,
        context_lens,
        page_size,
        num_kv_heads,
        max_context_len,
        window or 0,
        scale,
        partition,
        *heads,
        *views,
    )
