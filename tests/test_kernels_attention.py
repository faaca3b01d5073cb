"""Paged decode attention kernel (cuda/decode_attention.cu) against an fp32 reference on the same
cache rows, and the engine with the kernel against its torch attention path, on the GPU; the
Python-side checks of `StreamingHeads` on the CPU.

The reference gathers each request's rows through its page table (a streaming head's through its
streaming table, by the rule of `StreamingHeads`) and attends in fp32 to the exactly dequantized
K/V (`formats/kv.py`), which is the math of `PagedAttention`'s decode path without its rounding of
K/V and probabilities to the compute dtype."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from omniserve import Engine, SamplingParams
from omniserve.config import EngineConfig
from omniserve.formats.fp8 import FP8_MAX
from omniserve.formats.kv import (
    dequantize_kv,
    dequantize_kv_fp8,
    dequantize_kv_static,
    quantize_kv,
    quantize_kv_fp8,
    quantize_kv_static,
)
from omniserve.kernels import attention as kernel
from omniserve.runner.kv_cache import StaticInt8Rows
from omniserve.runner.model_runner import ModelRunner
from teacher_forcing import assert_engines_agree
from tiny_models import (
    FAMILIES,
    PagedRequests,
    save_servable,
    save_static_kv8_checkpoint,
)

gpu = pytest.mark.gpu

LAYOUTS = {  # (query heads, KV heads, head_dim)
    "gqa32x8-d128": (32, 8, 128),
    "gqa4x2-d64": (4, 2, 64),
    "mha4-d128": (4, 4, 128),
    "gqa8x1-d64": (8, 1, 64),
}
CONTEXTS = {
    "b1-ctx1": [1],
    "b1-ctx16": [16],
    "b1-ctx4097": [4097],
    "b7-mixed": [1, 15, 16, 17, 1000, 4097, 33],
    "b64-random": torch.randint(1, 700, (64,), generator=torch.Generator().manual_seed(0)).tolist(),
}
STATIC = "static"
FP8 = "fp8"
KV_BITS = {"kv16": None, "kv8": 8, "kv4": 4, "kv8static": STATIC, "fp8": FP8}
"""Cache formats: dense, per-row KV8 and KV4 (`quantize_kv`), per-tensor static KV8 and FP8."""
TOLERANCE = {
    torch.float16: {"atol": 3e-3, "rtol": 1e-2},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


class PagedCase:
    """Random K/V rows in the cache layout of runner/kv_cache.py, requests with shuffled pages
    (the last one partly filled) at shuffled page-table rows, and queries.

    With `stream_heads` (KV heads that stream, possibly none) the case is a layer with streaming
    heads instead: each KV head's rows start at its own base (the heads' regions in shuffled
    order, with unused rows between them), a streaming head's region holds pages of a pool of
    its own, and request b's streaming heads attend `stream_contexts[b]` positions through a
    streaming table (rows in batch order, one column more than the longest needs)."""

    def __init__(
        self,
        layout: tuple[int, int, int],
        contexts: list[int],
        bits: int | str | None,
        dtype: torch.dtype,
        page_size: int = 16,
        seed: int = 0,
        stream_heads: tuple[int, ...] | None = None,
        stream_contexts: list[int] | None = None,
    ) -> None:
        g = torch.Generator(device="cuda").manual_seed(seed)
        cpu = torch.Generator().manual_seed(seed)
        self.heads, self.kv_heads, self.head_dim = layout
        self.contexts, self.page_size, self.dtype, self.bits = contexts, page_size, dtype, bits
        pages_per_req = [math.ceil(c / page_size) for c in contexts]
        num_pages = 1 + sum(pages_per_req) + 3  # page 0 is the null page; 3 never used
        self.num_slots = num_pages * page_size
        batch, max_pages = len(contexts), max(pages_per_req)
        free = (torch.randperm(num_pages - 1, generator=cpu) + 1).tolist()
        page_table = torch.zeros(batch + 2, max_pages, dtype=torch.int32)
        seq_rows = torch.randperm(batch + 2, generator=cpu)[:batch].int()
        for b, n in enumerate(pages_per_req):
            page_table[seq_rows[b], :n] = torch.tensor([free.pop() for _ in range(n)])
        # Pages of request b in order, for the reference.
        self.request_pages = [page_table[row].long() for row in seq_rows]
        self.page_table, self.seq_rows = page_table.cuda(), seq_rows.cuda()
        self.context_lens = torch.tensor(contexts, dtype=torch.int32, device="cuda")

        self.is_stream = [False] * self.kv_heads
        self.stream_contexts: list[int] = []
        self.streaming: kernel.StreamingHeads | None = None
        if stream_heads is None:
            self.head_base = torch.arange(self.kv_heads) * self.num_slots
            rows = self.kv_heads * self.num_slots
        else:
            assert stream_contexts is not None and len(stream_contexts) == batch
            self.stream_contexts = stream_contexts
            for h in stream_heads:
                self.is_stream[h] = True
            stream_pages = [math.ceil(c / page_size) for c in stream_contexts]
            pool = sum(stream_pages) + 1
            table = torch.randint(pool, (batch, max(stream_pages) + 1), generator=cpu)
            order = torch.randperm(pool, generator=cpu).tolist()
            for b, n in enumerate(stream_pages):
                table[b, :n] = torch.tensor([order.pop() for _ in range(n)])
            self.stream_table = table
            self.head_base = torch.empty(self.kv_heads, dtype=torch.int64)
            rows = 0
            for h in torch.randperm(self.kv_heads, generator=cpu).tolist():
                rows += page_size  # rows no head owns
                self.head_base[h] = rows
                rows += (pool if self.is_stream[h] else num_pages) * page_size
            self.streaming = kernel.StreamingHeads(
                head_base=self.head_base.cuda(),
                is_stream=torch.tensor(self.is_stream, device="cuda"),
                table=table.int().cuda(),
                context_lens=torch.tensor(stream_contexts, dtype=torch.int32, device="cuda"),
            )

        x = torch.randn(2, rows, self.head_dim, generator=g, device="cuda")
        x[..., ::7] *= 4  # outlier channels, as post-RoPE keys have
        x += torch.randn(2, rows, 1, generator=g, device="cuda")  # rows not centred on 0
        self.operands, self.dequantized = [], []
        for kv in x:
            if bits is None:
                self.operands.append((kv.to(dtype), None))
                self.dequantized.append(kv.to(dtype).float())
            elif bits == STATIC:
                # Calibrated on 90% of the range: the largest values clamp, as in serving.
                scale = 0.9 * kv.abs().amax() / 127
                codes = quantize_kv_static(kv, scale)
                self.operands.append((codes, scale))
                self.dequantized.append(dequantize_kv_static(codes, scale, torch.float32))
            elif bits == FP8:
                scale = 0.9 * kv.abs().amax() / FP8_MAX
                codes = quantize_kv_fp8(kv, scale)
                self.operands.append((codes, scale))
                self.dequantized.append(dequantize_kv_fp8(codes, scale, torch.float32))
            else:
                codes, params = quantize_kv(kv, bits)
                self.operands.append((codes, params))
                self.dequantized.append(dequantize_kv(codes, params, bits, torch.float32))
        self.q = (2 * torch.randn(batch, self.heads, self.head_dim, generator=g, device="cuda")).to(
            dtype
        )
        self.scale = self.head_dim**-0.5

    def run(
        self,
        window: int | None = None,
        max_context_len: int | None = None,
        partition: int | None = None,
        streaming: kernel.StreamingHeads | None = None,
    ) -> torch.Tensor:
        """The kernel's output; `streaming` replaces the case's own streaming heads."""
        return kernel.decode_attention(
            self.q,
            self.operands[0],
            self.operands[1],
            self.page_table,
            self.seq_rows,
            self.context_lens,
            page_size=self.page_size,
            num_kv_heads=self.kv_heads,
            max_context_len=(
                max(self.contexts + self.stream_contexts)
                if max_context_len is None
                else max_context_len
            ),
            scale=self.scale,
            window=window,
            partition=partition,
            streaming=self.streaming if streaming is None else streaming,
        )

    def visible_rows(self, b: int, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache rows [kv_heads, L] each KV head of request b attends (padded with row 0), and
        which of them are real: a dense head's positions in the window through the page table, a
        streaming head's all of its positions through the streaming table."""
        per_head = []
        for h in range(self.kv_heads):
            if self.is_stream[h]:
                pos = torch.arange(self.stream_contexts[b])
                pages = self.stream_table[b, pos // self.page_size]
            else:
                ctx = self.contexts[b]
                pos = torch.arange(0 if window is None else max(0, ctx - window), ctx)
                pages = self.request_pages[b][pos // self.page_size]
            per_head.append(self.head_base[h] + pages * self.page_size + pos % self.page_size)
        length = max(len(rows) for rows in per_head)
        index = torch.zeros(self.kv_heads, length, dtype=torch.int64)
        real = torch.zeros(self.kv_heads, length, dtype=torch.bool)
        for h, rows in enumerate(per_head):
            index[h, : len(rows)], real[h, : len(rows)] = rows, True
        return index.cuda(), real.cuda()

    def reference(self, window: int | None = None) -> torch.Tensor:
        out = torch.empty(self.q.shape, dtype=torch.float32, device="cuda")
        group = self.heads // self.kv_heads
        for b in range(len(self.contexts)):
            index, real = self.visible_rows(b, window)
            k, v = self.dequantized[0][index], self.dequantized[1][index]
            q = self.q[b].float().view(self.kv_heads, group, self.head_dim)
            scores = q @ k.transpose(1, 2) * self.scale
            p = scores.masked_fill(~real[:, None, :], -math.inf).softmax(-1)
            out[b] = (p @ v).reshape(self.heads, self.head_dim)
        return out


def _check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, **TOLERANCE[dtype])


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", KV_BITS.values(), ids=KV_BITS.keys())
@pytest.mark.parametrize("contexts", CONTEXTS.values(), ids=CONTEXTS.keys())
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_decode_attention_matches_reference(
    layout: tuple[int, int, int], contexts: list[int], bits: int | str | None, dtype: torch.dtype
) -> None:
    case = PagedCase(layout, contexts, bits, dtype)
    _check(case.run(), case.reference(), dtype)


@gpu
@pytest.mark.parametrize("bits", KV_BITS.values(), ids=KV_BITS.keys())
@pytest.mark.parametrize("partition", [32, 64, 512, 1024])
def test_split_partitions_combine_exactly(bits: int | str | None, partition: int) -> None:
    case = PagedCase(
        LAYOUTS["gqa32x8-d128"], CONTEXTS["b7-mixed"], bits, torch.float16, page_size=64
    )
    _check(case.run(partition=partition), case.reference(), torch.float16)


@gpu
@pytest.mark.parametrize("partition", [2048, 4096, 16384])
def test_kv4_streams_long_partitions(partition: int) -> None:
    """The KV4 kernel keeps no per-token state in shared memory, so a split may be long; the
    three-phase kernel's limit (2048) stays."""
    case = PagedCase(LAYOUTS["gqa32x8-d128"], CONTEXTS["b7-mixed"], 4, torch.float16, page_size=64)
    _check(case.run(partition=partition), case.reference(), torch.float16)
    if partition > 2048:
        dense = PagedCase(LAYOUTS["gqa32x8-d128"], [100], None, torch.float16)
        with pytest.raises(
            RuntimeError, match=r"partition must be a multiple of 32 in \[32, 2048\]"
        ):
            dense.run(partition=partition)


@gpu
@pytest.mark.parametrize("bits", KV_BITS.values(), ids=KV_BITS.keys())
@pytest.mark.parametrize("window", [1, 8, 100, 5000])
def test_sliding_window(bits: int | str | None, window: int) -> None:
    case = PagedCase(LAYOUTS["gqa4x2-d64"], [1, 7, 8, 9, 1000, 4097], bits, torch.bfloat16)
    _check(case.run(window=window), case.reference(window=window), torch.bfloat16)


@gpu
@pytest.mark.parametrize("partition", [64, 512])
def test_launch_sized_too_short_gives_nan_not_truncation(partition: int) -> None:
    case = PagedCase(LAYOUTS["gqa4x2-d64"], [50, 1000], 4, torch.float16)
    out = case.run(max_context_len=50, partition=partition)
    assert out[1].isnan().all()
    _check(out[:1], case.reference()[:1], torch.float16)  # the short request fits the launch


@gpu
def test_bad_inputs_are_named() -> None:
    case = PagedCase(LAYOUTS["gqa4x2-d64"], [20], None, torch.float16)
    ops = kernel.EXTENSION.load()
    args = (case.page_table, case.seq_rows, case.context_lens, 16, 2, 20, 0, 0.125, 128)
    k, v = case.operands[0][0], case.operands[1][0]
    with pytest.raises(RuntimeError, match="head_dim must be 64 or 128, got 32"):
        q = torch.zeros(1, 4, 32, device="cuda", dtype=torch.float16)
        ops.decode_attention(
            q, k[:, :32].contiguous(), v[:, :32].contiguous(), None, None, None, None, *args
        )
    with pytest.raises(RuntimeError, match="must be 1, 2, 4 or 8, got 6"):
        ops.decode_attention(
            case.q[:, :3].repeat(1, 2, 1), k, v, None, None, None, None, *args[:4], 1, *args[5:]
        )
    dense = (
        r"a cache without params or scales holds rows of q's dtype and head_dim: expected "
        r"Half \[rows, 64\], got BFloat16 \[\d+, 64\]"
    )  # formatted dtypes and shapes
    with pytest.raises(RuntimeError, match=dense):
        ops.decode_attention(case.q, k.bfloat16(), v.bfloat16(), None, None, None, None, *args)
    with pytest.raises(RuntimeError, match="seq_rows must be int32, got Long"):
        ops.decode_attention(
            case.q, k, v, None, None, None, None, case.page_table, case.seq_rows.long(), *args[2:]
        )
    with pytest.raises(RuntimeError, match="pass both k_params and v_params"):
        ops.decode_attention(
            case.q, k, v, torch.zeros(k.shape[0], 2, device="cuda").half(), None, None, None, *args
        )

    kv4 = PagedCase(LAYOUTS["gqa4x2-d64"], [20], 4, torch.float16, page_size=16)
    (k4, p4), (v4, q4) = kv4.operands
    with pytest.raises(
        RuntimeError, match="KV4 cache needs pages of a multiple of 16 tokens, got 8"
    ):
        ops.decode_attention(kv4.q, k4, v4, p4, q4, None, None, *args[:3], 8, *args[4:])

    static = PagedCase(LAYOUTS["gqa4x2-d64"], [20], STATIC, torch.float16)
    (k8, ks), (v8, vs) = static.operands
    with pytest.raises(RuntimeError, match="pass both k_scale and v_scale or neither"):
        ops.decode_attention(case.q, k8, v8, None, None, ks, None, *args)
    with pytest.raises(RuntimeError, match="not both"):
        ops.decode_attention(case.q, k8, v8, p4, q4, ks, vs, *args)
    wrong_dtype = (
        r"static cache must be int8 \(KV8\) or float8_e4m3fn \(FP8\) \[rows, 64\], got Byte"
    )
    with pytest.raises(RuntimeError, match=wrong_dtype):
        ops.decode_attention(
            case.q, k8.view(torch.uint8), v8.view(torch.uint8), None, None, ks, vs, *args
        )
    with pytest.raises(
        RuntimeError, match=r"k_scale must be one fp32 value on cuda:0, got Half \[\]"
    ):
        ops.decode_attention(case.q, k8, v8, None, None, ks.half(), vs.half(), *args)


def test_unsupported() -> None:
    assert kernel.unsupported(32, 8, 128, torch.bfloat16) is None
    assert kernel.unsupported(4, 4, 64, torch.float16) is None
    assert "28 query heads over 4 KV heads" in str(kernel.unsupported(28, 4, 128, torch.bfloat16))
    assert "head_dim 32" in str(kernel.unsupported(4, 2, 32, torch.float16))
    assert "torch.float32" in str(kernel.unsupported(4, 2, 64, torch.float32))


STREAM_FORMATS = {  # (compute dtype, cache format): every storage format, both dtypes
    "fp16-kv16": (torch.float16, None),
    "bf16-kv16": (torch.bfloat16, None),
    "bf16-kv8": (torch.bfloat16, 8),
    "fp16-kv4": (torch.float16, 4),
    "fp16-kv8static": (torch.float16, STATIC),
    "bf16-fp8": (torch.bfloat16, FP8),
}
STREAM_PATTERNS = {  # the KV heads that stream, of a layer with `kv_heads`
    "dense": lambda kv_heads: (),
    "all": lambda kv_heads: tuple(range(kv_heads)),
    "mixed": lambda kv_heads: tuple(range(0, kv_heads, 2)),  # heads 0 and 2 of 4
}
STREAM_CONTEXTS = [17, 1, 15, 16, 2100, 33, 600]
"""Streaming contexts beside `CONTEXTS["b7-mixed"]`: around page boundaries (page size 16), one
across several partitions, each request's unlike its dense one."""


@gpu
@pytest.mark.parametrize("pattern", STREAM_PATTERNS.values(), ids=STREAM_PATTERNS.keys())
@pytest.mark.parametrize("dtype,bits", STREAM_FORMATS.values(), ids=STREAM_FORMATS.keys())
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_streaming_heads_match_reference(
    layout: tuple[int, int, int],
    dtype: torch.dtype,
    bits: int | str | None,
    pattern: Callable[[int], tuple[int, ...]],
) -> None:
    case = PagedCase(
        layout,
        CONTEXTS["b7-mixed"],
        bits,
        dtype,
        stream_heads=pattern(layout[1]),
        stream_contexts=STREAM_CONTEXTS,
    )
    _check(case.run(), case.reference(), dtype)


@gpu
@pytest.mark.parametrize("dtype,bits", STREAM_FORMATS.values(), ids=STREAM_FORMATS.keys())
@pytest.mark.parametrize("partition", [32, 64, 512])
def test_streaming_heads_split_partitions_combine_exactly(
    dtype: torch.dtype, bits: int | str | None, partition: int
) -> None:
    """Streaming heads' splits end where their contexts do, not the dense heads': the combine
    step reads each head's own. Page size 64, contexts around its boundaries."""
    case = PagedCase(
        LAYOUTS["gqa32x8-d128"],
        CONTEXTS["b7-mixed"],
        bits,
        dtype,
        page_size=64,
        stream_heads=(1, 2, 5),
        stream_contexts=[65, 1, 63, 64, 2100, 129, 700],
    )
    _check(case.run(partition=partition), case.reference(), dtype)


@gpu
@pytest.mark.parametrize("bits", [None, 4], ids=["kv16", "kv4"])
def test_streaming_heads_large_batch(bits: int | None) -> None:
    contexts = CONTEXTS["b64-random"]
    stream = torch.randint(1, 300, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    case = PagedCase(
        LAYOUTS["gqa32x8-d128"],
        contexts,
        bits,
        torch.float16,
        stream_heads=(0, 3, 4, 7),
        stream_contexts=stream,
    )
    _check(case.run(), case.reference(), torch.float16)


@gpu
@pytest.mark.parametrize("dtype,bits", STREAM_FORMATS.values(), ids=STREAM_FORMATS.keys())
@pytest.mark.parametrize("window", [8, 100])
def test_streaming_heads_beside_a_sliding_window(
    dtype: torch.dtype, bits: int | str | None, window: int
) -> None:
    """Dense heads attend their window, streaming heads all of their (longer) tables: the launch
    has splits for both (the streaming table's width bounds the streaming contexts)."""
    case = PagedCase(
        LAYOUTS["gqa4x2-d64"],
        [1, 7, 8, 9, 1000, 4097],
        bits,
        dtype,
        stream_heads=(1,),
        stream_contexts=[600, 1, 17, 1500, 33, 300],
    )
    _check(case.run(window=window), case.reference(window=window), dtype)


@gpu
@pytest.mark.parametrize("dtype,bits", STREAM_FORMATS.values(), ids=STREAM_FORMATS.keys())
@pytest.mark.parametrize("window", [None, 100])
def test_no_streaming_heads_is_bit_identical_to_explicit_dense_layout(
    dtype: torch.dtype, bits: int | str | None, window: int | None
) -> None:
    """Without `streaming` the kernel computes each head's base row itself; handed the runner's
    layout with every head dense, it reads the same rows in the same order, so the outputs are
    bit-identical (and match the reference)."""
    case = PagedCase(LAYOUTS["gqa32x8-d128"], CONTEXTS["b7-mixed"], bits, dtype)
    batch = len(case.contexts)
    explicit = kernel.StreamingHeads(
        head_base=case.head_base.cuda(),
        is_stream=torch.zeros(case.kv_heads, dtype=torch.bool, device="cuda"),
        table=torch.ones(batch, 1, dtype=torch.int32, device="cuda"),
        context_lens=torch.ones(batch, dtype=torch.int32, device="cuda"),
    )
    plain = case.run(window=window)
    assert torch.equal(plain, case.run(window=window, streaming=explicit))
    _check(plain, case.reference(window=window), dtype)


@gpu
def test_bad_streaming_inputs_are_named() -> None:
    case = PagedCase(
        LAYOUTS["gqa4x2-d64"],
        [20, 30],
        None,
        torch.float16,
        stream_heads=(0,),
        stream_contexts=[5, 9],
    )
    ops = kernel.EXTENSION.load()
    (k, _), (v, _) = case.operands
    args = (case.q, k, v, None, None, None, None, case.page_table, case.seq_rows, case.context_lens)
    args += (16, 2, 30, 0, 0.125, 128)
    heads = case.streaming
    assert heads is not None
    good = (heads.head_base, heads.is_stream, heads.table, heads.context_lens)
    bad = {
        "pass all of is_stream, stream_table and stream_context_lens or none": (
            *good[:3],
            None,
        ),
        "head_base must be a contiguous vector of 2 entries, got shape [1]": (
            good[0][:1],
            *good[1:],
        ),
        "head_base must be int64, got Int": (good[0].int(), *good[1:]),
        "is_stream must be bool, got Byte": (good[0], good[1].byte(), *good[2:]),
        "stream_table must have a row per request (2), got 1": (*good[:2], good[2][:1], good[3]),
        "stream_table must be int32 [requests, pages]": (*good[:2], good[2].long(), good[3]),
        "stream_context_lens must be a contiguous vector of 2 entries": (*good[:3], good[3][:1]),
    }
    for message, heads_args in bad.items():
        with pytest.raises(RuntimeError, match=re.escape(message)):
            ops.decode_attention(*args, *heads_args)


def test_streaming_heads_checks_its_tensors() -> None:
    good = {
        "head_base": torch.arange(4) * 64,
        "is_stream": torch.tensor([True, False, True, False]),
        "table": torch.zeros(3, 2, dtype=torch.int32),
        "context_lens": torch.ones(3, dtype=torch.int32),
    }
    kernel.StreamingHeads(**good)
    bad = {
        "StreamingHeads.head_base must be a 1-D torch.int64 tensor, got torch.int32 [4]": {
            "head_base": good["head_base"].int()
        },
        "StreamingHeads.is_stream must be a 1-D torch.bool tensor, got torch.uint8 [4]": {
            "is_stream": good["is_stream"].byte()
        },
        "StreamingHeads.table must be a 2-D torch.int32 tensor, got torch.int32 [6]": {
            "table": good["table"].flatten()
        },
        "StreamingHeads.is_stream [3] must match head_base [4]": {
            "is_stream": good["is_stream"][:3]
        },
        "StreamingHeads.context_lens [2] must have one entry per table row (3)": {
            "context_lens": good["context_lens"][:2]
        },
        "StreamingHeads.table is on meta, head_base on cpu": {"table": good["table"].to("meta")},
    }
    for message, change in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            kernel.StreamingHeads(**{**good, **change})


ENGINE_KV_DTYPES = ["auto", "int8", "int4", "fp8"]
ENGINE_KV = [*ENGINE_KV_DTYPES, STATIC]
"""The engine's KV cache formats: a `kv_cache_dtype`, or STATIC for a W8A8 checkpoint with
per-tensor static KV8 scales."""
DECODE_STEPS = 24
LOGIT_TOLERANCE = 0.06
"""Largest logit difference between the two paths, as a fraction of the largest |logit| (of the
step's batch, or of the position for the bundled model).
Random tiny models amplify per-layer rounding differences; on the H100 the worst case seen was
4.1% (qwen2, KV4). The bundled trained model is held to the same bound, except with a KV4 cache
(`KV4_LOGIT_TOLERANCE`)."""
KV4_LOGIT_TOLERANCE = 0.12
"""As LOGIT_TOLERANCE, for the trained model on a KV4 cache. A KV4 code is a 1/15 step of its
row's range: where the paths' different summation orders carry a key or value across a rounding
boundary, that element moves by a whole step for every later token, and the trained model's sharp
attention passes that on. Measured on the H100: 6.2% at 2 of 128 positions (kernel vs torch path)
and up to 10% at isolated positions (CUDA graphs vs eager, tests/test_decode_graphs.py), with
the fp16 cache within 2% on the same prompts."""
TIE_RATE = 0.05
"""Largest fraction of greedy tokens allowed to differ, each only where the generating path's top
two logits are closer than twice the two paths' logit difference (a numerical tie). On the H100:
3 of 96 on random models; the trained model's free-running generations (KV4) parted once in 128
tokens."""


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp(request.param)
    hf = save_servable(request.param, directory, head_dim=64)  # a head_dim the kernel serves
    save_static_kv8_checkpoint(directory, hf, directory / STATIC)
    return directory


@gpu
@pytest.mark.parametrize("kv_cache_dtype", ENGINE_KV)
def test_runner_greedy_with_kernel_equals_torch_path(checkpoint: Path, kv_cache_dtype: str) -> None:
    """Both attention backends decode the same token sequence (the torch path's greedy choices,
    fed to both): logits agree closely and greedy ids are equal except at numerical ties. The
    torch path rounds dequantized K/V and probabilities to fp16; the kernel keeps fp32."""
    static = kv_cache_dtype == STATIC
    runners = {
        backend: ModelRunner(
            EngineConfig.from_kwargs(
                str(checkpoint / STATIC if static else checkpoint),
                device="cuda",
                dtype="float16",
                page_size=16,
                num_kv_pages=64,
                max_num_seqs=8,
                max_num_batched_tokens=256,
                kv_cache_dtype="auto" if static else kv_cache_dtype,
                attention_backend=backend,
            )
        )
        for backend in ("auto", "torch")
    }
    assert runners["auto"]._inputs.decode_kernel and not runners["torch"]._inputs.decode_kernel
    assert isinstance(runners["auto"].model.attention_layers[0].k_cache, StaticInt8Rows) == static
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 384, (n,), generator=g).tolist() for n in (5, 23, 40, 1)]
    requests = {backend: PagedRequests(16, 64) for backend in runners}
    chunks: list[tuple[int, list[int]]] = list(enumerate(prompts))
    compared = ties = 0
    for step in range(DECODE_STEPS + 1):
        logits = {b: runners[b].compute_logits(requests[b].step(chunks))[1] for b in runners}
        got, want = logits["auto"], logits["torch"]
        diff = (got - want).abs().amax(-1)
        assert diff.max() <= LOGIT_TOLERANCE * want.abs().max(), f"step {step}"
        if step > 0:  # decode steps (the first step's prefills and 1-token prompt aside)
            top2 = want.topk(2, -1).values
            differs = got.argmax(-1) != want.argmax(-1)
            assert (~differs | (top2[:, 0] - top2[:, 1] <= 2 * diff)).all(), f"step {step}"
            compared += len(chunks)
            ties += int(differs.sum())
        chunks = [(row, [token]) for row, token in enumerate(want.argmax(-1).tolist())]
    assert ties <= TIE_RATE * compared


@gpu
@pytest.mark.parametrize("kv_cache_dtype", ENGINE_KV_DTYPES)
def test_bundled_model_greedy_with_kernel_equals_torch_path(kv_cache_dtype: str) -> None:
    """The engine's greedy tokens with the decode kernel are the torch path's: the trained model,
    fp16, code prompts and a 2K-token passkey prompt (many pages per request). The torch path
    scores the kernel engine's sequences token by token through its own decode path, and must
    choose every generated token except at a numerical tie (on the H100 the free-running
    generations once parted at such a tie, token 23 of 32, KV4), within the bounds above."""
    needle = "The pass key is 71923. Remember it. 71923 is the pass key. "
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. "
    haystack = filler * 60 + needle + filler * 60 + "What is the pass key? The pass key is"
    prompts = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os", haystack]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    engines = {
        backend: Engine.from_pretrained(
            device="cuda",
            dtype="float16",
            page_size=16,
            num_kv_pages=1024,
            kv_cache_dtype=kv_cache_dtype,
            attention_backend=backend,
        )
        for backend in ("auto", "torch")
    }
    assert all(e.runner._inputs.decode_kernel == (b == "auto") for b, e in engines.items())
    outputs = assert_engines_agree(
        engines["auto"],
        engines["torch"],
        prompts,
        params,
        logit_tolerance=KV4_LOGIT_TOLERANCE if kv_cache_dtype == "int4" else LOGIT_TOLERANCE,
        max_tie_rate=TIE_RATE,
    )
    assert all(len(o.token_ids) == params.max_tokens for o in outputs)
