"""Tiny random HF checkpoints of each supported family, and hand-made step plans.

`save_checkpoint(family, directory)` writes a real HF checkpoint (config.json + safetensors, sharded
on request) with transformers itself and returns the HF model, so tests can compare against it.
Weights are re-drawn with a wide spread (and non-zero biases) so that logits have clear margins:
greedy continuations then do not hinge on float rounding, and every tensor is exercised.

`PagedRequests` plays the scheduler's part for runner tests: it gives requests rows and pages
(deliberately out of order) and turns "these requests compute these tokens" into a `StepPlan`.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

from omniserve.formats.checkpoint import CONFIG_FILE, write_checkpoint
from omniserve.formats.kv import static_kv_scales
from omniserve.formats.precision import parse
from omniserve.formats.weight import QuantizedWeight, quantize_weight
from omniserve.quantize.kv_calibration import calibrate_kv_absmax
from omniserve.runner.step_plan import (
    FLAG_NEEDS_LOGITS,
    FLAG_NEW_ROW,
    FLAG_PREFILL,
    StepPlan,
)
from tiny_tokenizer import build_tokenizer

VOCAB_SIZE = 384
"""Matches tests/tiny_tokenizer.py; its special ids are pad 0, bos 1, eos 2."""

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _llama3(**kw: Any) -> PretrainedConfig:
    # original_max_position_embeddings is small so that all three frequency bands of the Llama 3.1
    # scaling (kept, interpolated, divided) occur at head_dim 16.
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    return LlamaConfig(**{**_COMMON, "rope_parameters": rope, **kw})


FAMILIES: dict[str, Callable[..., PretrainedConfig]] = {
    # Llama 3.1 style: GQA, llama3 RoPE scaling.
    "llama3": _llama3,
    # Llama 2 style MHA with linear RoPE scaling.
    "llama_linear_mha": lambda **kw: LlamaConfig(
        **{
            **_COMMON,
            "num_key_value_heads": 4,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
            **kw,
        }
    ),
    # head_dim 32 while hidden / heads = 16.
    "llama_head_dim": lambda **kw: LlamaConfig(**{**_COMMON, "head_dim": 32, **kw}),
    # Sliding window shorter than the test prompts.
    "mistral": lambda **kw: MistralConfig(**{**_COMMON, "sliding_window": 8, **kw}),
    # q/k/v biases, tied embeddings, the second layer with a sliding window.
    "qwen2": lambda **kw: Qwen2Config(
        **{
            **_COMMON,
            "tie_word_embeddings": True,
            "use_sliding_window": True,
            "sliding_window": 8,
            "layer_types": ["full_attention", "sliding_attention"],
            **kw,
        }
    ),
}


TP_SIZES: dict[str, Any] = dict(hidden_size=256, intermediate_size=512)
"""Overrides that split over two ranks in every weight format: row-parallel inputs keep whole
128-groups (o_proj: 4 heads x 64 = 256 → 128 per rank; down_proj: 512 → 256) and every shard's
output channels whole 32-channel tiles."""


def tiny_config(family: str, **overrides: Any) -> PretrainedConfig:
    return FAMILIES[family](**overrides)


def save_checkpoint(
    family: str | PretrainedConfig,
    directory: str | Path,
    *,
    seed: int = 0,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> PreTrainedModel:
    """Write a random checkpoint of `family` (a FAMILIES key or a config) into `directory`; returns
    the fp32 HF model in eval mode. `max_shard_size` (e.g. "20KB") writes sharded safetensors with
    an index."""
    config = tiny_config(family, **overrides) if isinstance(family, str) else family
    model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.15 * torch.randn(param.shape, generator=generator))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(directory), **kwargs)
    return model.eval()


def save_servable(
    family: str | PretrainedConfig, directory: str | Path, **kwargs: Any
) -> PreTrainedModel:
    """`save_checkpoint` plus the real tiny tokenizer: a directory `Engine.from_pretrained`
    serves text with."""
    model = save_checkpoint(family, directory, **kwargs)
    build_tokenizer(directory)
    return model


def save_static_kv8_checkpoint(
    fp_dir: Path, hf: PreTrainedModel, out: Path, scale_factor: float = 1.0
) -> Path:
    """A W8A8 RTN checkpoint of the servable `fp_dir` (whose HF model is `hf`) with per-tensor
    static KV8 scales calibrated on the model the checkpoint computes (`fake_quantized`), times
    `scale_factor`; with the tokenizer, so engines serve it."""
    precision = parse("w8a8")
    source = load_file(str(fp_dir / "model.safetensors"))
    linears = {
        n.removesuffix(".weight"): quantize_weight(t.float(), precision)
        for n, t in source.items()
        if n.startswith("model.layers.") and n.endswith("_proj.weight")
    }
    tensors = {n: t for n, t in source.items() if n.removesuffix(".weight") not in linears}
    g = torch.Generator().manual_seed(7)
    windows = [torch.randint(3, VOCAB_SIZE, (64,), generator=g).tolist() for _ in range(4)]
    scales = static_kv_scales(calibrate_kv_absmax(fake_quantized(hf, linears), windows))
    config = json.loads((fp_dir / CONFIG_FILE).read_text())
    write_checkpoint(
        out, config, precision, linears, tensors, {"method": "rtn"}, scales * scale_factor
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((fp_dir / name).read_bytes())
    return out


def fake_quantized(hf: PreTrainedModel, linears: dict[str, QuantizedWeight]) -> PreTrainedModel:
    """A copy of `hf` computing with the dequantized weights Ŵ of `linears` (by module prefix)."""
    model = copy.deepcopy(hf)
    state = model.state_dict()
    with torch.no_grad():
        for prefix, weight in linears.items():
            state[f"{prefix}.weight"].copy_(weight.dequantize())
    return model


def hf_logits(model: PreTrainedModel, ids: Sequence[int]) -> torch.Tensor:
    """fp32 logits [len(ids), vocab] of HF's forward over the whole sequence."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(torch.tensor([list(ids)], device=device)).logits[0].float().cpu()


def hf_greedy(model: PreTrainedModel, ids: Sequence[int], num_tokens: int) -> list[int]:
    """HF `generate` greedy continuation of exactly `num_tokens` tokens (eos does not stop it)."""
    device = next(model.parameters()).device
    out = model.generate(
        torch.tensor([list(ids)], device=device),
        do_sample=False,
        max_new_tokens=num_tokens,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


MIXED_STEPS: list[list[tuple[int, int]]] = [
    [(0, 23), (2, 1), (4, 40)],
    [(0, 1), (2, 1), (4, 9), (5, 17)],
    [(0, 1), (2, 30), (4, 1), (5, 1), (1, 2)],
    [(0, 1), (1, 1), (2, 1), (4, 1), (5, 1)],
]
"""(row, tokens) per step: prefills, chunked prefills, decodes and mixes of them, for attention
tests driving `PagedRequests` (a row seen first starts a request)."""


class PagedRequests:
    """Rows and pages for requests, as the scheduler would assign them, and StepPlans over them.
    With `stream` (a streaming pool's `(num_pages, table width)`), a new row also gets a full
    streaming table."""

    def __init__(
        self,
        page_size: int,
        num_pages: int,
        seed: int = 0,
        stream: tuple[int, int] | None = None,
    ) -> None:
        self.page_size = page_size
        self._free = list(range(1, num_pages))  # page 0 is the null page
        random.Random(seed).shuffle(self._free)  # so that a request's pages are not contiguous
        self._pages: dict[int, list[int]] = {}
        self._stream_width = 0 if stream is None else stream[1]
        self._stream_free = [] if stream is None else list(range(1, stream[0]))
        random.Random(seed + 1).shuffle(self._stream_free)
        self._stream_pages: dict[int, list[int]] = {}
        self.cached: dict[int, int] = {}
        """Tokens of each row already in the KV cache."""

    def step(
        self,
        chunks: Sequence[tuple[int, Sequence[int]]],
        needs_logits: Sequence[bool] | None = None,
    ) -> StepPlan:
        """A plan in which each (row, token ids) computes those tokens after the row's cached ones;
        a row not seen before starts a new request. Every request samples unless told otherwise."""
        rows, pos0, num_new, flags, ids, updates, stream_updates = [], [], [], [], [], [], []
        for i, (row, tokens) in enumerate(chunks):
            flag = FLAG_PREFILL if len(tokens) > 1 else 0
            if row not in self._pages:
                self._pages[row], self.cached[row] = [], 0
                flag |= FLAG_NEW_ROW
                stream = [self._stream_free.pop() for _ in range(self._stream_width)]
                self._stream_pages[row] = stream
                stream_updates.extend((row, column, page) for column, page in enumerate(stream))
            pages = self._pages[row]
            start = self.cached[row]
            end = start + len(tokens)
            while len(pages) * self.page_size < end:
                pages.append(self._free.pop())
                updates.append((row, len(pages) - 1, pages[-1]))
            if needs_logits is None or needs_logits[i]:
                flag |= FLAG_NEEDS_LOGITS
            rows.append(row)
            pos0.append(start)
            num_new.append(len(tokens))
            flags.append(flag)
            ids.extend(tokens)
            self.cached[row] = end
        qstart = [0]
        for count in num_new:
            qstart.append(qstart[-1] + count)
        i32 = torch.int32
        return StepPlan.of(
            rows=torch.tensor(rows, dtype=i32),
            pos0=torch.tensor(pos0, dtype=i32),
            num_new=torch.tensor(num_new, dtype=i32),
            qstart=torch.tensor(qstart, dtype=i32),
            flags=torch.tensor(flags, dtype=i32),
            input_ids=torch.tensor(ids, dtype=i32),
            page_updates=torch.tensor(updates, dtype=i32).reshape(-1, 3),
            stream_updates=torch.tensor(stream_updates, dtype=i32).reshape(-1, 3),
        )

    def release(self, row: int) -> None:
        self._free.extend(self._pages.pop(row))
        self._stream_free.extend(self._stream_pages.pop(row))
        del self.cached[row]
