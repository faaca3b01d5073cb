"""What the sparsity accuracy scripts (`benches/accuracy_static_sparsity.py`,
`benches/accuracy_dynamic_sparsity.py`) share: their common options (model, head pattern,
streaming windows, NIAH grid, device), the engine options those make, and the JSON they write.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from omniserve.engine.engine import bundled_model_path


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=bundled_model_path())
    p.add_argument("--pattern", type=Path, default=None, help="default: the model's attn_pattern/")
    p.add_argument("--static-sparsity", type=float, default=0.5)
    p.add_argument("--windows", type=ints, default=[64, 512, 64, 256], help="sinks and locals")
    p.add_argument("--niah-lengths", type=ints, default=[1024, 2048, 4096, 8000])
    p.add_argument("--niah-depths", type=floats, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--niah-samples", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """Options every system of a run shares: device, dtype, chunk size and `--windows` (prefill
    sink, prefill local, decode sink, decode local tokens)."""
    prefill_sink, prefill_local, decode_sink, decode_local = args.windows
    return {
        "device": args.device,
        "dtype": args.dtype,
        "max_num_batched_tokens": 8192,
        "prefill_sink_tokens": prefill_sink,
        "prefill_local_tokens": prefill_local,
        "decode_sink_tokens": decode_sink,
        "decode_local_tokens": decode_local,
    }


def write_json(path: Path, args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path.write_text(json.dumps({"settings": settings, "results": results}, indent=1))
