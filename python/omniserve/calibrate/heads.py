"""Learning a head pattern with DuoAttention's method (Xiao et al. 2024, `duo_attn/train.py`).

Every KV head gets a gate α, initialised to 1 and clamped to [0, 1] after each step, that mixes
its attention output as α · full + (1 − α) · streaming (`GatedLlama`). The model stays frozen;
only the gates train, against

    loss = mean over supervised positions of mean((h_mixed − h_full)²)  +  reg_weight · mean(α)

where h are final hidden states (after the last norm) of the gated model and of the model itself,
on synthetic passkey documents. The supervised positions are those that produce the answer:
retrieving the key needs tokens far outside any streaming window, so a head whose gate the
distillation term holds up is one that retrieval needs, and the L1 term pushes every other gate
towards 0. AdamW without weight decay, DuoAttention's schedule (linear warm-up over the first
fifth of the steps, linear decay over the last fifth, never below 0.1x), one document per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from omniserve.calibrate.gated_model import GatedLlama
from omniserve.training.needles import PasskeyBuilder, random_key

FILLERS = ("classic", "sentences")
"""Filler kinds of the training documents (code filler needs a corpus the command does not have)."""
DEPTHS = (0.05, 0.95)
"""Needle depths are drawn uniformly from this range (DuoAttention's defaults)."""
KEY_DIGITS = (5, 8)
"""Key lengths are drawn from this half-open range."""


@dataclass(frozen=True)
class CalibrationSettings:
    steps: int
    lr: float
    """Peak learning rate (DuoAttention: 0.02)."""
    reg_weight: float
    """Weight of the L1 term (DuoAttention: 0.05)."""
    context_lengths: tuple[int, ...]
    """Document lengths in tokens, one drawn per step."""
    seed: int
    """Seeds the documents (nothing else is random)."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.reg_weight < 0 or not self.context_lengths:
            raise ValueError(
                f"calibration needs steps >= 1, lr > 0, reg_weight >= 0, context lengths: {self}"
            )


@dataclass(frozen=True)
class PasskeyDocument:
    ids: torch.Tensor
    """int64 [tokens]: <s> (the model's), task, filler, needle, filler, question, answer."""
    supervised: slice
    """Positions whose hidden states predict the answer tokens, and the token after them."""


def passkey_documents(
    builder: PasskeyBuilder, lengths: tuple[int, ...], seed: int
) -> Iterator[PasskeyDocument]:
    """Endless fresh passkey documents of random length (from `lengths`), depth, key and filler."""
    rng = np.random.default_rng(seed)
    # What the tokenizer puts before any text (<s>, or nothing), as prompts are encoded.
    lead = builder.tok.encode("").ids
    while True:
        length = lengths[int(rng.integers(len(lengths)))]
        key = random_key(rng, int(rng.integers(*KEY_DIGITS)))
        filler = FILLERS[int(rng.integers(len(FILLERS)))]
        doc = builder.build(length, float(rng.uniform(*DEPTHS)), key, filler, rng)
        # The builder writes the bundled tokenizer's <s>; the answer is the last token needed.
        ids = np.concatenate([lead, doc.ids[1 : doc.answer_end]]).astype(np.int64)
        offset = len(lead) - 1  # where the builder's position p is now
        yield PasskeyDocument(
            torch.from_numpy(ids), slice(doc.answer_start - 1 + offset, doc.answer_end + offset)
        )


def calibrate_heads(
    model: GatedLlama,
    builder: PasskeyBuilder,
    settings: CalibrationSettings,
    progress: bool = True,
) -> torch.Tensor:
    """Learned gates, fp32 [layers, kv_heads] in [0, 1], after `settings.steps` documents of
    `builder` (on the model's tokenizer); a progress bar on stderr if `progress`."""
    device = next(model.parameters()).device
    documents = passkey_documents(builder, settings.context_lengths, settings.seed)
    gates = torch.ones(
        model.cfg.num_layers, model.cfg.num_kv_heads, device=device, requires_grad=True
    )
    optimizer = torch.optim.AdamW([gates], lr=settings.lr, weight_decay=0.0)
    ramp = max(settings.steps // 5, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(
            1.0, max((step + 1) / ramp, 0.1), max((settings.steps - step) / ramp, 0.1)
        ),
    )
    bar = tqdm(total=settings.steps, desc="calibrate-heads", disable=not progress)
    try:
        for _, doc in zip(range(settings.steps), documents):
            ids = doc.ids.to(device)[None]
            with torch.no_grad():
                model.set_gates(None)
                target = model(ids)[0, doc.supervised].float()
            model.set_gates(gates)
            mixed = model(ids)[0, doc.supervised].float()
            distill = (mixed - target).pow(2).mean(-1).mean()
            reg = gates.abs().mean()
            optimizer.zero_grad()
            (distill + settings.reg_weight * reg).backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            bar.set_postfix(
                tokens=ids.shape[1], distill=f"{distill.item():.3g}", mean_gate=f"{reg.item():.3f}"
            )
            bar.update()
    finally:
        bar.close()
        model.set_gates(None)
    return gates.detach().float()
