"""Decode attention and fused activation-quantization kernels on the GPU, each next to a peer
measured in the same run.

Decode attention (Llama-3-8B heads: 32 query, 8 KV, head_dim 128; page size 64; every request at
the same context length): our kernel over fp16, KV8, KV4 and per-tensor static KV8 paged caches,
torch SDPA over the same context as dense padded fp16 tensors [batch, kv_heads, context, 128]
(flash/efficient backends with GQA), and the engine's torch decode path (`PagedAttention._decode`:
gather + two batched matmuls). Bytes counted per call, all read once: K and V rows (fp16: 256 B
each; KV8: 128 + 4 B of scale and zero; KV4: 64 + 4 B; static KV8: 128 B) for batch × 8 heads ×
context tokens, the queries and outputs (batch × 32 × 128 × 2 B each), and the page-table entries
read (4 B per page). For SDPA, the dense K/V plus queries and outputs. GB/s = bytes / time; the
fraction is of 3.0 TB/s (the H100's measured copy rate).

Fused ops: per-token int8 quant, RMSNorm + quant, residual add + RMSNorm + quant, SiLU·mul + quant
at T tokens × hidden; bytes = input (2 B per value; SiLU reads gate and up, the add x and delta),
weight (RMSNorm), the residual the add writes, int8 codes, 2 B scale and 4 B sum per token; the
peer is the torch reference of `formats/activation.py` on the same GPU. The fused add has a second
peer, the path it replaces in the engine: torch's add, then our RMSNorm + quant kernel.

Timing: CUDA events around each call, the L2 cache flushed before each (a 256 MiB write), the
median of `--repeats` calls after warm-up.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

if TYPE_CHECKING:
    from omniserve.formats.kv import CacheRows

COPY_CEILING_GBPS = 3000.0
HEADS, KV_HEADS, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 64
STATIC_KV8 = "static"
KV_FORMATS: dict[str, int | str | None] = {
    "fp16": None,
    "kv8": 8,
    "kv4": 4,
    "kv8static": STATIC_KV8,
}


def _time_us(fn: Callable[[], object], repeats: int) -> float:
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def _free_bytes() -> int:
    free, _ = torch.cuda.mem_get_info()
    return free


def _row_bytes(bits: int | str | None) -> int:
    if bits is None:
        return HEAD_DIM * 2
    return HEAD_DIM if bits == STATIC_KV8 else HEAD_DIM * int(bits) // 8 + 4


TORCH_PATH_SETTLE_S = 10.0
"""Idle time after the engine's torch path before the next measurement. Its multi-GiB elementwise
kernels leave the H100 slower for some seconds, at an unchanged SM clock; the rows withheld at
batch 64 x 4K in benches/results/h100-kernels-attention.json record such a case."""


def _attention_rows(batch: int, context: int, repeats: int) -> list[dict[str, Any]]:
    """SDPA, then our kernel on every cache format, then the engine's torch path on each (last, and
    followed by `TORCH_PATH_SETTLE_S` of idle time; its rows can be a little slow for it)."""
    rows_out: list[dict[str, Any]] = []
    tokens = batch * KV_HEADS * context
    io_bytes = 2 * batch * HEADS * HEAD_DIM * 2  # queries + outputs
    pages_per_req = math.ceil(context / PAGE_SIZE)
    num_pages = 1 + batch * pages_per_req
    num_slots = num_pages * PAGE_SIZE
    page_table = (1 + torch.randperm(num_pages - 1, device="cuda")).int().view(batch, pages_per_req)
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.float16)
    base = {"batch": batch, "context": context, "op": "decode_attention"}

    def skip(variant: str, need: int) -> None:
        rows_out.append(
            {
                **base,
                "variant": variant,
                "skipped": f"needs {need / 2**30:.1f} GiB, {_free_bytes() / 2**30:.1f} free",
            }
        )

    sdpa_us: float | None = None
    dense_kv = 2 * tokens * HEAD_DIM * 2
    if dense_kv * 1.1 < _free_bytes():
        k = torch.randn(batch, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        qs = q.unsqueeze(2)
        sdpa_us = _time_us(
            lambda: torch.nn.functional.scaled_dot_product_attention(qs, k, v, enable_gqa=True),
            repeats,
        )
        nbytes = dense_kv + io_bytes
        rows_out.append(
            {
                **base,
                "variant": "torch_sdpa_fp16_dense",
                "us": sdpa_us,
                "bytes": nbytes,
                "gbps": nbytes / sdpa_us / 1e3,
                "frac_of_copy_ceiling": nbytes / sdpa_us / 1e3 / COPY_CEILING_GBPS,
            }
        )
        del k, v, qs
    else:
        skip("torch_sdpa_fp16_dense", dense_kv)

    case = _PagedCase(q, page_table, context, num_slots)
    ours_us: dict[str, float] = {}
    for seed, (name, bits) in enumerate(KV_FORMATS.items()):
        kv_bytes = 2 * tokens * _row_bytes(bits)
        if kv_bytes * 1.1 > _free_bytes():
            skip(f"ours_{name}", kv_bytes)
            continue
        cache = case.cache(bits, seed)
        us = ours_us[name] = _time_us(partial(case.ours, cache), repeats)
        nbytes = case.nbytes(bits)
        rows_out.append(
            {
                **base,
                "variant": f"ours_{name}",
                "us": us,
                "bytes": nbytes,
                "gbps": nbytes / us / 1e3,
                "frac_of_copy_ceiling": nbytes / us / 1e3 / COPY_CEILING_GBPS,
                "speedup_vs_sdpa": None if sdpa_us is None else sdpa_us / us,
            }
        )
        del cache
        torch.cuda.empty_cache()

    # The engine's torch path on the same caches. Its transients: long indices, gathered codes,
    # fp32 and fp16 K/V copies, fp32 scores.
    gather_bytes = tokens * (8 + 2 * HEAD_DIM * 7) + batch * HEADS * context * 12
    settle = 0.0
    for seed, (name, bits) in enumerate(KV_FORMATS.items()):
        if name not in ours_us:
            continue
        if (gather_bytes + 2 * tokens * _row_bytes(bits)) * 1.2 > _free_bytes():
            skip(f"engine_torch_gather_{name}", gather_bytes)
            continue
        cache = case.cache(bits, seed)
        gather = case.torch_path(cache)
        # Same data: the two paths must agree (up to the torch path's fp16 roundings).
        max_diff = (gather().float() - case.ours(cache).float()).abs().max().item()
        g_us = _time_us(gather, repeats)
        nbytes = case.nbytes(bits)
        rows_out.append(
            {
                **base,
                "variant": f"engine_torch_gather_{name}",
                "us": g_us,
                "bytes": nbytes,
                "gbps": nbytes / g_us / 1e3,
                "frac_of_copy_ceiling": nbytes / g_us / 1e3 / COPY_CEILING_GBPS,
                "ours_speedup": g_us / ours_us[name],
                "max_abs_diff_vs_ours": max_diff,
            }
        )
        del cache, gather
        torch.cuda.empty_cache()
        settle = TORCH_PATH_SETTLE_S
    time.sleep(settle)
    return rows_out


CacheRowsPair = tuple["CacheRows", "CacheRows"]
"""K and V cache rows of one format (`runner/kv_cache.py`)."""


class _PagedCase:
    """One batch x context point: queries, page table, and caches of each format over them."""

    def __init__(
        self, q: torch.Tensor, page_table: torch.Tensor, context: int, num_slots: int
    ) -> None:
        self.q, self.page_table, self.context, self.num_slots = q, page_table, context, num_slots
        batch = q.shape[0]
        self.seq_rows = torch.arange(batch, dtype=torch.int32, device="cuda")
        self.lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")

    def nbytes(self, bits: int | str | None) -> int:
        tokens = self.q.shape[0] * KV_HEADS * self.context
        return 2 * tokens * _row_bytes(bits) + 2 * self.q.nbytes + self.page_table.nbytes

    def cache(self, bits: int | str | None, seed: int) -> CacheRowsPair:
        """Random K and V rows of format `bits` (None: fp16, or STATIC_KV8), the same per seed."""
        from omniserve.runner.kv_cache import DenseRows, QuantizedRows, StaticInt8Rows

        g = torch.Generator(device="cuda").manual_seed(seed)
        rows = KV_HEADS * self.num_slots
        pair = []
        for _ in range(2):
            if bits is None:
                data = torch.randn(rows, HEAD_DIM, device="cuda", dtype=torch.float16, generator=g)
                pair.append(DenseRows(data))
            elif bits == STATIC_KV8:
                codes = torch.randint(
                    -127, 128, (rows, HEAD_DIM), dtype=torch.int8, device="cuda", generator=g
                )
                pair.append(StaticInt8Rows(codes, torch.tensor(0.02, device="cuda"), torch.float16))
            else:
                assert isinstance(bits, int)
                codes = torch.randint(
                    0,
                    256,
                    (rows, HEAD_DIM * bits // 8),
                    dtype=torch.uint8,
                    device="cuda",
                    generator=g,
                )
                params = (
                    torch.rand(rows, 2, device="cuda", generator=g)
                    .mul_(torch.tensor([0.05, 2 ** (bits - 1)], device="cuda"))
                    .half()
                )
                pair.append(QuantizedRows(codes, params, bits, torch.float16))
        return pair[0], pair[1]

    def ours(self, cache: CacheRowsPair) -> torch.Tensor:
        from omniserve.kernels.attention import decode_attention

        k_rows, v_rows = cache
        return decode_attention(
            self.q,
            k_rows.kernel_operands(),
            v_rows.kernel_operands(),
            self.page_table,
            self.seq_rows,
            self.lens,
            page_size=PAGE_SIZE,
            num_kv_heads=KV_HEADS,
            max_context_len=self.context,
            scale=HEAD_DIM**-0.5,
        )

    def torch_path(self, cache: CacheRowsPair) -> Callable[[], torch.Tensor]:
        """The engine's torch decode path (`PagedAttention._decode`) over the same rows."""
        from omniserve.layers.attention import DecodeGroup, PagedAttention

        batch = self.q.shape[0]
        layer = PagedAttention(HEADS, KV_HEADS, HEAD_DIM, None, fused_rope_kv=False)
        layer.k_cache, layer.v_cache = cache
        pos = torch.arange(self.context, device="cuda")
        slots = self.page_table[:, pos // PAGE_SIZE].long() * PAGE_SIZE + pos % PAGE_SIZE
        kv_index = torch.arange(KV_HEADS, device="cuda")[:, None, None] * self.num_slots + slots
        group = DecodeGroup(
            torch.arange(batch, device="cuda"),
            kv_index,
            torch.ones(batch, self.context, dtype=torch.bool, device="cuda"),
        )
        return partial(layer._decode, self.q, group)


class _FusedCase(NamedTuple):
    ours: Callable[[], object]
    reference: Callable[[], object]
    """The op's torch reference (formats/activation.py)."""
    nbytes: int
    unfused: Callable[[], object] | None = None
    """The engine's path before the fusion, where ours fuses more than one of our ops."""


def _fused_rows(tokens: int, hidden: int, repeats: int) -> list[dict[str, Any]]:
    from omniserve.formats import activation
    from omniserve.kernels import fused

    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    delta = torch.randn_like(x)
    gate_up = torch.randn(tokens, 2 * hidden, device="cuda", dtype=torch.bfloat16)
    weight, eps = torch.ones(hidden, device="cuda", dtype=torch.bfloat16), 1e-5
    out_bytes = tokens * (hidden + 6)
    norm_bytes = x.nbytes + hidden * 2 + out_bytes
    cases = {
        "quantize_per_token": _FusedCase(
            lambda: fused.quantize_per_token(x),
            lambda: activation.quantize_per_token(x),
            x.nbytes + out_bytes,
        ),
        "rmsnorm_quant": _FusedCase(
            lambda: fused.rmsnorm_quant(x, weight, eps),
            lambda: activation.rmsnorm_quant(x, weight, eps),
            norm_bytes,
        ),
        "add_rmsnorm_quant": _FusedCase(
            lambda: fused.add_rmsnorm_quant(x, delta, weight, eps),
            lambda: activation.add_rmsnorm_quant(x, delta, weight, eps),
            norm_bytes + 2 * x.nbytes,  # delta read, residual written
            lambda: fused.rmsnorm_quant(x + delta, weight, eps),
        ),
        "silu_mul_quant": _FusedCase(
            lambda: fused.silu_mul_quant(gate_up),
            lambda: activation.silu_mul_quant(gate_up),
            gate_up.nbytes + out_bytes,
        ),
    }
    rows_out = []
    for op, case in cases.items():
        us, ref_us = _time_us(case.ours, repeats), _time_us(case.reference, repeats)
        gbps = case.nbytes / us / 1e3
        row = {
            "op": op,
            "tokens": tokens,
            "hidden": hidden,
            "us": us,
            "bytes": case.nbytes,
            "gbps": gbps,
            "frac_of_copy_ceiling": gbps / COPY_CEILING_GBPS,
            "torch_reference_us": ref_us,
            "speedup_vs_torch": ref_us / us,
        }
        if case.unfused is not None:
            unfused_us = _time_us(case.unfused, repeats)
            row |= {"unfused_us": unfused_us, "speedup_vs_unfused": unfused_us / us}
        rows_out.append(row)
    return rows_out


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """All rows of the sweep (`args` as from `add_arguments`)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the kernel benchmarks need a CUDA device")
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        if "attention" in args.parts:
            for batch in args.batches:
                for context in args.contexts:
                    rows += _attention_rows(batch, context, args.repeats)
                    torch.cuda.empty_cache()
                    if args.verbose:
                        for row in rows[-7:]:
                            print(json.dumps(row))
        if "fused" in args.parts:
            for hidden in args.hidden:
                for tokens in args.tokens:
                    fused_rows = _fused_rows(tokens, hidden, args.repeats)
                    rows += fused_rows
                    if args.verbose:
                        for row in fused_rows:
                            print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--parts", nargs="+", default=["attention", "fused"], choices=["attention", "fused"]
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 32768])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 256, 4096, 16384])
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096, 14336])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls; the median is kept")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--verbose", action="store_true", help="print rows as they are measured")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_arguments(parser)
    for row in run(parser.parse_args(argv)):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
