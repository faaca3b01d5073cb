"""Fused RoPE + KV cache write (`cuda/rope_kv_write.cu`) next to its torch reference.

The reference is `PagedAttention`'s own path: `layers/rotary.apply_rotary` on q and k, then each
cache's `store` (`runner/kv_cache.py`: rows in the compute dtype; `formats/kv.quantize_kv` codes
with a (scale, zero) per row, returned through `dequantize_kv`; or per-tensor static KV8,
`quantize_kv_static` codes under the layer's fixed K or V scale, returned through
`dequantize_kv_static`). That is ~8 torch ops per RoPE and up to ~25 per quantized store; the
kernel does all of it for a layer in one launch, with the same roundings, so what it returns and
stores equals the reference's bit for bit (up to the sign of a zero `zero` parameter, see the
kernel). `unsupported` says which layers it cannot serve; kernels/dispatch.py decides, once per
model, whether the attention layers use it.

With page selection, a decode step's launch can also fold the keys into the layer's key
statistics (`KeyStats`), which `formats/page_selection.update_key_stats` does otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omniserve.formats.kv import CacheRows, row_params_or_scale
from omniserve.kernels.build import Extension

EXTENSION = Extension(
    "omniserve_rope_kv_write",
    ("rope_kv_write.cu", "rope_kv_write_bindings.cpp"),
    fast_math=False,  # codes and rotated values must match the references bit for bit
)

HEAD_DIMS = (64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)


def unsupported(head_dim: int, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot serve a layer of this head_dim and compute dtype (it serves every
    cache format of `runner/kv_cache.py`), None if it can."""
    if dtype not in DTYPES:
        return f"dtype {dtype} not supported (float16, bfloat16)"
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} not supported ({', '.join(map(str, HEAD_DIMS))})"
    return None


@dataclass(frozen=True, slots=True)
class KeyStats:
    """Key statistics the launch keeps up to date (`formats/page_selection.py`'s layout): each
    key it writes at cache row r for a head with `heads[h]` set is folded into stat row
    r // logical_tokens exactly as `update_key_stats` folds it (reset to (k, k) at a logical
    page's first slot), k being the key as the cache returns it.

    Only for launches that write no two keys to one logical page, except to its first slot (as
    the padding tokens of a step do, to the null page, whose statistics are then undefined, as
    with `update_key_stats`: nothing scores it): the kernel folds with plain reads and writes, in
    no order between tokens. A step of decodes only qualifies (each request writes
    one token); a prefill chunk does not, and goes through `update_key_stats`."""

    stats: torch.Tensor
    """[stat rows, 2 (min, max), head_dim] in the compute dtype, contiguous, a row for every
    logical_tokens cache rows."""
    heads: torch.Tensor
    """bool [kv_heads]: the KV heads that keep statistics (the dense ones)."""
    logical_tokens: int


def rope_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    write_index: torch.Tensor,
    k_rows: CacheRows,
    v_rows: CacheRows,
    key_stats: KeyStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE on q [T, heads, D] and k [T, kv_heads, D], then k (rotated) and v [T, kv_heads, D]
    stored at cache rows `write_index` (long [kv_heads, T]) of `k_rows` / `v_rows`.

    `rope` is (cos, sin) [T, 1, D / 2] in q's dtype, as `RotaryEmbedding.forward` returns them.
    q, k and v may be strided views (e.g. of the fused qkv projection); channels must be
    contiguous. Returns (q rotated, k, v as reads of the cache return them), contiguous, except
    that a dense cache returns v itself. `key_stats`: fold the keys into them as well (decode
    steps only: see `KeyStats`)."""
    (k_data, k_operand), (v_data, v_operand) = k_rows.kernel_operands(), v_rows.kernel_operands()
    (k_params, k_scale), (v_params, v_scale) = map(row_params_or_scale, (k_operand, v_operand))
    cos, sin = rope
    stats = (
        (None, None, 0)
        if key_stats is None
        else (key_stats.stats, key_stats.heads, key_stats.logical_tokens)
    )
    q_rot, k_seen, v_seen = EXTENSION.load().rope_kv_write(
        q, k, v, cos, sin, write_index, k_data, v_data, k_params, v_params, k_scale, v_scale, *stats
    )
    return q_rot, k_seen, v_seen
