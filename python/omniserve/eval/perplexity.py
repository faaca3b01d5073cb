"""Perplexity of a text file through the engine (prompt log-probabilities), any precision or
attention setting: the same numbers the model card records for the bundled model."""

from __future__ import annotations

import math
from pathlib import Path

import msgspec

from omniserve.engine.engine import Engine
from omniserve.errors import ConfigError
from omniserve.sampling_params import SamplingParams
from omniserve.training.evaluate import text_windows


class PerplexityResult(msgspec.Struct, frozen=True):
    perplexity: float
    mean_nll: float
    tokens_scored: int
    windows: int
    seq_len: int


def perplexity(
    engine: Engine, text: str, seq_len: int, max_windows: int | None = None
) -> PerplexityResult:
    if engine.tokenizer is None:
        raise ConfigError("perplexity needs the model's tokenizer")
    if seq_len > engine.max_model_len:
        raise ConfigError(f"seq_len {seq_len} exceeds max_model_len {engine.max_model_len}")
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    try:
        prompts = text_windows(ids, seq_len, engine.tokenizer.bos_token_id, max_windows)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=True)
    total, count = 0.0, 0
    for out, prompt in zip(engine.generate(prompts, params, use_tqdm=True), prompts):
        scored = out.prompt_logprobs[1:] if out.prompt_logprobs else []
        if len(scored) != len(prompt) - 1:
            raise RuntimeError(f"engine scored {len(scored)} of {len(prompt) - 1} tokens")
        total -= sum(scored)  # type: ignore[arg-type]
        count += len(scored)
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, len(prompts), seq_len)


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
