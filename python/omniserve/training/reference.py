"""Reference numbers of a model directory that the engine must reproduce, computed with the training
model code: perplexity on the directory's `heldout.txt` and passkey retrieval on a small grid.

They are what `omniserve eval ppl` and `omniserve eval niah` measure, by the same definitions
(`text_windows`, `eval_needles`, `retrieved`, greedy decoding), on the shipped fp16 weights upcast
to fp32, so a CPU test can recompute them through the engine in seconds and any gap is an engine
error, not a precision effect. Sized for that test: 16 windows of 512 tokens, 12 needles.

    python -m omniserve.training.reference python/omniserve/assets/model
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .corpus import SourceFile
from .evaluate import greedy_complete, text_windows
from .export import WEIGHTS, load_exported
from .model import LlamaLM
from .needles import EVAL_KEY_DIGITS, EVAL_SEED, PasskeyBuilder, eval_needles, retrieved
from .tokenizer import BOS_ID

HELDOUT_FILE = "heldout.txt"
REFERENCE_FILE = "eval_reference.json"
HELDOUT_MAX_BYTES = 300_000  # shipped inside the package: a sample, not the whole held-out split
PPL_SEQ_LEN = 512
PPL_MAX_WINDOWS = 16
NIAH_LENGTHS = (1024, 2048)
NIAH_DEPTHS = (0.0, 0.5, 1.0)
NIAH_SAMPLES = 2
NIAH_FILLER = "sentences"  # `omniserve eval niah`'s default


def write_heldout(
    directory: Path, files: list[SourceFile], max_bytes: int = HELDOUT_MAX_BYTES
) -> dict:
    """Whole held-out files, in the given order, while they fit in `max_bytes`, one blank line
    between files. Returns what was written (files, bytes, their paths)."""
    parts, paths, total = [], [], 0
    for f in files:
        text = f.text if f.text.endswith("\n") else f.text + "\n"
        size = len(text.encode()) + (1 if parts else 0)
        if total + size > max_bytes:
            continue  # a smaller file further on may still fit
        parts.append(text)
        paths.append(f.rel_path)
        total += size
    (directory / HELDOUT_FILE).write_text("\n".join(parts), encoding="utf-8")
    return {"file": HELDOUT_FILE, "files": len(paths), "bytes": total, "paths": paths}


@torch.no_grad()
def reference_perplexity(
    model: LlamaLM,
    tok: Tokenizer,
    text: str,
    seq_len: int = PPL_SEQ_LEN,
    max_windows: int | None = PPL_MAX_WINDOWS,
    batch: int = 4,
) -> dict:
    """`omniserve eval ppl`'s number: mean NLL of every window token after the leading <s>."""
    device = next(model.parameters()).device
    windows = text_windows(
        tok.encode(text, add_special_tokens=False).ids, seq_len, BOS_ID, max_windows
    )
    total, count = 0.0, 0
    for first in range(0, len(windows), batch):
        ids = torch.tensor(windows[first : first + batch], device=device)
        logits = model.logits(model(ids[:, :-1])).float()
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"
        ).item()
        count += ids[:, 1:].numel()
    nll = total / count
    return {
        "seq_len": seq_len,
        "max_windows": max_windows,
        "windows": len(windows),
        "tokens_scored": count,
        "mean_nll": nll,
        "perplexity": math.exp(nll),
    }


@torch.no_grad()
def reference_niah(
    model: LlamaLM,
    tok: Tokenizer,
    lengths: tuple[int, ...] = NIAH_LENGTHS,
    depths: tuple[float, ...] = NIAH_DEPTHS,
    samples: int = NIAH_SAMPLES,
    filler: str = NIAH_FILLER,
    seed: int = EVAL_SEED,
) -> dict:
    """`omniserve eval niah`'s numbers: greedy completions of the same prompts, scored the same way."""
    needles = eval_needles(PasskeyBuilder(tok), list(lengths), list(depths), samples, filler, seed)
    hits = [[0] * len(depths) for _ in lengths]
    for needle in needles:
        completion = greedy_complete(model, tok, needle.prompt, EVAL_KEY_DIGITS + 2)
        hits[needle.length_index][needle.depth_index] += retrieved(completion, needle.key)
    accuracy = [[round(h / samples, 4) for h in row] for row in hits]
    overall = sum(map(sum, hits)) / (samples * len(lengths) * len(depths))
    return {
        "lengths": list(lengths),
        "depths": list(depths),
        "samples": samples,
        "filler": filler,
        "seed": seed,
        "accuracy": accuracy,
        "overall": overall,
    }


def compute_reference(
    directory: Path, device: torch.device, niah_lengths: tuple[int, ...] = NIAH_LENGTHS
) -> dict:
    """Both reference numbers of the model in `directory`, written to its `eval_reference.json`."""
    t0 = time.perf_counter()
    model = load_exported(directory, device, torch.float32)
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    text = (directory / HELDOUT_FILE).read_text(encoding="utf-8")
    reference = {
        "weights": WEIGHTS,
        # Ties the numbers to the weights: a retrained model with a stale reference fails the test.
        "weights_sha256": hashlib.sha256((directory / WEIGHTS).read_bytes()).hexdigest(),
        "computed_with": {
            "code": "omniserve.training.reference (the training model code, not the engine)",
            "dtype": "float32 (the fp16 weights upcast)",
            "device": str(device),
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
        },
        "perplexity": {"data": HELDOUT_FILE, **reference_perplexity(model, tok, text)},
        "niah": reference_niah(model, tok, niah_lengths),
    }
    reference["computed_with"]["wall_s"] = round(time.perf_counter() - t0, 1)
    (directory / REFERENCE_FILE).write_text(json.dumps(reference, indent=2) + "\n")
    return reference


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", type=Path, help="model directory with heldout.txt")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reference = compute_reference(args.model, device)
    print(json.dumps({"perplexity": reference["perplexity"], "niah": reference["niah"]}, indent=2))
    return reference


if __name__ == "__main__":
    main()
