"""Offline generation throughput in QServe's setting, next to HF transformers in the same run.

Setting: random-token prompts of a fixed length, a fixed number of generated tokens (EOS
ignored), a fixed batch submitted at once; throughput = generated tokens / wall time, prefill
included. The model is built from a config alone with random weights, so any shape can be
measured without downloading weights (speed does not depend on the weights' values, except
through EOS, which is ignored).
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec
import torch

from omniserve.config import EngineConfig

PRESETS = ("llama-3-8b", "llama-2-7b", "tiny-llama")


class RunResult(msgspec.Struct, frozen=True):
    system: str
    batch: int
    input_len: int
    output_len: int
    wall_s: float | None
    tokens_per_s: float | None
    error: str | None = None


def preset_config(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown model config preset {name!r}; choose one of {', '.join(PRESETS)}")
    path = resources.files("omniserve") / "bench" / "model_configs" / f"{name}.json"
    return json.loads(path.read_text())


def _materialize(model: str | None, preset: str | None, tmp: Path) -> str:
    """A checkpoint directory holding at least config.json."""
    if model is not None:
        return model
    (tmp / "config.json").write_text(json.dumps(preset_config(preset or "llama-3-8b")))
    return str(tmp)


def _prompts(batch: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Stay clear of the low ids where special tokens usually live.
    return torch.randint(16, vocab, (batch, input_len), generator=g).tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_omniserve(
    config: EngineConfig, batches: Sequence[int], input_len: int, output_len: int, seed: int
) -> tuple[list[RunResult], dict[str, Any], torch.device, torch.dtype]:
    from omniserve.engine.engine import Engine
    from omniserve.sampling_params import SamplingParams

    engine = Engine(config)
    device, vocab = engine.runner.device, engine.runner.vocab_size
    info = {"device": _device_name(device), "dtype": str(engine.runner.dtype), **engine.runner.memory_report()}
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    engine.generate(_prompts(2, min(input_len, 64), vocab, seed), SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    results = []
    for batch in batches:
        prompts = _prompts(batch, input_len, vocab, seed + batch)
        _sync(device)
        start = time.perf_counter()
        outs = engine.generate(prompts, params, use_tqdm=False)
        _sync(device)
        wall = time.perf_counter() - start
        generated = sum(o.num_generated_tokens for o in outs)
        results.append(RunResult("omniserve", batch, input_len, output_len, wall, generated / wall))
    info["preemptions"] = engine.stats().num_preemptions
    dtype = engine.runner.dtype
    del engine
    _free_cuda()
    return results, info, device, dtype


def bench_transformers(
    model_dir: str,
    device: torch.device,
    dtype: torch.dtype,
    batches: Sequence[int],
    input_len: int,
    output_len: int,
    seed: int,
) -> list[RunResult]:
    """HF transformers `generate()` on the same shape and dtype, weights random as well."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    results = []
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
    except torch.OutOfMemoryError as exc:
        return [RunResult("hf-transformers", b, input_len, output_len, None, None, f"OOM: {exc}") for b in batches]
    vocab = hf_config.vocab_size

    def generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

    warm = torch.tensor(_prompts(2, min(input_len, 64), vocab, seed), device=device)
    generate(model, warm, 8)
    for batch in batches:
        ids = torch.tensor(_prompts(batch, input_len, vocab, seed + batch), device=device)
        try:
            _sync(device)
            start = time.perf_counter()
            out = generate(model, ids, output_len)
            _sync(device)
            wall = time.perf_counter() - start
            generated = (out.shape[1] - input_len) * batch
            results.append(RunResult("hf-transformers", batch, input_len, output_len, wall, generated / wall))
        except torch.OutOfMemoryError as exc:
            results.append(RunResult("hf-transformers", batch, input_len, output_len, None, None, f"OOM: {str(exc)[:200]}"))
        _free_cuda()
    del model
    _free_cuda()
    return results


def run(
    *,
    model: str | None,
    preset: str | None,
    batches: Sequence[int],
    input_len: int,
    output_len: int,
    peers: Sequence[str],
    seed: int,
    engine_options: dict[str, Any],
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _materialize(model, preset, Path(tmp))
        options = {
            "load_format": "dummy",
            "skip_tokenizer_init": True,
            "max_num_seqs": max(batches),
            **engine_options,
        }
        config = EngineConfig.from_kwargs(model_dir, **options)
        ours, info, device, dtype = bench_omniserve(config, batches, input_len, output_len, seed)
        results = list(ours)
        if "hf" in peers:
            results += bench_transformers(model_dir, device, dtype, batches, input_len, output_len, seed)
    by_key = {(r.system, r.batch): r for r in results}
    ratios = {}
    for b in batches:
        mine, peer = by_key.get(("omniserve", b)), by_key.get(("hf-transformers", b))
        if mine and peer and mine.tokens_per_s and peer.tokens_per_s:
            ratios[str(b)] = mine.tokens_per_s / peer.tokens_per_s
    return {
        "setting": {
            "model": model or preset,
            "input_len": input_len,
            "output_len": output_len,
            "batches": list(batches),
            "engine_options": options,
        },
        "environment": {**info, "torch": torch.__version__},
        "results": [msgspec.to_builtins(r) for r in results],
        "speedup_vs_hf": ratios,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def table(report: dict[str, Any]) -> str:
    rows = ["system            batch   in/out      wall_s    tokens/s   vs HF"]
    ratios = report["speedup_vs_hf"]
    for r in report["results"]:
        ratio = ratios.get(str(r["batch"])) if r["system"] == "omniserve" else None
        wall = f"{r['wall_s']:.2f}" if r["wall_s"] else "-"
        tps = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] else (r["error"] or "-")[:24]
        rows.append(
            f"{r['system']:<16} {r['batch']:>6}   {r['input_len']}/{r['output_len']:<6} {wall:>8} {tps:>11}"
            + (f"   {ratio:.2f}x" if ratio else "")
        )
    return "\n".join(rows)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = sorted({r["system"] for r in report["results"]})
    batches = report["setting"]["batches"]
    width = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, system in enumerate(systems):
        values = [
            next((r["tokens_per_s"] or 0.0 for r in report["results"] if r["system"] == system and r["batch"] == b), 0.0)
            for b in batches
        ]
        ax.bar([j + i * width for j in range(len(batches))], values, width, label=system)
    ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(batches))], [str(b) for b in batches])
    ax.set_xlabel("batch")
    ax.set_ylabel("generated tokens / s")
    s = report["setting"]
    ax.set_title(f"{s['model']}, {s['input_len']} in / {s['output_len']} out, {report['environment']['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
