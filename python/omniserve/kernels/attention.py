"""Paged decode attention (`cuda/decode_attention.cu`) next to its torch reference.

The reference is `PagedAttention`'s gather path (`layers/attention.py`); `decode_attention` here
is the CUDA kernel over the same cache rows, driven by the engine's int32 page table and context
lengths instead of gathered row indices. `unsupported` says which layer shapes the kernel does
not handle; kernels/dispatch.py decides, once per model, which path every layer's decodes take.
"""

from __future__ import annotations

import math
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
) -> torch.Tensor:
    """Attention of one query token per request over its paged cache, [B, q_heads, head_dim].

    q [B, q_heads, head_dim] fp16/bf16; k_rows / v_rows: (rows, params) of one layer's cache as
    `CacheRows.kernel_operands` gives them (`runner/kv_cache.py`): params None for a cache in q's
    dtype, fp16 [rows, 2] scale and zero beside uint8 codes, or a one-element fp32 scale beside the
    int8 codes of per-tensor static KV8; page_table int32 [R, max_pages]; seq_rows int32 [B] (each
    request's page-table row); context_lens int32 [B] (tokens each request attends, its new token
    included, all >= 1); max_context_len >= every context length (sizes the launch: a smaller
    value yields NaN outputs, never a silent truncation); window: attend only the last `window`
    tokens.
    """
    (k, k_params), (v, v_params) = k_rows, v_rows
    kv4 = k.dtype == torch.uint8 and 2 * k.shape[-1] == q.shape[-1]
    visible = max_context_len if window is None else min(max_context_len, window)
    if partition is None:
        partition = choose_partition(q.shape[0], num_kv_heads, max(visible, 1), q.device, kv4)
    (k_params, k_scale), (v_params, v_scale) = map(row_params_or_scale, (k_params, v_params))
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
    )
