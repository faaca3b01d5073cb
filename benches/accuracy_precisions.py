"""Accuracy of one model at every precision through the engine: perplexity (round-to-nearest vs
QoQ) and, with --niah-lengths, passkey retrieval (fp weights and QoQ; fp8, which QoQ does not
target, with its round-to-nearest weights).

    python benches/accuracy_precisions.py --niah-lengths 1024,8192 --output accuracy.json

Defaults: the bundled model, its `heldout.txt`, fp32 on CPU. QoQ calibrates on training-split
files of this interpreter's standard library (the split of `omniserve.training.corpus`, so never
a held-out file), written to a temporary file in corpus order. Each row builds its checkpoint in a
temporary directory: RTN by `write_rtn_checkpoint`, QoQ by `quantize_checkpoint` with the default
recipe except a shorter clipping search (--clip-steps, --max-rows), which keeps a row to seconds
on a small model.
NIAH runs `omniserve.eval.niah` on the grid given (filler "sentences", the evaluation seed).
Prints a markdown table and writes JSON with every number and the settings.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from omniserve.engine.engine import Engine, bundled_model_path
from omniserve.eval.niah import run_niah
from omniserve.eval.perplexity import perplexity, read_text
from omniserve.formats.precision import PER_CHANNEL, parse
from omniserve.quantize.qoq import QoQOptions, load_calibration, quantize_checkpoint
from omniserve.quantize.rtn_model import write_rtn_checkpoint
from omniserve.training.corpus import load_corpus, stdlib_dir

ROWS: tuple[tuple[str, int], ...] = (
    ("w16a16", PER_CHANNEL),
    ("w16a16kv8", PER_CHANNEL),
    ("w16a16kv4", PER_CHANNEL),
    ("w8a8kv8", PER_CHANNEL),
    ("w8a8kv4", PER_CHANNEL),
    ("w4a8", 128),
    ("w4a8kv4", 128),
    ("w4a8kv4", PER_CHANNEL),
    ("fp8", PER_CHANNEL),
)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def calibration_text(max_bytes: int) -> str:
    corpus = load_corpus(stdlib_dir(), max_bytes, held_out_percent=3, site_packages=False)
    return "\n\n".join(f.text for f in corpus.train)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", type=Path, default=bundled_model_path())
    p.add_argument("--data", type=Path, default=None, help="default: the model's heldout.txt")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--calib-bytes", type=int, default=400_000)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--clip-steps", type=int, default=11)
    p.add_argument("--max-rows", type=int, default=1024)
    p.add_argument(
        "--niah-lengths", type=_ints, default=None, help="e.g. 1024,8192 (default: no NIAH)"
    )
    p.add_argument("--niah-depths", type=_floats, default=[0.0, 0.5, 1.0])
    p.add_argument("--niah-samples", type=int, default=2)
    p.add_argument("--output", type=Path, default=None, help="JSON file")
    args = p.parse_args()

    from transformers import AutoTokenizer

    text = read_text(args.data or args.model / "heldout.txt")
    tokenizer = AutoTokenizer.from_pretrained(str(args.model), local_files_only=True)
    options = QoQOptions(clip_steps=args.clip_steps, max_rows=args.max_rows)
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        calib_file = Path(tmp) / "calibration.txt"
        calib_file.write_text(calibration_text(args.calib_bytes), encoding="utf-8")
        calibration = load_calibration(
            calib_file, tokenizer, args.calib_samples, args.calib_seq_len
        )

        def evaluate(
            model: Path, precision: str, group_size: int, row: dict, key: str, niah: bool
        ) -> None:
            """row[key] = perplexity; row["niah"] = the NIAH grid when `niah` and one was asked
            for."""
            engine = Engine.from_pretrained(
                model,
                precision=precision,
                group_size=group_size,
                device=args.device,
                dtype=args.dtype,
                max_num_batched_tokens=8192,
            )
            row[key] = perplexity(engine, text, args.seq_len, args.max_windows).perplexity
            if niah and args.niah_lengths:
                result = run_niah(engine, args.niah_lengths, args.niah_depths, args.niah_samples)
                row["niah"] = {"accuracy": result.accuracy, "overall": result.overall}

        for name, group_size in ROWS:
            precision = parse(name, group_size)
            row: dict = {"precision": name, "group_size": group_size}
            start = time.perf_counter()
            if not precision.quantized_weights:
                evaluate(args.model, name, group_size, row, "fp_weights", niah=True)
            elif precision.float8:
                rtn_dir = Path(tmp) / f"rtn-{name}"
                write_rtn_checkpoint(args.model, rtn_dir, precision)
                evaluate(rtn_dir, name, group_size, row, "rtn", niah=True)
            else:
                rtn_dir, qoq_dir = (
                    Path(tmp) / f"rtn-{name}-{group_size}",
                    Path(tmp) / f"qoq-{name}-{group_size}",
                )
                write_rtn_checkpoint(args.model, rtn_dir, precision)
                evaluate(rtn_dir, name, group_size, row, "rtn", niah=False)
                quantize_checkpoint(
                    args.model,
                    qoq_dir,
                    precision,
                    calibration,
                    options,
                    torch.device(args.device),
                    progress=False,
                )
                evaluate(qoq_dir, name, group_size, row, "qoq", niah=True)
            row["seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps(row), flush=True)
            results.append(row)

    print("\n| precision | group | fp weights | RTN | QoQ |\n| --- | --- | --- | --- | --- |")
    for r in results:
        cells = [f"{r[k]:.3f}" if k in r else "–" for k in ("fp_weights", "rtn", "qoq")]
        group = "per-channel" if r["group_size"] == PER_CHANNEL else str(r["group_size"])
        print(f"| {r['precision']} | {group} | " + " | ".join(cells) + " |")
    if args.niah_lengths:
        lengths = " | ".join(str(n) for n in args.niah_lengths)
        print(
            f"\nNIAH (fp weights, QoQ, or RTN for fp8), accuracy per context length over depths "
            f"{args.niah_depths}, {args.niah_samples} needles per cell\n"
        )
        print(
            f"| precision | group | {lengths} | all |\n|" + " --- |" * (len(args.niah_lengths) + 3)
        )
        for r in results:
            acc = r["niah"]["accuracy"]
            cells = " | ".join(f"{sum(row) / len(row):.0%}" for row in acc)
            group = "per-channel" if r["group_size"] == PER_CHANNEL else str(r["group_size"])
            print(f"| {r['precision']} | {group} | {cells} | {r['niah']['overall']:.1%} |")
    if args.output is not None:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.output.write_text(json.dumps({"settings": settings, "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
