"""Calibration data and the statistics the QoQ transforms need, gathered one layer at a time.

`load_calibration` streams a text file through the model's tokenizer until it has `num_samples`
windows of `seq_len` tokens (each `<s>` + seq_len − 1 text tokens, as `omniserve eval ppl` feeds
text), so a corpus of any size costs only the tokens used; the whole file is still hashed so that
the recipe pins exactly which file calibrated the model.

`LayerStatistics` is the observer of `layer_forward` (model.py): for each linear input it keeps
the per-channel maxima (smoothing, SmoothAttention, reordering), an evenly strided sample of at
most `max_rows` token rows (clipping and smoothing searches, error reports) and, for GPTQ, the
Hessian Xᵀ X accumulated over every token. Nothing else of the layer's activations is kept.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from omniserve.errors import ConfigError
from omniserve.quantize.qoq.model import KEYS, READERS, VALUES

_CHUNK_BYTES = 1 << 20
"""Text read and tokenized per step (split at a line end, so no token is cut)."""


@dataclass(frozen=True)
class CalibrationData:
    ids: torch.Tensor
    """int64 [num_samples, seq_len] token windows."""
    path: str
    sha256: str
    size_bytes: int

    def recipe(self) -> dict[str, Any]:
        """The recipe entry that identifies this calibration set."""
        return {
            "file": Path(self.path).name,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "num_samples": int(self.ids.shape[0]),
            "seq_len": int(self.ids.shape[1]),
        }


def load_calibration(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, num_samples: int, seq_len: int
) -> CalibrationData:
    """`num_samples` consecutive windows of `seq_len` tokens from the start of the text file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"calibration file {path} does not exist or is not a file")
    if num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2, got {seq_len}")
    bos = tokenizer.bos_token_id
    step = seq_len - (0 if bos is None else 1)
    needed = num_samples * step
    ids: list[int] = []
    digest = hashlib.sha256()
    pending = b""
    with file.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
            if len(ids) >= needed:
                continue  # keep hashing the rest of the file
            text, _, pending = (pending + chunk).rpartition(b"\n")
            if text:
                ids += tokenizer.encode(_decode(text + b"\n", file), add_special_tokens=False)
        if len(ids) < needed and pending:
            ids += tokenizer.encode(_decode(pending, file), add_special_tokens=False)
    if len(ids) < needed:
        raise ConfigError(
            f"calibration file {path} has {len(ids)} tokens, fewer than num_samples × "
            f"(seq_len{'' if bos is None else ' − 1'}) = {num_samples} × {step} = {needed}; "
            "lower --num-samples or --seq-len or use a larger file"
        )
    windows = torch.tensor(ids[:needed], dtype=torch.int64).view(num_samples, step)
    if bos is not None:
        windows = torch.cat((torch.full((num_samples, 1), bos, dtype=torch.int64), windows), 1)
    return CalibrationData(windows, str(file), digest.hexdigest(), file.stat().st_size)


def _decode(data: bytes, file: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"calibration file {file} is not UTF-8 text: {exc}") from None


@dataclass
class PointStatistics:
    """What is kept of one activation point (see the module doc)."""

    absmax: torch.Tensor | None = None
    """fp32 per-channel max |x| (for KEYS: [kv_heads, head_dim])."""
    sample: list[torch.Tensor] = field(default_factory=list)
    """Strided rows [*, channels], concatenated by `rows`."""
    hessian: torch.Tensor | None = None
    """fp32 Σ xᵀ x [channels, channels] over all tokens (GPTQ only)."""
    tokens: int = 0
    """Tokens seen so far (the stride's phase)."""

    def rows(self) -> torch.Tensor:
        return torch.cat(self.sample)


class LayerStatistics:
    """Observer of one layer's forward over the calibration set (see the module doc)."""

    def __init__(self, total_tokens: int, max_rows: int, hessians: bool) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.stride = -(-total_tokens // max_rows)
        self.hessians = hessians
        self.points: dict[str, PointStatistics] = {p: PointStatistics() for p in (*READERS, KEYS)}

    def __call__(self, point: str, x: torch.Tensor) -> None:
        if point == VALUES:  # read only by the static-KV8 calibration (quantizer._kv_absmax)
            return
        stats = self.points[point]
        absmax = x.abs().amax(dim=0)
        stats.absmax = absmax if stats.absmax is None else torch.maximum(stats.absmax, absmax)
        if point == KEYS:  # only its maxima are used
            return
        first = (-stats.tokens) % self.stride  # the next multiple of the stride, in this batch
        stats.sample.append(x[first :: self.stride].clone())
        stats.tokens += x.shape[0]
        if self.hessians:
            gram = x.t() @ x
            stats.hessian = gram if stats.hessian is None else stats.hessian + gram
