"""Passkey retrieval of a model whose streaming heads attend under the Λ mask, the others densely.

What a head pattern costs in accuracy, measured without the serving engine: the training code's
teacher-forced passkey check (`training.evaluate.passkey_accuracy`, exactly greedy decoding) on a
`GatedLlama` with binary gates.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from omniserve.calibrate.gated_model import GatedLlama
from omniserve.training.evaluate import passkey_accuracy
from omniserve.training.needles import PasskeyBuilder


def retrieval_accuracy(
    model: GatedLlama,
    tok: Tokenizer,
    builder: PasskeyBuilder,
    streaming: torch.Tensor | None,
    *,
    lengths: list[int],
    depths: list[float],
    samples: int,
    seed: int,
    filler: str = "sentences",
) -> float:
    """Fraction of fresh 5-digit keys retrieved, `samples` per (length, depth), with the heads
    where `streaming` (bool [layers, kv_heads]) is True on the model's streaming window; None:
    every head dense. The same seed gives every pattern the same prompts."""
    device = next(model.parameters()).device
    model.set_gates(None if streaming is None else (~streaming).to(device, torch.float32))
    try:
        result = passkey_accuracy(model, tok, builder, lengths, depths, [filler], samples, seed)
    finally:
        model.set_gates(None)
    return float(result[filler]["overall"])
