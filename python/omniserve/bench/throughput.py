"""Offline generation throughput in QServe's setting, next to HF transformers in the same run.

Setting: random-token prompts of a fixed length, a fixed number of generated tokens (EOS
ignored), a fixed batch submitted at once; throughput = generated tokens / wall time, prefill
included; tokens are greedy as in QServe's setting, or sampled (`Decoding`, for sampled traffic's
host cost). The model is built from a config alone with random weights (quantized ones for the
quantized precisions, models/loader.py), so any shape can be measured without downloading
weights (speed does not depend on the weights' values, except through EOS, which is ignored).

One run measures several omniserve systems (precision, group size, dtype) one after another in
one process: each gets its own engine, deleted and its GPU memory returned before the next starts.
HF transformers, which has no QServe formats, runs once, unquantized, as the peer of them all.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
import torch

from omniserve.bench import step_breakdown
from omniserve.bench.timing import sync
from omniserve.config import EngineConfig, kv_cache_bits
from omniserve.errors import ConfigError
from omniserve.formats.precision import PER_CHANNEL, PRECISION_CHOICES, Precision, parse

if TYPE_CHECKING:
    from omniserve.sampling_params import SamplingParams

PRESETS = ("llama-3-8b", "llama-2-7b", "tiny-llama")

DTYPE_SYSTEMS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""System names that mean the model's own weights (w16a16) in that dtype."""

OMNISERVE, HF_TRANSFORMERS = "omniserve", "hf-transformers"

_GIB = 1 << 30


class Decoding(msgspec.Struct, frozen=True):
    """How every system and the peer pick tokens: greedy at temperature 0 (QServe's setting), else
    sampled with temperature and top-p (and no other filter, on both sides)."""

    temperature: float = 0.0
    top_p: float = 1.0

    def params(self, max_tokens: int) -> SamplingParams:
        """omniserve's SamplingParams; InvalidRequestError naming a bad value."""
        from omniserve.sampling_params import SamplingParams

        return SamplingParams(
            max_tokens=max_tokens, ignore_eos=True, temperature=self.temperature, top_p=self.top_p
        )

    def hf_options(self) -> dict[str, Any]:
        """The same choice for HF `generate()` (whose own defaults would add top-k 50)."""
        if self.temperature == 0.0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}


GREEDY = Decoding()


class BenchSystem(msgspec.Struct, frozen=True):
    """One omniserve configuration of a run; the fields it sets override the engine options."""

    precision: str | None = None
    """A `--precision` value; None: the engine options' (by default the checkpoint's)."""
    group_size: int = PER_CHANNEL
    """Goes with `precision`."""
    dtype: str | None = None
    """The model dtype of this system; None: the engine options'."""

    def engine_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.precision is not None:
            options.update(precision=self.precision, group_size=self.group_size)
        if self.dtype is not None:
            options["dtype"] = self.dtype
        return options


def parse_system(text: str) -> BenchSystem:
    """A `--precisions` value: `PRECISION[:gGROUP]` (a `--precision` value and, for W4A8, its
    group size: `w4a8kv4:g128`) or `bf16` / `fp16` / `fp32` (w16a16 in that dtype). ConfigError
    naming the value and the valid choices otherwise."""
    name, colon, group = text.partition(":")
    group_size = PER_CHANNEL
    if colon:
        digits = group[1:]
        if not group.startswith("g") or not digits.removeprefix("-").isdigit():
            raise ConfigError(
                f"--precisions {text!r}: expected PRECISION or PRECISION:gGROUP, e.g. w4a8kv4:g128"
            )
        group_size = int(digits)
    key = name.strip().lower()
    dtype = DTYPE_SYSTEMS.get(key)
    if dtype is None and key not in PRECISION_CHOICES:
        raise ConfigError(
            f"--precisions {text!r}: unknown precision {name!r}; valid choices: "
            f"{', '.join(PRECISION_CHOICES)}, or {', '.join(DTYPE_SYSTEMS)} (w16a16 in that dtype)"
        )
    try:
        precision = parse("w16a16" if dtype is not None else key, group_size)
    except ConfigError as exc:  # a group size the precision does not have
        raise ConfigError(f"--precisions {text!r}: {exc}") from None
    return BenchSystem(precision.name, group_size, dtype)


class RunResult(msgspec.Struct, frozen=True):
    system: str
    """OMNISERVE or HF_TRANSFORMERS."""
    precision: str
    """The served precision, e.g. w4a8kv4; w16a16 for the model's own weights."""
    group_size: int
    dtype: str
    batch: int
    input_len: int
    output_len: int
    wall_s: float | None
    tokens_per_s: float | None
    speedup_vs_hf: float | None = None
    """tokens_per_s over HF transformers' at the same batch (omniserve rows)."""
    error: str | None = None
    breakdown: dict[str, Any] | None = None
    """With `breakdown`: a second run of the batch broken down (`bench/step_breakdown.py`)."""


class EngineRun(NamedTuple):
    results: list[RunResult]
    info: dict[str, Any]
    """The system's served precision, start-up time, memory report and preemptions."""
    precision: Precision
    device: torch.device
    dtype: torch.dtype


def preset_config(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(
            f"unknown model config preset {name!r}; choose one of {', '.join(PRESETS)}"
        )
    path = resources.files("omniserve") / "bench" / "model_configs" / f"{name}.json"
    return json.loads(path.read_text())


def _materialize(model: str | None, preset: str | None, tmp: Path) -> str:
    """A checkpoint directory holding at least config.json."""
    if model is not None:
        return model
    (tmp / "config.json").write_text(json.dumps(preset_config(preset or "llama-3-8b")))
    return str(tmp)


def random_prompts(batch: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Stay clear of the low ids where special tokens usually live.
    return torch.randint(16, vocab, (batch, input_len), generator=g).tolist()


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def served_precision(config: EngineConfig, precision: Precision | None) -> Precision:
    """The runner's precision, with an fp model (None) spelled as w16a16 and its KV cache."""
    if precision is not None:
        return precision
    bits = kv_cache_bits(config.kv_cache_dtype, None)
    return parse("w16a16" if bits is None else f"w16a16kv{bits}")


def bench_omniserve(
    config: EngineConfig,
    batches: Sequence[int],
    input_len: int,
    output_len: int,
    seed: int,
    breakdown: bool = False,
    decoding: Decoding = GREEDY,
) -> EngineRun:
    """Measure one engine (and with `breakdown`, run each batch again, broken down), then delete
    it and return its GPU memory for the next system."""
    from omniserve.engine.engine import Engine
    from omniserve.sampling_params import SamplingParams

    start = time.perf_counter()
    engine = Engine(config)
    startup = time.perf_counter() - start
    device, dtype, vocab = engine.runner.device, engine.runner.dtype, engine.runner.vocab_size
    precision = served_precision(config, engine.runner.precision)
    info: dict[str, Any] = {
        "precision": precision.name,
        "group_size": precision.group_size,
        "dtype": dtype_name(dtype),
        "startup_s": startup,
        **engine.runner.memory_report(),
    }
    params = decoding.params(output_len)
    warm = SamplingParams(max_tokens=8, ignore_eos=True)
    engine.generate(random_prompts(2, min(input_len, 64), vocab, seed), warm, use_tqdm=False)
    results = []
    for batch in batches:
        prompts = random_prompts(batch, input_len, vocab, seed + batch)
        sync(device)
        start = time.perf_counter()
        outs = engine.generate(prompts, params, use_tqdm=False)
        sync(device)
        wall = time.perf_counter() - start
        generated = sum(o.num_generated_tokens for o in outs)
        parts = None
        if breakdown:
            # Prompts of their own: the timed run's are in the prefix cache now.
            fresh = random_prompts(batch, input_len, vocab, seed + batch + 1)
            parts = msgspec.to_builtins(step_breakdown.measure(engine, fresh, params))
        results.append(
            RunResult(
                OMNISERVE,
                precision.name,
                precision.group_size,
                info["dtype"],
                batch,
                input_len,
                output_len,
                wall,
                generated / wall,
                breakdown=parts,
            )
        )
    info["preemptions"] = engine.stats().num_preemptions
    del engine
    free_cuda()
    if device.type == "cuda":
        # Whatever torch still holds would shrink the next system's KV cache (expected: ~0).
        info["held_after_free_gib"] = torch.cuda.memory_allocated(device) / _GIB
    return EngineRun(results, info, precision, device, dtype)


def bench_transformers(
    model_dir: str,
    device: torch.device,
    dtype: torch.dtype,
    batches: Sequence[int],
    input_len: int,
    output_len: int,
    seed: int,
    decoding: Decoding = GREEDY,
) -> list[RunResult]:
    """HF transformers `generate()` on the same shape, unquantized in `dtype`, weights random."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)

    def result(
        batch: int, wall: float | None, tps: float | None, error: str | None = None
    ) -> RunResult:
        name = dtype_name(dtype)
        return RunResult(
            HF_TRANSFORMERS,
            "w16a16",
            PER_CHANNEL,
            name,
            batch,
            input_len,
            output_len,
            wall,
            tps,
            error=error,
        )

    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
    except torch.OutOfMemoryError as exc:
        return [result(b, None, None, f"OOM: {str(exc)[:200]}") for b in batches]
    vocab = hf_config.vocab_size

    def generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
                **decoding.hf_options(),
            )

    warm = torch.tensor(random_prompts(2, min(input_len, 64), vocab, seed), device=device)
    generate(model, warm, 8)
    results = []
    for batch in batches:
        ids = torch.tensor(random_prompts(batch, input_len, vocab, seed + batch), device=device)
        try:
            sync(device)
            start = time.perf_counter()
            out = generate(model, ids, output_len)
            sync(device)
            wall = time.perf_counter() - start
            generated = (out.shape[1] - input_len) * batch
            results.append(result(batch, wall, generated / wall))
        except torch.OutOfMemoryError as exc:
            results.append(result(batch, None, None, f"OOM: {str(exc)[:200]}"))
        free_cuda()
    del model
    free_cuda()
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
    systems: Sequence[BenchSystem] = (BenchSystem(),),
    progress: Callable[[dict[str, Any]], None] | None = None,
    breakdown: bool = False,
    decoding: Decoding = GREEDY,
) -> dict[str, Any]:
    """Measure each of `systems` (in order), then the peers; `engine_options` apply to every
    system, whose own fields take precedence. `progress` gets the report so far after each
    system, so that a run cut short still leaves its measurements. `breakdown` adds a
    broken-down second run of each batch to the omniserve rows; `decoding` is how every system
    and the peer pick tokens."""
    # Imported here: it loads transformers, which `omniserve --help` need not wait for.
    from omniserve.models.loader import resolve_precision

    if not systems:
        raise ConfigError("no system to measure: give at least one precision")
    decoding.params(output_len)  # a bad value fails before anything is built
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _materialize(model, preset, Path(tmp))
        options = {
            "load_format": "dummy",
            "skip_tokenizer_init": True,
            "max_num_seqs": max(batches),
            **engine_options,
        }
        configs = [
            EngineConfig.from_kwargs(model_dir, **{**options, **s.engine_options()})
            for s in systems
        ]
        for config in configs:  # fail before the first (long) measurement, not in the middle
            resolve_precision(
                model_dir, config.requested_precision(), dummy=config.load_format == "dummy"
            )
        setting = {
            "model": model or preset,
            "input_len": input_len,
            "output_len": output_len,
            "batches": list(batches),
            "decoding": msgspec.to_builtins(decoding),
            "engine_options": options,
            "systems": [msgspec.to_builtins(s) for s in systems],
        }
        runs: list[EngineRun] = []
        for config in configs:
            runs.append(
                bench_omniserve(config, batches, input_len, output_len, seed, breakdown, decoding)
            )
            if progress is not None:
                progress(_report(setting, runs, []))
        peer_results = []
        if "hf" in peers:
            # The peer runs once, in the dtype of the first w16 system (else of the first).
            fp = next((e for e in runs if not e.precision.quantized_weights), runs[0])
            peer_results = bench_transformers(
                model_dir, fp.device, fp.dtype, batches, input_len, output_len, seed, decoding
            )
    return _report(setting, runs, peer_results)


def _report(
    setting: dict[str, Any], runs: Sequence[EngineRun], peer_results: list[RunResult]
) -> dict[str, Any]:
    results = _with_speedups([r for e in runs for r in e.results] + peer_results)
    return {
        "setting": setting,
        "environment": {"device": device_name(runs[0].device), "torch": torch.__version__},
        "engines": [e.info for e in runs],
        "results": [msgspec.to_builtins(r) for r in results],
    }


def _with_speedups(results: list[RunResult]) -> list[RunResult]:
    """Each omniserve row with its ratio to HF transformers' measured row at the same batch."""
    peer = {r.batch: r.tokens_per_s for r in results if r.system == HF_TRANSFORMERS}
    return [
        msgspec.structs.replace(r, speedup_vs_hf=r.tokens_per_s / peer[r.batch])
        if r.system == OMNISERVE and r.tokens_per_s and peer.get(r.batch)
        else r
        for r in results
    ]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def label(row: dict[str, Any]) -> str:
    """A result row's system, precision and (g128 only) group size, e.g. `omniserve w4a8kv4 g128`."""
    group = "" if row["group_size"] == PER_CHANNEL else f" g{row['group_size']}"
    return f"{row['system']} {row['precision']}{group}"


def table(report: dict[str, Any]) -> str:
    header = (
        f"{'system':<30} {'dtype':<9} {'batch':>6}   {'in/out':<10} {'wall_s':>8} "
        f"{'tokens/s':>11}   vs HF"
    )
    rows = [header]
    for r in report["results"]:
        wall = f"{r['wall_s']:.2f}" if r["wall_s"] else "-"
        tps = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] else (r["error"] or "-")[:24]
        ratio = f"   {r['speedup_vs_hf']:.2f}x" if r["speedup_vs_hf"] else ""
        in_out = f"{r['input_len']}/{r['output_len']}"
        rows.append(
            f"{label(r):<30} {r['dtype']:<9} {r['batch']:>6}   {in_out:<10} {wall:>8} {tps:>11}{ratio}"
        )
    for r in report["results"]:
        if r.get("breakdown"):
            rows += ["", f"{label(r)}, batch {r['batch']}:", step_breakdown.table(r["breakdown"])]
    return "\n".join(rows)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(dict.fromkeys(label(r) for r in report["results"]))  # run order
    batches = report["setting"]["batches"]
    width = 0.8 / len(systems)
    broken_down = [r for r in report["results"] if r.get("breakdown")]
    prefill = [r for r in broken_down if r["breakdown"].get("prefill_step_ms_median")]
    panels = [
        (rows, stage) for rows, stage in ((broken_down, "decode"), (prefill, "prefill")) if rows
    ]
    fig, axes = plt.subplots(
        1 + len(panels),
        1,
        figsize=(7, 4 + sum(0.5 * len(rows) + 1.5 for rows, _ in panels)),
        squeeze=False,
    )
    ax = axes[0][0]
    for i, system in enumerate(systems):
        values = [
            next(
                (
                    r["tokens_per_s"] or 0.0
                    for r in report["results"]
                    if label(r) == system and r["batch"] == b
                ),
                0.0,
            )
            for b in batches
        ]
        ax.bar([j + i * width for j in range(len(batches))], values, width, label=system)
    ax.set_xticks(
        [j + width * (len(systems) - 1) / 2 for j in range(len(batches))], [str(b) for b in batches]
    )
    ax.set_xlabel("batch")
    ax.set_ylabel("generated tokens / s")
    s = report["setting"]
    ax.set_title(
        f"{s['model']}, {s['input_len']} in / {s['output_len']} out, {report['environment']['device']}"
    )
    ax.legend(fontsize="small")
    for (rows, stage), row_axes in zip(panels, axes[1:], strict=True):
        _plot_breakdown(row_axes[0], rows, stage)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_breakdown(ax: Any, rows: list[dict[str, Any]], stage: str) -> None:
    """One stacked bar per broken-down row: device ms per `stage` ("decode" or "prefill") step
    by category, then the time the device waited for the host, adding up to the median step."""
    keys = {  # (categories, device ms, median step) of the stage in `Breakdown`
        "decode": ("categories_ms", "device_ms_per_step", "decode_step_ms_median"),
        "prefill": (
            "prefill_categories_ms",
            "prefill_device_ms_per_step",
            "prefill_step_ms_median",
        ),
    }[stage]
    parts, device, step = keys
    names = list(dict.fromkeys(c for r in rows for c in r["breakdown"][parts]))
    names.append("waiting for the host")
    labels = [f"{label(r)} b{r['batch']}" for r in rows]
    left = [0.0] * len(rows)
    for name in names:
        widths = []
        for r in rows:
            b = r["breakdown"]
            host = max(b[step] - b[device], 0.0)
            widths.append(host if name == names[-1] else b[parts].get(name, 0.0))
        ax.barh(labels, widths, left=left, label=name)
        left = [a + w for a, w in zip(left, widths)]
    ax.set_xlabel(f"ms per {stage} step (median)")
    ax.legend(fontsize="x-small", ncol=3, loc="lower right")
