"""Streaming heads' prefill attention on the GPU: FlexAttention under the Λ block mask against SDPA.

For a Llama-3-8B layer (32 query / 8 KV heads, head_dim 128, bf16) and one request of L tokens,
times (CUDA events, median of repeats):
- `sdpa dense`: SDPA causal over all heads (the dense prefill of today, flash backend);
- `sdpa half`: SDPA causal over the dense half of the heads (what static sparsity 0.5 keeps);
- `flex stream`: FlexAttention over the streaming half under the Λ mask (`layers/sparse_prefill`);
- `flex causal half`: FlexAttention causal over the dense half (the one-launch alternative);
and reports each one's TFLOP/s on the tiles it computes (causal: half the square; Λ: the tiles
the block mask keeps, partial ones counted whole), and the layer's attention speedup at 0.5:
dense / (sdpa half + flex stream). Also a later chunk: the last `--chunk` queries of L reading the
table's earlier tokens.

    python benches/sparse_prefill.py --lengths 16384,32768,65536,131072 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from omniserve.formats.streaming import StreamTable, StreamWindow
from omniserve.layers.sparse_prefill import (
    BLOCK,
    StreamPrefill,
    StreamWindows,
    block_mask,
    stream_prefill_attention,
)

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 64


def _time(fn, repeats: int) -> float:
    """Median milliseconds of `fn` over `repeats` runs after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _kept_tiles(mask) -> int:
    return int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum())


def measure(length: int, chunk: int | None, windows: StreamWindows, repeats: int) -> dict:
    device = torch.device("cuda")
    table = StreamTable.serving(windows.prefill, windows.decode)
    p0 = 0 if chunk is None else length - chunk
    q_pos = torch.arange(p0, length, device=device)
    k_pos = q_pos if p0 == 0 else torch.cat([table.held(p0, device), q_pos])
    n, num_keys = len(q_pos), len(k_pos)

    def rand(h: int, m: int) -> torch.Tensor:
        return torch.randn(1, h, m, HEAD_DIM, device=device, dtype=torch.bfloat16)

    # Dense heads read every earlier key; streaming heads only what their table holds.
    q, k, v = rand(Q_HEADS, n), rand(KV_HEADS, length), rand(KV_HEADS, length)
    half_q, half_kv = Q_HEADS // 2, KV_HEADS // 2
    sk, sv = rand(half_kv, num_keys), rand(half_kv, num_keys)
    scale = HEAD_DIM**-0.5
    causal = None if p0 == 0 else causal_lower_right(n, length)

    def sdpa(heads_q: int, heads_kv: int):
        return lambda: F.scaled_dot_product_attention(
            q[:, :heads_q],
            k[:, :heads_kv],
            v[:, :heads_kv],
            attn_mask=causal,
            is_causal=causal is None,
            scale=scale,
            enable_gqa=True,
        )

    mask = block_mask(windows, q_pos, k_pos, prompt_len=length)
    stream = StreamPrefill(None, block_mask=mask)
    sq = q[0, half_q:]

    def flex_stream():
        return stream_prefill_attention(sq, sk[0], sv[0], stream, scale)

    # Sinks wider than any context: the Λ rule reduces to causal.
    everything = StreamWindow(1 << 30, 0, PAGE)
    all_pos = torch.arange(length, device=device)
    causal_mask = block_mask(StreamWindows(everything, everything), q_pos, all_pos, length)
    dense_half = StreamPrefill(None, block_mask=causal_mask)

    def flex_causal_half():
        return stream_prefill_attention(
            q[0, :half_q], k[0, :half_kv], v[0, :half_kv], dense_half, scale
        )

    times = {
        "sdpa dense": _time(sdpa(Q_HEADS, KV_HEADS), repeats),
        "sdpa half": _time(sdpa(half_q, half_kv), repeats),
        "flex stream": _time(flex_stream, repeats),
        "flex causal half": _time(flex_causal_half, repeats),
    }
    tile_flops = 4 * BLOCK * BLOCK * HEAD_DIM  # QK^T and PV of one tile, one query head
    causal_flops = 4 * HEAD_DIM * (n * length - n * (n - 1) / 2)  # per query head
    flops = {
        "sdpa dense": Q_HEADS * causal_flops,
        "sdpa half": half_q * causal_flops,
        "flex causal half": half_q * causal_flops,
        "flex stream": half_q * tile_flops * _kept_tiles(mask),
    }
    result = {
        "length": length,
        "queries": n,
        "keys (stream)": num_keys,
        "kept tiles (stream)": _kept_tiles(mask),
        "ms": times,
        "tflops": {name: flops[name] / times[name] / 1e9 for name in times},
    }
    result["layer speedup at 0.5"] = times["sdpa dense"] / (
        times["sdpa half"] + times["flex stream"]
    )
    result["flex stream / sdpa dense tflops"] = (
        result["tflops"]["flex stream"] / result["tflops"]["sdpa dense"]
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--lengths", default="16384,32768,65536,131072")
    parser.add_argument("--chunk", type=int, default=32768, help="also time a last chunk of this")
    parser.add_argument("--sink", type=int, default=128)
    parser.add_argument("--local", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    window = StreamWindow.of_tokens(args.sink, args.local, PAGE)
    windows = StreamWindows(window, StreamWindow.of_tokens(128, 256, PAGE))
    results = []
    for length in map(int, args.lengths.split(",")):
        for chunk in [None] + ([args.chunk] if args.chunk < length else []):
            r = measure(length, chunk, windows, args.repeats)
            results.append(r)
            ms = ", ".join(f"{k} {v:.2f}" for k, v in r["ms"].items())
            tf = ", ".join(f"{k} {v:.0f}" for k, v in r["tflops"].items())
            print(
                f"L={length} q={r['queries']}: ms [{ms}] TFLOP/s [{tf}] "
                f"layer x{r['layer speedup at 0.5']:.2f} "
                f"flex/sdpa {r['flex stream / sdpa dense tflops']:.2f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
