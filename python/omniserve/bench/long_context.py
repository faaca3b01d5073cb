"""Long-context latency in LServe's setting: each precision dense and with streaming heads.

Setting: batch 1; for each prompt length, one random-token prompt, then a fixed number of decoded
tokens (EOS ignored). Measured per length: TTFT (wall time from adding the request to its first
token: the whole prefill, in as many chunks as the step budget makes), decode ms/token (wall time
of the remaining tokens over their count) and the KV cache the request holds just before its last
step (its dense pages over the dense heads plus its streaming pages over the streaming heads).

Each precision is measured twice, each time with its own engine reused across the lengths: dense
(static sparsity 0) and sparse (`static_sparsity` of the KV heads stream, chosen by a head
pattern: a given one, else random gates with a fixed seed, which cost the same as learned ones).
The model is built from a preset config with random weights, as in `bench throughput`, with
`max_position_embeddings` raised to the longest prompt plus its decode.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import msgspec
import torch

from omniserve.bench import throughput
from omniserve.bench.throughput import BenchSystem
from omniserve.config import EngineConfig
from omniserve.errors import ConfigError
from omniserve.formats.head_pattern import (
    load_head_pattern,
    random_gates,
    save_head_pattern,
    streaming_heads,
)
from omniserve.formats.precision import PER_CHANNEL

if TYPE_CHECKING:
    from omniserve.engine.engine import Engine

Mode = Literal["dense", "sparse"]
MODES: tuple[Mode, ...] = ("dense", "sparse")

DEFAULT_LENGTHS = (16384, 32768, 65536, 131072)
WARMUP_DECODE_TOKENS = 8
"""Decoded tokens of each engine's untimed warm-up request (its prompt: the shortest length)."""

_OWN_OPTIONS = {
    "load_format": "random weights",
    "skip_tokenizer_init": "token-id prompts",
    "max_num_seqs": "batch 1",
    "max_model_len": "the longest length plus the decode",
    "static_sparsity": "per mode",
    "attn_pattern": "the sparse mode's head pattern",
}
"""Engine options the benchmark sets itself, with why."""

_GIB = 1 << 30


class LengthResult(msgspec.Struct, frozen=True):
    """One (system, mode, prompt length) measurement."""

    precision: str
    group_size: int
    dtype: str
    mode: Mode
    prompt_len: int
    decode_tokens: int
    ttft_s: float
    decode_ms_per_token: float
    """Over the decode_tokens - 1 tokens after the first."""
    kv_bytes: int
    """KV cache held by the request before its last step: dense pages x bytes_per_page +
    streaming pages x bytes_per_stream_page."""
    dense_pages_used: int
    stream_pages_used: int


class EngineInfo(msgspec.Struct, frozen=True):
    """One (system, mode) engine: what it served and the memory it had (sizes in GiB)."""

    precision: str
    group_size: int
    dtype: str
    mode: Mode
    streaming_kv_heads: int
    """KV heads, over all layers, that stream; 0 in dense mode."""
    total_kv_heads: int
    stream_windows: dict[str, int] | None
    """Streaming heads' sink and local windows in tokens, rounded up to whole pages as served;
    None in dense mode."""
    startup_s: float
    weights: float
    kv_cache: float
    """Both pools."""
    peak_activations: float
    """Measured at start-up on GPU; 0 on CPU."""
    dense_pages_total: int
    stream_pages_total: int
    bytes_per_page: int
    """One dense page over all layers (their dense heads)."""
    bytes_per_stream_page: int
    """One streaming page over all layers (their streaming heads); 0 in dense mode."""
    held_after_free_gib: float | None = None
    """GPU memory torch still held after the engine was deleted (None on CPU; expected ~0)."""


class SparseVsDense(msgspec.Struct, frozen=True):
    """Sparse over dense at one prompt length, for one system."""

    precision: str
    group_size: int
    dtype: str
    prompt_len: int
    ttft_speedup: float
    """Dense TTFT / sparse TTFT."""
    decode_speedup: float
    """Dense ms/token / sparse ms/token."""
    kv_bytes_ratio: float
    """Sparse KV bytes / dense KV bytes."""


class Setting(msgspec.Struct, frozen=True):
    model: str
    """The model config preset."""
    lengths: list[int]
    decode_tokens: int
    static_sparsity: float
    """The sparse mode's fraction of streaming KV heads."""
    head_pattern: str | None
    """The head pattern directory given; None: random gates (`random_gates`, seed `seed`)."""
    seed: int
    """Seed of the random prompts and of random gates."""
    systems: list[BenchSystem]
    engine_options: dict[str, Any]
    """The options every engine got; each system's and mode's own override them."""


class Environment(msgspec.Struct, frozen=True):
    device: str
    """The GPU's name, or "cpu"."""
    torch: str
    command: str
    """The command line that ran the benchmark, shell-quoted."""


class Report(msgspec.Struct, frozen=True):
    setting: Setting
    environment: Environment
    engines: list[EngineInfo]
    results: list[LengthResult]
    comparisons: list[SparseVsDense]


class EngineRun(NamedTuple):
    info: EngineInfo
    results: list[LengthResult]
    device: torch.device


class _Latency(NamedTuple):
    ttft_s: float
    decode_s: float
    """From the first token to the last."""
    dense_pages: int
    stream_pages: int


def run(
    *,
    preset: str,
    systems: Sequence[BenchSystem],
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    decode_tokens: int = 128,
    static_sparsity: float = 0.5,
    attn_pattern: str | None = None,
    seed: int = 0,
    engine_options: dict[str, Any],
    command: str,
    progress: Callable[[Report], None] | None = None,
) -> Report:
    """Measure each system dense, then sparse, in order. Every argument is checked before the
    first engine starts; `progress` gets the report so far after each measurement, so that a run
    cut short still leaves what it measured."""
    _check(systems, lengths, decode_tokens, static_sparsity, engine_options)
    max_len = max(lengths) + decode_tokens
    hf_config = throughput.preset_config(preset)
    layers, kv_heads = hf_config["num_hidden_layers"], hf_config["num_key_value_heads"]
    hf_config["max_position_embeddings"] = max(hf_config["max_position_embeddings"], max_len)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps(hf_config))
        pattern = attn_pattern
        if pattern is None:
            pattern = str(Path(tmp) / "random-head-pattern")
            save_head_pattern(
                pattern, random_gates(layers, kv_heads, seed), sink_size=None, recent_size=None
            )
        gates = load_head_pattern(pattern, layers, kv_heads).gates  # a bad pattern fails here
        if not streaming_heads(gates, static_sparsity).any():
            raise ConfigError(
                f"--static-sparsity {static_sparsity} makes none of the model's "
                f"{layers * kv_heads} KV heads stream; raise it"
            )
        options = {
            **engine_options,
            "load_format": "dummy",
            "skip_tokenizer_init": True,
            "max_num_seqs": 1,
            "max_model_len": max_len,
        }
        per_mode: dict[Mode, dict[str, Any]] = {
            "dense": {"static_sparsity": 0.0},
            "sparse": {"static_sparsity": static_sparsity, "attn_pattern": pattern},
        }
        # Every config is validated before the first (long) measurement, not in the middle.
        configs = [
            (
                mode,
                EngineConfig.from_kwargs(
                    str(model_dir), **{**options, **s.engine_options(), **per_mode[mode]}
                ),
            )
            for s in systems
            for mode in MODES
        ]
        setting = Setting(
            preset,
            list(lengths),
            decode_tokens,
            static_sparsity,
            attn_pattern,
            seed,
            list(systems),
            options,
        )
        runs: list[EngineRun] = []

        def measured(current: EngineRun) -> None:
            if progress is not None:
                progress(_report(setting, [*runs, current], command))

        for mode, config in configs:
            runs.append(bench_engine(config, mode, lengths, decode_tokens, seed, measured))
    return _report(setting, runs, command)


def _check(
    systems: Sequence[BenchSystem],
    lengths: Sequence[int],
    decode_tokens: int,
    static_sparsity: float,
    engine_options: dict[str, Any],
) -> None:
    if not systems:
        raise ConfigError("no system to measure: give at least one precision")
    if not lengths or min(lengths) <= 0 or len(set(lengths)) < len(lengths):
        raise ConfigError(f"--lengths must be distinct positive token counts, got {list(lengths)}")
    if decode_tokens < 2:
        # Decode speed is timed from the first token (the end of the prefill) to the last.
        raise ConfigError(f"--decode-tokens must be >= 2, got {decode_tokens}")
    if not 0.0 < static_sparsity <= 1.0:
        raise ConfigError(
            f"--static-sparsity must be in (0, 1] (the sparse mode's fraction of streaming KV "
            f"heads; the dense mode uses 0), got {static_sparsity}"
        )
    own = [name for name in _OWN_OPTIONS if name in engine_options]
    if own:
        reasons = "; ".join(f"{name}: {_OWN_OPTIONS[name]}" for name in own)
        flags = ", ".join("--" + name.replace("_", "-") for name in own)
        raise ConfigError(
            f"bench long-context sets {', '.join(own)} itself ({reasons}); drop {flags}"
        )


def bench_engine(
    config: EngineConfig,
    mode: Mode,
    lengths: Sequence[int],
    decode_tokens: int,
    seed: int,
    measured: Callable[[EngineRun], None] | None = None,
) -> EngineRun:
    """Measure one engine at every length (`measured` gets what it has after each), then delete
    it and return its GPU memory for the next one."""
    from omniserve.engine.engine import Engine

    start = time.perf_counter()
    engine = Engine(config)
    startup = time.perf_counter() - start
    runner = engine.runner
    device, spec, setup = runner.device, runner.kv_cache.spec, runner.streaming
    precision = throughput.served_precision(config, runner.precision)
    dtype = throughput.dtype_name(runner.dtype)
    windows = None
    if setup is not None:
        prefill, decode, page = setup.windows.prefill, setup.windows.decode, config.page_size
        windows = {
            "prefill_sink_tokens": prefill.sink_pages * page,
            "prefill_local_tokens": prefill.local_pages * page,
            "decode_sink_tokens": decode.sink_pages * page,
            "decode_local_tokens": decode.local_pages * page,
        }
    memory = runner.memory_report()
    info = EngineInfo(
        precision.name,
        precision.group_size,
        dtype,
        mode,
        streaming_kv_heads=sum(map(len, spec.stream_heads)),
        total_kv_heads=spec.num_layers * spec.num_kv_heads,
        stream_windows=windows,
        startup_s=startup,
        weights=memory["weights"],
        kv_cache=memory["kv_cache"],
        peak_activations=memory["peak_activations"],
        dense_pages_total=runner.num_kv_pages,
        stream_pages_total=runner.num_stream_pages,
        bytes_per_page=spec.bytes_per_page,
        bytes_per_stream_page=spec.bytes_per_stream_page,
    )
    vocab = runner.vocab_size
    # The shortest prompt once, untimed, so that compilation (FlexAttention's Triton kernel) and
    # first-use allocations land outside the measurements.
    warm_prompt = throughput.random_prompts(1, min(lengths), vocab, seed)[0]
    _time_request(engine, warm_prompt, min(decode_tokens, WARMUP_DECODE_TOKENS))
    results = []
    for length in lengths:
        prompt = throughput.random_prompts(1, length, vocab, seed + length)[0]
        latency = _time_request(engine, prompt, decode_tokens)
        kv_bytes = (
            latency.dense_pages * spec.bytes_per_page
            + latency.stream_pages * spec.bytes_per_stream_page
        )
        results.append(
            LengthResult(
                precision.name,
                precision.group_size,
                dtype,
                mode,
                length,
                decode_tokens,
                latency.ttft_s,
                latency.decode_s / (decode_tokens - 1) * 1e3,
                kv_bytes,
                latency.dense_pages,
                latency.stream_pages,
            )
        )
        if measured is not None:
            measured(EngineRun(info, list(results), device))
    del engine, runner
    throughput.free_cuda()
    if device.type == "cuda":
        # Whatever torch still holds would shrink the next engine's KV cache (expected: ~0).
        held = torch.cuda.memory_allocated(device) / _GIB
        info = msgspec.structs.replace(info, held_after_free_gib=held)
    return EngineRun(info, results, device)


def _time_request(engine: Engine, prompt: list[int], decode_tokens: int) -> _Latency:
    """Run one request alone, step by step, timing its first token and the rest, and reading
    the pages it holds just before its last step (after it, they are freed)."""
    from omniserve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=decode_tokens, ignore_eos=True, temperature=0.0)
    device = engine.runner.device
    throughput.sync(device)
    start = time.perf_counter()
    engine.add_request("long-context", prompt, params, output_kind="delta")
    generated, first_token = 0, 0.0
    dense_pages = stream_pages = 0
    while engine.has_unfinished_requests():
        if generated == decode_tokens - 1:
            stats = engine.stats()
            dense_pages, stream_pages = stats.dense_pages_used, stats.stream_pages_used
        outputs = engine.step()
        if not generated and any(out.token_ids for out in outputs):
            throughput.sync(device)
            first_token = time.perf_counter()
        generated += sum(len(out.token_ids) for out in outputs)
    throughput.sync(device)
    return _Latency(
        first_token - start, time.perf_counter() - first_token, dense_pages, stream_pages
    )


def _report(setting: Setting, runs: Sequence[EngineRun], command: str) -> Report:
    results = [r for e in runs for r in e.results]
    environment = Environment(
        throughput.device_name(runs[0].device), str(torch.__version__), command
    )
    return Report(setting, environment, [e.info for e in runs], results, _comparisons(results))


def _system(row: LengthResult | SparseVsDense) -> tuple[str, int, str]:
    return row.precision, row.group_size, row.dtype


def _comparisons(results: Sequence[LengthResult]) -> list[SparseVsDense]:
    """Sparse over dense for every (system, length) measured both ways."""
    dense = {(_system(r), r.prompt_len): r for r in results if r.mode == "dense"}
    out = []
    for s in results:
        d = dense.get((_system(s), s.prompt_len))
        if s.mode == "sparse" and d is not None:
            out.append(
                SparseVsDense(
                    *_system(s),
                    s.prompt_len,
                    d.ttft_s / s.ttft_s,
                    d.decode_ms_per_token / s.decode_ms_per_token,
                    s.kv_bytes / d.kv_bytes,
                )
            )
    return out


def to_json(report: Report) -> bytes:
    return msgspec.json.format(msgspec.json.encode(report), indent=2)


def label(row: LengthResult | SparseVsDense) -> str:
    """A row's precision and (g128 only) group size, e.g. `w4a8kv4 g128`."""
    group = "" if row.group_size == PER_CHANNEL else f" g{row.group_size}"
    return f"{row.precision}{group}"


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _pattern(setting: Setting) -> str:
    if setting.head_pattern is None:
        return f"random head pattern (seed {setting.seed})"
    return f"head pattern {setting.head_pattern}"


_ROW_HEADER = (
    f"{'system':<16} {'dtype':<9} {'mode':<7} {'prompt':>7} {'TTFT_s':>9} {'decode_ms/tok':>14} "
    f"{'KV_MiB':>10} {'dense_pg':>9} {'stream_pg':>9}"
)


def row_line(r: LengthResult) -> str:
    """One measurement as a row of `table`."""
    return (
        f"{label(r):<16} {r.dtype:<9} {r.mode:<7} {_tokens(r.prompt_len):>7} {r.ttft_s:>9.3f} "
        f"{r.decode_ms_per_token:>14.2f} {r.kv_bytes / (1 << 20):>10.1f} "
        f"{r.dense_pages_used:>9} {r.stream_pages_used:>9}"
    )


def table(report: Report) -> str:
    s = report.setting
    lines = [
        f"{s.model} on {report.environment.device}, batch 1, {s.decode_tokens} decoded tokens; "
        f"sparse: static sparsity {s.static_sparsity}, {_pattern(s)}",
        "",
        _ROW_HEADER,
        *map(row_line, report.results),
    ]
    if report.comparisons:
        lines += [
            "",
            "sparse vs dense",
            f"{'system':<16} {'dtype':<9} {'prompt':>7} {'TTFT':>8} {'decode':>8} {'KV':>8}",
        ]
        for c in report.comparisons:
            lines.append(
                f"{label(c):<16} {c.dtype:<9} {_tokens(c.prompt_len):>7} {c.ttft_speedup:>7.2f}x "
                f"{c.decode_speedup:>7.2f}x {c.kv_bytes_ratio:>8.2f}"
            )
    return "\n".join(lines)


def plot(report: Report, path: Path) -> None:
    """Two panels against prompt length: TTFT and decode ms/token; one colour per system, solid
    dense, dashed sparse."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(dict.fromkeys(_system(r) for r in report.results))  # run order
    lengths = report.setting.lengths
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = [("TTFT (s)", "ttft_s"), ("decode ms / token", "decode_ms_per_token")]
    for ax, (ylabel, field) in zip(axes, panels, strict=True):
        for i, system in enumerate(systems):
            for mode, style in zip(MODES, ("o-", "s--"), strict=True):
                rows = [r for r in report.results if _system(r) == system and r.mode == mode]
                if rows:
                    ax.plot(
                        [r.prompt_len for r in rows],
                        [getattr(r, field) for r in rows],
                        style,
                        color=f"C{i}",
                        label=f"{label(rows[0])} {mode}",
                    )
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [_tokens(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    s = report.setting
    fig.suptitle(
        f"{s.model}, batch 1, {s.decode_tokens} decoded tokens, {report.environment.device}; "
        f"sparse: static sparsity {s.static_sparsity}, {_pattern(s)}",
        fontsize="medium",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
