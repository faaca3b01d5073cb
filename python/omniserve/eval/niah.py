"""Needle-in-a-haystack (passkey retrieval) through the engine over a grid of context lengths and
needle depths. Documents come from the same builder the bundled model was trained with
(`omniserve.training.needles`), with keys and filler drawn from a seed training never used."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import msgspec
import numpy as np

from omniserve.engine.engine import Engine
from omniserve.errors import ConfigError
from omniserve.sampling_params import SamplingParams
from omniserve.training.needles import (
    EVAL_KEY_DIGITS,
    EVAL_SEED,
    FILLERS,
    PasskeyBuilder,
    eval_needles,
    retrieved,
)


class NiahResult(msgspec.Struct, frozen=True):
    lengths: list[int]
    depths: list[float]
    samples: int
    filler: str
    accuracy: list[list[float]]
    """accuracy[i][j] for lengths[i] and depths[j]."""
    overall: float


def run_niah(
    engine: Engine,
    lengths: Sequence[int],
    depths: Sequence[float],
    samples: int,
    filler: str = "sentences",
    seed: int = EVAL_SEED,
) -> NiahResult:
    if engine.tokenizer is None:
        raise ConfigError("needle-in-a-haystack needs the model's tokenizer")
    if filler not in FILLERS or filler == "code":
        raise ConfigError(f"filler must be 'classic' or 'sentences', got {filler!r}")
    if max(lengths) > engine.max_model_len:
        raise ConfigError(f"context {max(lengths)} exceeds max_model_len {engine.max_model_len}")
    builder = PasskeyBuilder(engine.tokenizer.backend_tokenizer)
    needles = eval_needles(builder, list(lengths), list(depths), samples, filler, seed)
    params = SamplingParams(max_tokens=EVAL_KEY_DIGITS + 2, temperature=0.0)
    outs = engine.generate([n.prompt for n in needles], params, use_tqdm=True)
    hits = np.zeros((len(lengths), len(depths)))
    for out, needle in zip(outs, needles):
        hits[needle.length_index, needle.depth_index] += retrieved(out.text, needle.key)
    accuracy = hits / samples
    return NiahResult(
        list(lengths),
        list(depths),
        samples,
        filler,
        accuracy.round(4).tolist(),
        float(accuracy.mean()),
    )


def plot_heatmap(result: NiahResult, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(result.depths) + 2, 0.6 * len(result.lengths) + 1.5))
    image = ax.imshow(np.array(result.accuracy), vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(result.depths)), [f"{d:.2f}" for d in result.depths])
    ax.set_yticks(range(len(result.lengths)), [str(n) for n in result.lengths])
    for i, row in enumerate(result.accuracy):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context tokens")
    ax.set_title(f"{title}: {result.overall:.3f}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
