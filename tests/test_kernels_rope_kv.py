"""Fused RoPE + KV cache write (cuda/rope_kv_write.cu, kernels/rope_kv.py) against its reference,
`apply_rotary` then the cache rows' torch `store`, and the attention layer on either (the choice
itself is kernels/dispatch.py's, tests/test_kernels_dispatch.py).

GPU: everything the kernel produces is compared exactly, for every cache format (dense, per-row
KV8/KV4, per-tensor static KV8). Rotated q and the returned k/v are compared bit for bit; the whole
cache too (dense rows, KV8/KV4/static KV8 codes), so rows the step must not touch are checked as
well. Only the (scale, zero) params are compared by value (torch.equal): when a row's minimum is a
signed zero, the sign of its zero `zero` comes from torch's reduction order, and either sign
dequantizes to the same bits. Inputs are views into a fused qkv buffer, as the model passes them,
with cos/sin from a real RotaryEmbedding at random positions, written to random cache rows of a
cache already holding other data. Static KV8 scales are calibrated below the step's largest
magnitudes, so its largest values clamp, as values beyond calibration do in serving.

CPU (CI): the layer's reference path, and a tiny model's logits equal, bit for bit, those of RoPE
applied in the model before the layer stores and attends (the formulation before fusion).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from omniserve.config import EngineConfig
from omniserve.formats.fp8 import FP8_MAX
from omniserve.formats.kv import PER_TENSOR, PER_TOKEN_HEAD, CacheRows, static_kv_scales
from omniserve.kernels import KernelUnavailableError, dispatch, rope_kv
from omniserve.layers.attention import AttentionMetadata, PagedAttention
from omniserve.layers.rotary import RotaryEmbedding, apply_rotary
from omniserve.models.llama import LlamaAttention
from omniserve.runner.kv_cache import KVCache, KVCacheSpec, StaticInt8Rows
from omniserve.runner.model_runner import ModelRunner
from omniserve.runner.step_inputs import StepInputBuilder
from tiny_models import (
    MIXED_STEPS,
    PagedRequests,
    save_checkpoint,
    save_servable,
    save_static_kv8_checkpoint,
)

gpu = pytest.mark.gpu
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")

DTYPES = [torch.float16, torch.bfloat16]
STATIC = "static"
FP8 = "fp8"
KV_FORMATS: list[int | str | None] = [None, 8, 4, STATIC, FP8]
"""Cache formats: dense, per-row KV8 and KV4 (`quantize_kv`), per-tensor static KV8 and FP8."""
SHAPES = [(32, 8, 128), (4, 2, 64), (8, 8, 128), (4, 4, 64), (8, 2, 256)]
"""(query heads, KV heads, head_dim): GQA 4:1 and 2:1, MHA, and the largest head_dim."""
TOKENS = [1, 7, 255, 4097]
PAGE_SIZE = 16
ROPE = {"rope_type": "default", "rope_theta": 500000.0}
MAX_POSITIONS = 8192


def _spec(kv_heads: int, head_dim: int, dtype: torch.dtype, fmt: int | str | None) -> KVCacheSpec:
    if fmt in (STATIC, FP8):
        return KVCacheSpec(1, PAGE_SIZE, kv_heads, head_dim, dtype, 8, PER_TENSOR, fmt == FP8)
    assert not isinstance(fmt, str)
    return KVCacheSpec(1, PAGE_SIZE, kv_heads, head_dim, dtype, fmt, PER_TOKEN_HEAD)


def _cache(
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    fmt: int | str | None,
    tokens: int,
    seed: int,
    static_scales: torch.Tensor | None = None,
) -> KVCache:
    """A cache with room for 1.5x the step's tokens (plus the null page), every byte random, so
    the step fills pages partly and must leave the other rows as they are. `static_scales`
    ([1, 2] fp32) are the (K, V) scales of a static KV8 cache."""
    num_pages = 2 + (3 * tokens // 2) // PAGE_SIZE
    cache = KVCache(
        _spec(kv_heads, head_dim, dtype, fmt),
        num_pages,
        max_num_seqs=1,
        max_pages_per_seq=1,
        device=torch.device("cuda"),
        static_scales=static_scales,
    )
    g = torch.Generator(device="cuda").manual_seed(seed)
    if fmt is None:
        cache.storage.normal_(generator=g)
    elif fmt == STATIC:
        cache.storage.random_(-128, 128, generator=g)
    elif fmt == FP8:  # finite positive e4m3 codes (0x7F is NaN, which no comparison equals)
        cache.storage.view(torch.uint8).random_(0, 0x7F, generator=g)
    else:
        cache.storage.random_(0, 256, generator=g)
        assert cache.params is not None
        cache.params.uniform_(0.01, 1.0, generator=g)
    return cache


def _calibrated(k: torch.Tensor, v: torch.Tensor, fmt: int | str | None = STATIC) -> torch.Tensor:
    """[1, 2] static KV8 or FP8 (K, V) scales from 90% of the largest |k| and |v| (|k| before
    RoPE, which can grow it by up to √2): the largest values clamp, as in serving."""
    absmax = 0.9 * torch.stack([k.abs().amax(), v.abs().amax()]).float()
    return (absmax / FP8_MAX if fmt == FP8 else static_kv_scales(absmax))[None]


def _bound(cache: KVCache, heads: int) -> PagedAttention:
    """A layer bound to `cache`, for its rows (the tests call the kernel and the reference)."""
    layer = PagedAttention(
        heads, cache.spec.num_kv_heads, cache.spec.head_dim, None, fused_rope_kv=False
    )
    cache.bind([layer])
    return layer


def _write_index(cache: KVCache, tokens: int, seed: int) -> torch.Tensor:
    """long [kv_heads, tokens]: distinct random slots (any page, any order), per head."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    slots = torch.randperm(cache.num_slots, generator=g, device="cuda")[:tokens]
    heads = torch.arange(cache.spec.num_kv_heads, device="cuda")[:, None]
    return heads * cache.num_slots + slots[None]


def _rope(tokens: int, head_dim: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    rotary = RotaryEmbedding(head_dim, MAX_POSITIONS, ROPE).to("cuda", dtype)
    g = torch.Generator(device="cuda").manual_seed(seed)
    return rotary(torch.randint(0, MAX_POSITIONS, (tokens,), generator=g, device="cuda"))


def _qkv(
    tokens: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
    pad: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as views into one fused projection output [T, (H + 2 KVH) D] (rows strided), with
    rows of varied spread and outlier channels; `pad` extra columns on each side of the buffer."""
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    g = torch.Generator(device="cuda").manual_seed(seed)
    width = sum(sizes) + 2 * pad
    x = torch.randn(tokens, width, generator=g, device="cuda")
    x *= torch.logspace(-2, 1, tokens, device="cuda")[:, None]
    x[:, ::7] *= 20
    fused = x.to(dtype)[:, pad : pad + sum(sizes)]
    q, k, v = fused.split(sizes, dim=-1)
    return (
        q.view(tokens, heads, head_dim),
        k.view(tokens, kv_heads, head_dim),
        v.view(tokens, kv_heads, head_dim),
    )


def _reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    write_index: torch.Tensor,
    k_rows: CacheRows,
    v_rows: CacheRows,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `PagedAttention.forward` does before attending, after `apply_rotary` on q and k."""
    q_rot, k_rot = apply_rotary(q, *rope), apply_rotary(k, *rope)
    k_seen = k_rows.store(write_index, k_rot.transpose(0, 1)).transpose(0, 1)
    v_seen = v_rows.store(write_index, v.transpose(0, 1)).transpose(0, 1)
    return q_rot, k_seen, v_seen


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int16)


def _assert_same_outputs(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    for name, g, w in zip(("q", "k", "v"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert torch.equal(_bits(g), _bits(w)), f"{name} differs in {(g != w).sum()} values"


def _assert_same(
    got: tuple[torch.Tensor, ...],
    want: tuple[torch.Tensor, ...],
    got_cache: KVCache,
    want_cache: KVCache,
) -> None:
    _assert_same_outputs(got, want)
    if got_cache.storage.is_floating_point():
        assert torch.equal(_bits(got_cache.storage), _bits(want_cache.storage))
    else:
        assert torch.equal(got_cache.storage, want_cache.storage)
    if got_cache.params is not None:
        assert torch.equal(got_cache.params, want_cache.params)


def _run_both(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    fmt: int | str | None,
    seed: int,
    static_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Kernel against reference on two equal caches. A static KV8 or FP8 cache takes
    `static_scales` ([1, 2]), by default `_calibrated` on k and v. Returns the rows the kernel
    wrote, [2 (K, V), kv_heads, tokens, width]."""
    tokens, heads, head_dim = q.shape
    if fmt in (STATIC, FP8) and static_scales is None:
        static_scales = _calibrated(k, v, fmt)
    got_cache, want_cache = (
        _cache(k.shape[1], head_dim, q.dtype, fmt, tokens, seed, static_scales) for _ in range(2)
    )
    got_layer, want_layer = _bound(got_cache, heads), _bound(want_cache, heads)
    index = _write_index(got_cache, tokens, seed)
    got = rope_kv.rope_kv_write(q, k, v, rope, index, got_layer.k_cache, got_layer.v_cache)
    want = _reference(q, k, v, rope, index, want_layer.k_cache, want_layer.v_cache)
    _assert_same(got, want, got_cache, want_cache)
    return got_cache.layer_storage(0)[:, index]


@gpu
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", KV_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_equals_rotary_then_store(
    dtype: torch.dtype, fmt: int | str | None, shape: tuple[int, int, int], tokens: int
) -> None:
    heads, kv_heads, head_dim = shape
    seed = tokens + heads + head_dim + KV_FORMATS.index(fmt)
    q, k, v = _qkv(tokens, heads, kv_heads, head_dim, dtype, seed)
    _run_both(q, k, v, _rope(tokens, head_dim, dtype, seed), fmt, seed)


@gpu
@pytest.mark.parametrize("fmt", KV_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_rows(dtype: torch.dtype, fmt: int | str | None) -> None:
    """All-zero, constant, one-signed, tiny (below the 2^-14 scale floor) and large rows, in keys
    (rotated first) and values alike. Large stays below fp16's range after rotation (|y| ≤ √2 max)
    and keeps the KV4 scale, (max − min) / 15, a finite fp16. Static KV8 is calibrated on the
    ordinary rows only: the large rows clamp to ±127 and the tiny ones quantize to 0; FP8 likewise,
    to ±448."""
    heads, kv_heads, head_dim, tokens = 8, 4, 128, 33
    q, k, v = _qkv(tokens, heads, kv_heads, head_dim, dtype, seed=5)
    g = torch.Generator(device="cuda").manual_seed(6)
    for x in (k, v):
        x[0] = 0
        x[1] = 3.0
        x[2] = -0.75
        x[3] = x[3].abs() + 1  # no row straddles 0
        x[4] = -x[4].abs()
        x[5] *= 1e-6
        x[6] = 3e4 * torch.randn(kv_heads, head_dim, generator=g, device="cuda").clamp(-1, 1)
        x[7, :, ::2] = 3e4  # alternating extremes
        x[7, :, 1::2] = -3e4
        x[8, 0] = 0  # one zero head among ordinary ones
    q[0] = 0
    scales = _calibrated(k[9:], v[9:], fmt) if fmt in (STATIC, FP8) else None
    written = _run_both(q, k, v, _rope(tokens, head_dim, dtype, seed=7), fmt, 8, scales)
    if fmt == STATIC:
        assert {-127, 127} <= set(written.unique().tolist())
    if fmt == FP8:
        assert {-FP8_MAX, FP8_MAX} <= set(written.float().unique().tolist())


@gpu
@pytest.mark.parametrize("fmt", KV_FORMATS)
def test_strided_and_contiguous_inputs(fmt: int | str | None) -> None:
    """A fused buffer with padding columns (row stride beyond the qkv width, data not at the
    allocation's start), and separate contiguous tensors: the kernel reads all in place."""
    heads, kv_heads, head_dim, tokens = 16, 4, 64, 19
    q, k, v = _qkv(tokens, heads, kv_heads, head_dim, torch.bfloat16, seed=9, pad=8)
    assert q.stride(0) == (heads + 2 * kv_heads) * head_dim + 16
    rope = _rope(tokens, head_dim, torch.bfloat16, seed=10)
    _run_both(q, k, v, rope, fmt, seed=11)
    _run_both(q.contiguous(), k.contiguous(), v.contiguous(), rope, fmt, seed=12)


def _halfway_values(c: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, values) for static KV8: scale c / 64 (c odd, so 1 / scale is inexact in fp32) and
    the values ±(m + 1/2) · scale, m = 0..126, that `dtype` holds exactly. Each x / scale is then
    exactly a tie, which round-half-to-even breaks, and x · fl(1 / scale) may land off the tie."""
    scale = torch.tensor(c / 64, device="cuda")
    halves = torch.arange(127, device="cuda") + 0.5
    exact = (halves * scale).double()
    held = exact.to(dtype)
    x = held[held.double() == exact]
    return scale, torch.cat([x, -x])


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_static_kv8_divides_rounds_half_to_even_and_clamps(dtype: torch.dtype) -> None:
    """Keys and values placed on quantization's edge cases, at RoPE position 0 (cos 1, sin 0), so
    keys reach quantization unchanged: exact ties between two codes (negative ones too, where a
    tie rounding to 0 must read back +0), values a reciprocal multiply would code differently from
    torch's division by the scale tensor, values past ±127.5 scales, and small negatives that
    round to −0. The other values are normal with one calibrated range (127 scales) as standard
    deviation, so about a third of them clamp."""
    tokens, heads, kv_heads, head_dim = 5, 4, 2, 64
    q, k, v = _qkv(tokens, heads, kv_heads, head_dim, dtype, seed=13)
    rope = RotaryEmbedding(head_dim, MAX_POSITIONS, ROPE).to("cuda", dtype)(
        torch.zeros(tokens, dtype=torch.long, device="cuda")
    )
    assert torch.equal(apply_rotary(k, *rope), k)
    g = torch.Generator(device="cuda").manual_seed(14)
    scales = []
    for x, c in ((k, 15), (v, 7)):
        scale, ties = _halfway_values(c, dtype)
        divided = torch.round(ties.float() / scale)
        assert not torch.equal(divided, torch.round(ties.float() * (1 / scale)))
        assert divided.remainder(2).eq(0).all()  # torch rounds the ties half to even
        edges = torch.tensor([127.5, -127.5, 128.5, -200.0, -0.25, -0.4], device="cuda") * scale
        crafted = torch.cat([ties, edges.to(dtype)])
        flat = (torch.randn(x.numel(), generator=g, device="cuda") * 127 * scale).to(dtype)
        flat[: crafted.numel()] = crafted
        x.copy_(flat.view_as(x))
        scales.append(scale)
    written = _run_both(q, k, v, rope, STATIC, seed=15, static_scales=torch.stack(scales)[None])
    assert {-127, 0, 127} <= set(written.unique().tolist())


@gpu
def test_static_rows_built_directly() -> None:
    """StaticInt8Rows built by hand: code tensors and 0-d scale tensors of their own, not views
    into a KVCache's storage and scale table."""
    tokens, heads, kv_heads, head_dim, slots = 9, 8, 2, 128, 40
    q, k, v = _qkv(tokens, heads, kv_heads, head_dim, torch.float16, seed=16)
    rope = _rope(tokens, head_dim, torch.float16, seed=16)
    g = torch.Generator(device="cuda").manual_seed(17)
    codes = torch.randint(-128, 128, (2, kv_heads * slots, head_dim), generator=g, device="cuda")
    k_scale, v_scale = (torch.tensor(s, device="cuda") for s in (0.031, 0.0173))

    def rows() -> tuple[StaticInt8Rows, StaticInt8Rows]:
        return (
            StaticInt8Rows(codes[0].to(torch.int8), k_scale.clone(), torch.float16),
            StaticInt8Rows(codes[1].to(torch.int8), v_scale.clone(), torch.float16),
        )

    (got_k, got_v), (want_k, want_v) = rows(), rows()
    index = torch.randperm(slots, generator=g, device="cuda")[:tokens]
    index = torch.arange(kv_heads, device="cuda")[:, None] * slots + index
    got = rope_kv.rope_kv_write(q, k, v, rope, index, got_k, got_v)
    _assert_same_outputs(got, _reference(q, k, v, rope, index, want_k, want_v))
    assert torch.equal(got_k.codes, want_k.codes) and torch.equal(got_v.codes, want_v.codes)


@gpu
def test_empty_step() -> None:
    q, k, v = _qkv(0, 4, 2, 64, torch.float16, seed=0)
    cache = _cache(2, 64, torch.float16, 4, 16, seed=0)
    before = cache.storage.clone()
    layer = _bound(cache, 4)
    index = torch.empty(2, 0, dtype=torch.long, device="cuda")
    q_rot, k_seen, v_seen = rope_kv.rope_kv_write(
        q,
        k,
        v,
        _rope(0, 64, torch.float16, 0),
        index,
        layer.k_cache,
        layer.v_cache,
    )
    assert q_rot.shape == (0, 4, 64) and k_seen.shape == v_seen.shape == (0, 2, 64)
    assert torch.equal(cache.storage, before)


@gpu
def test_bad_inputs_are_named() -> None:
    op = rope_kv.EXTENSION.load().rope_kv_write
    tokens, heads, kv_heads, dim = 5, 4, 2, 64
    q, k, v = _qkv(tokens, heads, kv_heads, dim, torch.float16, seed=0)
    cos, sin = _rope(tokens, dim, torch.float16, seed=0)
    cache = _cache(kv_heads, dim, torch.float16, 8, tokens, seed=0)
    codes, params = _bound(cache, heads).k_cache.kernel_operands()
    index = _write_index(cache, tokens, seed=0)

    valid = {
        "q": q,
        "k": k,
        "v": v,
        "cos": cos,
        "sin": sin,
        "write_index": index,
        "k_cache": codes,
        "v_cache": codes,
        "k_params": params,
        "v_params": params,
        "k_scale": None,
        "v_scale": None,
    }

    def call(**changes: object) -> None:
        op(**{**valid, **changes})

    call()  # the unchanged arguments are valid
    cases: list[tuple[dict[str, object], str]] = [
        ({"q": q.float()}, "q must be float16 or bfloat16, got Float"),
        ({"q": q.cpu()}, "q must be a CUDA tensor"),
        ({"k": k.bfloat16()}, "k must have q's dtype Half, got BFloat16"),
        ({"v": v[:, :1]}, r"v must be \[tokens, heads, head_dim\] matching q"),
        ({"k": k.transpose(1, 2).contiguous().transpose(1, 2)}, "k must have contiguous channels"),
        (
            {"q": torch.zeros(tokens, heads, 96, dtype=torch.float16, device="cuda")},
            "head_dim must be 64, 128 or 256, got 96",
        ),
        ({"cos": cos[:, :, :16]}, r"cos must be \[tokens, 1, head_dim / 2\] = \[5, 1, 32\]"),
        ({"sin": sin.float()}, "sin must have q's dtype Half"),
        ({"write_index": index.int()}, r"write_index must be int64 \[kv_heads, tokens\]"),
        ({"write_index": index[:1]}, r"= \[2, 5\]"),
        ({"k_cache": codes.cpu()}, "the KV cache must be on cuda"),
        ({"v_cache": cache.layer_storage(0)[1, ::2]}, "must be a contiguous, 16-byte aligned 2-D"),
        ({"v_cache": codes[:-16]}, "K and V caches must have the same shape and dtype"),
        ({"v_params": None}, "pass both k_params and v_params or neither"),
        ({"k_params": params.float()}, "KV params must be contiguous, 4-byte aligned float16"),
        (
            {"k_params": None, "v_params": None},
            (
                r"a cache without params or scales holds rows of q's dtype and head_dim: expected Half "
                r"\[rows, 64\], got Byte"
            ),
        ),
    ]
    for changes, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call(**changes)
    narrow = torch.zeros(codes.shape[0], 40, dtype=torch.uint8, device="cuda")
    with pytest.raises(RuntimeError, match="code rows of 40 bytes fit neither KV8 nor KV4"):
        call(k_cache=narrow, v_cache=narrow.clone())

    # Static KV8: int8 codes with one fp32 scale each for K and V instead of per-row params.
    signed, scale = codes.view(torch.int8), torch.tensor(0.05, device="cuda")
    static = {
        "k_cache": signed,
        "v_cache": signed,
        "k_params": None,
        "v_params": None,
        "k_scale": scale,
        "v_scale": scale,
    }
    call(**static)  # valid
    narrow_signed = torch.zeros(codes.shape[0], 32, dtype=torch.int8, device="cuda")
    static_cases: list[tuple[dict[str, object], str]] = [
        ({"v_scale": None}, "pass both k_scale and v_scale or neither"),
        (
            {"k_params": params, "v_params": params},
            "pass per-row k_params/v_params or per-tensor k_scale/v_scale, not both",
        ),
        (
            {"k_cache": codes, "v_cache": codes},
            r"a per-tensor static cache must be int8 \(KV8\) or float8_e4m3fn \(FP8\) \[rows, 64\], "
            r"got Byte \[\d+, 64\]",
        ),
        (
            {"k_cache": narrow_signed, "v_cache": narrow_signed.clone()},
            r"\(FP8\) \[rows, 64\], got Char \[\d+, 32\]",
        ),
        ({"k_scale": scale.half()}, r"k_scale must be one fp32 value on cuda:0, got Half \[\]"),
        (
            {"v_scale": scale.repeat(2)},
            r"v_scale must be one fp32 value on cuda:0, got Float \[2\] on cuda:0",
        ),
        (
            {"k_scale": scale.cpu()},
            r"k_scale must be one fp32 value on cuda:0, got Float \[\] on cpu",
        ),
        (
            {"k_scale": None, "v_scale": None},
            (
                r"a cache without params or scales holds rows of q's dtype and head_dim: expected Half "
                r"\[rows, 64\], got Char"
            ),
        ),
        (
            {"k_scale": None, "v_scale": None, "k_params": params, "v_params": params},
            "quantized caches hold uint8 codes, got Char",
        ),
    ]
    for changes, message in static_cases:
        with pytest.raises(RuntimeError, match=message):
            call(**{**static, **changes})


# --- The engine's choice of path ------------------------------------------------------------------

NUM_PAGES = 40


def _cpu_step_layers(
    dtype: torch.dtype, fmt: int | str | None
) -> tuple[list[tuple[PagedAttention, KVCache, StepInputBuilder]], PagedRequests]:
    # Static scales that clamp the largest of the unit-normal keys and values.
    scales = {STATIC: torch.tensor([[0.02, 0.015]]), FP8: torch.tensor([[0.006, 0.005]])}.get(fmt)
    layers = []
    for _ in range(2):
        cache = KVCache(
            _spec(2, 16, dtype, fmt),
            NUM_PAGES,
            max_num_seqs=6,
            max_pages_per_seq=8,
            device=torch.device("cpu"),
            static_scales=scales,
        )
        layer = PagedAttention(4, 2, 16, None, fused_rope_kv=False)
        cache.bind([layer])
        inputs = StepInputBuilder(cache, frozenset({None}), 6, 128, 4096, torch.device("cpu"))
        layers.append((layer, cache, inputs))
    return layers, PagedRequests(PAGE_SIZE, NUM_PAGES)


@pytest.mark.parametrize("fmt", KV_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_layer_rotates_then_stores(dtype: torch.dtype, fmt: int | str | None) -> None:
    """Without the fused kernel `rotate_and_attend` is `apply_rotary` then `forward`, which stores
    and attends:
    equal outputs and caches over prefill, chunked prefill and decode steps, and hooks on the
    layer see the rotated q and k."""
    layers, reqs = _cpu_step_layers(dtype, fmt)
    (fused, fused_cache, fused_inputs), (plain, plain_cache, plain_inputs) = layers
    rotary = RotaryEmbedding(16, 256, ROPE).to(dtype)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    fused.register_forward_pre_hook(lambda _, args: seen.append((args[0], args[1])))
    g = torch.Generator().manual_seed(KV_FORMATS.index(fmt))
    for step in MIXED_STEPS:
        plan = reqs.step([(row, [0] * n) for row, n in step])
        step_inputs = fused_inputs.build(plan)
        rope = rotary(step_inputs.positions)
        t = plan.num_tokens
        q = torch.randn(t, 4, 16, generator=g).to(dtype)
        k, v = (torch.randn(t, 2, 16, generator=g).to(dtype) for _ in range(2))
        got = fused.rotate_and_attend(q, k, v, rope, step_inputs.attn)
        q_rot, k_rot = apply_rotary(q, *rope), apply_rotary(k, *rope)
        want = plain(q_rot, k_rot, v, plain_inputs.build(plan).attn)
        assert torch.equal(got, want)
        assert torch.equal(seen[-1][0], q_rot) and torch.equal(seen[-1][1], k_rot)
    assert torch.equal(fused_cache.storage, plain_cache.storage)
    if fused_cache.params is not None:
        assert torch.equal(fused_cache.params, plain_cache.params)  # type: ignore[arg-type]


def _rope_in_the_model(
    self: LlamaAttention,
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    meta: AttentionMetadata,
) -> torch.Tensor:
    """LlamaAttention.forward before the fusion: RoPE in the model, then the layer stores and
    attends."""
    q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
    q = apply_rotary(q.view(-1, self.num_heads, self.head_dim), *rope)
    k = apply_rotary(k.view(-1, self.num_kv_heads, self.head_dim), *rope)
    o = self.attn(q, k, v.view(-1, self.num_kv_heads, self.head_dim), meta)
    return self.o_proj(o.flatten(1))


def _prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 384, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _logits_over_steps(runner: ModelRunner) -> list[torch.Tensor]:
    """Prefill, chunked prefill and decode steps of three requests, mixed."""
    a, b, c = _prompt(0, 41), _prompt(1, 9), _prompt(2, 20)
    reqs = PagedRequests(PAGE_SIZE, NUM_PAGES)
    steps = [
        [(0, a[:30]), (1, b)],
        [(0, a[30:]), (1, [5]), (2, c[:3])],
        [(0, [7]), (1, [8]), (2, c[3:])],
        [(0, [9]), (1, [10]), (2, [11])],
    ]
    return [runner.compute_logits(reqs.step(step))[1].cpu() for step in steps]


def _runner(directory: Path, **options: object) -> ModelRunner:
    return ModelRunner(
        EngineConfig.from_kwargs(
            str(directory),
            page_size=PAGE_SIZE,
            num_kv_pages=NUM_PAGES,
            max_num_seqs=4,
            max_num_batched_tokens=128,
            **options,
        )
    )


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "int4"])
def test_cpu_model_logits_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kv_cache_dtype: str
) -> None:
    save_checkpoint("llama3", tmp_path)
    got = _logits_over_steps(_runner(tmp_path, device="cpu", kv_cache_dtype=kv_cache_dtype))
    monkeypatch.setattr(LlamaAttention, "forward", _rope_in_the_model)
    want = _logits_over_steps(_runner(tmp_path, device="cpu", kv_cache_dtype=kv_cache_dtype))
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "int4", STATIC])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_model_logits_equal_the_torch_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, kv_cache_dtype: str
) -> None:
    """A tiny llama3 with head_dim 64 (the kernel's smallest) on the GPU: logits with the fused
    kernel equal those with the torch path forced, exactly, over prefill, chunks and decodes.
    STATIC is a W8A8 checkpoint with static KV8 scales at half their calibrated values, so the
    largest keys and values clamp."""
    if kv_cache_dtype == STATIC:
        fp_dir = tmp_path / "fp"
        hf = save_servable("llama3", fp_dir, head_dim=64)
        directory = save_static_kv8_checkpoint(fp_dir, hf, tmp_path / STATIC, scale_factor=0.5)
        kv_cache_dtype = "auto"  # the checkpoint's
    else:
        save_checkpoint("llama3", tmp_path, head_dim=64)
        directory = tmp_path
    options = {"device": "cuda", "dtype": dtype, "kv_cache_dtype": kv_cache_dtype}
    calls = []
    real_write = rope_kv.rope_kv_write
    monkeypatch.setattr(rope_kv, "rope_kv_write", lambda *a: calls.append(1) or real_write(*a))
    runner = _runner(directory, **options)
    assert runner.kernels.rope_kv.kernel and runner.kernels.decode_attention.kernel
    got = _logits_over_steps(runner)
    assert calls, "the fused kernel was not used"
    real_decide = dispatch.decide  # the same choices but the reference RoPE + KV write
    monkeypatch.setattr(
        dispatch,
        "decide",
        lambda **kw: replace(real_decide(**kw), rope_kv=dispatch.reference("forced by the test")),
    )
    calls.clear()
    want = _logits_over_steps(_runner(directory, **options))
    assert not calls
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@cpu_only
def test_kernel_without_cuda_says_why() -> None:
    q = torch.zeros(1, 4, 64, dtype=torch.float16)
    cache = KVCache(KVCacheSpec(1, PAGE_SIZE, 2, 64, torch.float16), 2, 1, 1, torch.device("cpu"))
    layer = PagedAttention(4, 2, 64, None, fused_rope_kv=False)
    cache.bind([layer])
    rope = RotaryEmbedding(64, 16, ROPE).to(torch.float16)(torch.zeros(1, dtype=torch.long))
    index = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(KernelUnavailableError, match="no CUDA device is visible"):
        rope_kv.rope_kv_write(q, q[:, :2], q[:, :2], rope, index, layer.k_cache, layer.v_cache)
