"""Long-context latency in LServe's setting: each precision dense, with streaming heads (static
sparsity), with query-aware page selection at decode (dynamic sparsity), and with both.

Setting: for each batch size and prompt length, `batch` random-token prompts of that length,
added together, then a fixed number of decoded tokens (EOS ignored). Measured per (batch,
length): TTFT (wall time from adding the batch to the first token of its *last* request: the
whole batch's prefill, in as many chunks as the step budget makes; per-request TTFTs would mostly
measure the scheduler's order), decode ms/token (wall time of `decode_tokens - 1` steps in which
every request of the batch decodes one token, over their count: the time of one batched decode
step), and the KV cache the batch holds just before its last timed step (dense pages over the
dense heads plus streaming pages over the streaming heads).

The scheduler has no prefill and decode phases: a batch's first requests decode while its last
ones still prefill, so with identical `max_tokens` they would finish before the last one decodes
at all. So every request may generate up to `max_model_len` (raised by what the first ones can
decode meanwhile, `_prefill_headroom`), the decode steps are timed once every request has its
first token, and the batch is aborted after them. A (batch, length) whose KV cache an engine
cannot hold without preemption is skipped (and reported as such): the pool's size is only known
once the engine has started.

Modes, each with its own engine reused across the batch sizes and lengths:

- `dense`: static sparsity 0, every page attended;
- `static`: `static_sparsity` of the KV heads stream (sink + local window), chosen by a head
  pattern: a given one, else random gates with a fixed seed, which cost the same as learned ones;
- `dynamic`: `sparse_decode` at `token_budget` tokens per request (`page_selection`, a new
  selection every `selector_interval` steps), no streaming heads; a prompt within the budget
  attends every page, so the budget must be below the longest length;
- `dynamic+static`: both (the dense heads select pages, the streaming heads stream).

The model is built from a preset config with random weights, as in `bench throughput`, with
`max_position_embeddings` raised to `max_model_len`.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import msgspec
import torch

from omniserve.bench import throughput
from omniserve.bench.throughput import BenchSystem
from omniserve.bench.timing import sync
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
    from omniserve.outputs import RequestOutput

Mode = Literal["dense", "static", "dynamic", "dynamic+static"]
MODES: tuple[Mode, ...] = ("dense", "static", "dynamic", "dynamic+static")
STATIC_MODES: frozenset[Mode] = frozenset({"static", "dynamic+static"})
"""Modes whose engine streams `static_sparsity` of the KV heads."""
DYNAMIC_MODES: frozenset[Mode] = frozenset({"dynamic", "dynamic+static"})
"""Modes whose engine selects pages at decode (`sparse_decode`)."""
PageSelectionKind = Literal["kv_head", "query_head"]

_ENGINE_DEFAULTS: dict[str, Any] = {f.name: f.default for f in msgspec.structs.fields(EngineConfig)}
DEFAULT_LENGTHS = (16384, 32768, 65536, 131072)
DEFAULT_TOKEN_BUDGET: int = _ENGINE_DEFAULTS["token_budget"]
DEFAULT_SELECTOR_INTERVAL: int = _ENGINE_DEFAULTS["selector_interval"]
WARMUP_DECODE_TOKENS = 8
"""Decoded tokens of each engine's untimed warm-up batches (their prompts: the shortest length)."""

_OWN_OPTIONS = {
    "load_format": "random weights",
    "skip_tokenizer_init": "token-id prompts",
    "max_num_seqs": "the largest --batch",
    "max_model_len": "the longest length plus the decode and the batch's prefill headroom",
    "static_sparsity": "per mode",
    "attn_pattern": "the static modes' head pattern",
    "sparse_decode": "per mode",
    "token_budget": "the dynamic modes' budget",
    "page_selection": "the dynamic modes' selection",
    "selector_interval": "the dynamic modes' interval",
}
"""Engine options the benchmark sets itself, with why."""

_GIB = 1 << 30


class _Point(msgspec.Struct, frozen=True):
    """A (system, mode, batch, prompt length) of the run."""

    precision: str
    group_size: int
    dtype: str
    mode: Mode
    batch: int
    prompt_len: int


class LengthResult(_Point, frozen=True):
    """One measurement."""

    decode_tokens: int
    ttft_s: float
    """From adding the batch to the first token of its last request."""
    decode_ms_per_token: float
    """One decode step of the whole batch (a token for every request), over the decode_tokens - 1
    steps after the last first token."""
    kv_bytes: int
    """KV cache held by the batch before its last timed step: dense pages x bytes_per_page +
    streaming pages x bytes_per_stream_page."""
    dense_pages_used: int
    stream_pages_used: int


class Skipped(_Point, frozen=True):
    """A point the engine's KV cache could not hold."""

    pages_needed: int
    """Dense pages the batch may hold at most (its prompts, decode and prefill headroom)."""
    pages_usable: int
    """The dense pool less its null page and the scheduler's admission watermark."""


class EngineInfo(msgspec.Struct, frozen=True):
    """One (system, mode) engine: what it served and the memory it had (sizes in GiB)."""

    precision: str
    group_size: int
    dtype: str
    mode: Mode
    streaming_kv_heads: int
    """KV heads, over all layers, that stream; 0 without static sparsity."""
    total_kv_heads: int
    stream_windows: dict[str, int] | None
    """Streaming heads' sink and local windows in tokens, rounded up to whole pages as served;
    None without static sparsity."""
    selection: dict[str, int | str] | None
    """Page selection at decode as served (the budget rounded up to whole pages); None without
    dynamic sparsity."""
    startup_s: float
    weights: float
    kv_cache: float
    """Both pools."""
    peak_activations: float
    """Measured at start-up on GPU; 0 on CPU."""
    dense_pages_total: int
    stream_pages_total: int
    bytes_per_page: int
    """One dense page over all layers (their dense heads), with its key statistics in the
    dynamic modes."""
    bytes_per_stream_page: int
    """One streaming page over all layers (their streaming heads); 0 without static sparsity."""
    held_after_free_gib: float | None = None
    """GPU memory torch still held after the engine was deleted (None on CPU; expected ~0)."""


class ModeVsDense(_Point, frozen=True):
    """One mode over dense at one point."""

    ttft_speedup: float
    """Dense TTFT / this mode's TTFT."""
    decode_speedup: float
    """Dense ms/token / this mode's ms/token."""
    kv_bytes_ratio: float
    """This mode's KV bytes / dense KV bytes. Page selection reads fewer pages but holds them
    all, and its pages also hold their key statistics (`EngineInfo.bytes_per_page`)."""


class Setting(msgspec.Struct, frozen=True):
    model: str
    """The model config preset."""
    modes: list[Mode]
    batches: list[int]
    lengths: list[int]
    decode_tokens: int
    static_sparsity: float
    """The static modes' fraction of streaming KV heads."""
    head_pattern: str | None
    """The head pattern directory given; None: random gates (`random_gates`, seed `seed`)."""
    token_budget: int
    """The dynamic modes' tokens per request at decode, as given (engines round it up to whole
    pages: `EngineInfo.selection`)."""
    page_selection: PageSelectionKind
    selector_interval: int
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
    comparisons: list[ModeVsDense]
    skipped: list[Skipped] = []


class EngineRun(NamedTuple):
    info: EngineInfo
    results: list[LengthResult]
    device: torch.device
    skipped: list[Skipped]


class _Latency(NamedTuple):
    ttft_s: float
    decode_s: float
    """Of the decode_tokens - 1 timed steps."""
    dense_pages: int
    stream_pages: int


def run(
    *,
    preset: str,
    systems: Sequence[BenchSystem],
    modes: Sequence[Mode] = MODES,
    batches: Sequence[int] = (1,),
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    decode_tokens: int = 128,
    static_sparsity: float = 0.5,
    attn_pattern: str | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    page_selection: PageSelectionKind = "kv_head",
    selector_interval: int = DEFAULT_SELECTOR_INTERVAL,
    seed: int = 0,
    engine_options: dict[str, Any],
    command: str,
    progress: Callable[[Report], None] | None = None,
) -> Report:
    """Measure each system in each mode, in order. Every argument is checked before the first
    engine starts; `progress` gets the report so far after each measurement, so that a run cut
    short still leaves what it measured."""
    _check(systems, modes, batches, lengths, decode_tokens, static_sparsity, engine_options)
    max_len = max(
        n + decode_tokens + _prefill_headroom(b, n, _scheduling(engine_options))
        for b in batches
        for n in lengths
    )
    hf_config = throughput.preset_config(preset)
    layers, kv_heads = hf_config["num_hidden_layers"], hf_config["num_key_value_heads"]
    hf_config["max_position_embeddings"] = max(hf_config["max_position_embeddings"], max_len)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps(hf_config))
        pattern = None
        if STATIC_MODES.intersection(modes):
            pattern = _static_pattern(attn_pattern, Path(tmp), layers, kv_heads, seed)
            _check_streams(pattern, static_sparsity, layers, kv_heads)
        options = {
            **engine_options,
            "load_format": "dummy",
            "skip_tokenizer_init": True,
            "max_num_seqs": max(batches),
            "max_model_len": max_len,
        }
        dynamic = {
            "token_budget": token_budget,
            "page_selection": page_selection,
            "selector_interval": selector_interval,
        }
        # Every config is validated before the first (long) measurement, not in the middle.
        configs = [
            (
                mode,
                EngineConfig.from_kwargs(
                    str(model_dir),
                    **{
                        **options,
                        **s.engine_options(),
                        **_mode_options(mode, static_sparsity, pattern, dynamic),
                    },
                ),
            )
            for s in systems
            for mode in modes
        ]
        for mode, config in configs:
            if mode in DYNAMIC_MODES:
                _check_budget(config, lengths)
        setting = Setting(
            model=preset,
            modes=list(modes),
            batches=list(batches),
            lengths=list(lengths),
            decode_tokens=decode_tokens,
            static_sparsity=static_sparsity,
            head_pattern=attn_pattern,
            token_budget=token_budget,
            page_selection=page_selection,
            selector_interval=selector_interval,
            seed=seed,
            systems=list(systems),
            engine_options=options,
        )
        runs: list[EngineRun] = []

        def measured(current: EngineRun) -> None:
            if progress is not None:
                progress(_report(setting, [*runs, current], command))

        for mode, config in configs:
            runs.append(bench_engine(config, mode, batches, lengths, decode_tokens, seed, measured))
    return _report(setting, runs, command)


def _mode_options(
    mode: Mode, static_sparsity: float, pattern: str | None, dynamic: dict[str, Any]
) -> dict[str, Any]:
    """The engine options that make `mode` (they override every other option)."""
    options: dict[str, Any] = {"static_sparsity": 0.0, "sparse_decode": False}
    if mode in STATIC_MODES:
        options.update(static_sparsity=static_sparsity, attn_pattern=pattern)
    if mode in DYNAMIC_MODES:
        options.update(sparse_decode=True, **dynamic)
    return options


def _static_pattern(
    attn_pattern: str | None, tmp: Path, layers: int, kv_heads: int, seed: int
) -> str:
    """The static modes' head pattern: the one given, else random gates saved under `tmp`."""
    if attn_pattern is not None:
        return attn_pattern
    pattern = str(tmp / "random-head-pattern")
    save_head_pattern(
        pattern, random_gates(layers, kv_heads, seed), sink_size=None, recent_size=None
    )
    return pattern


def _check_streams(pattern: str, static_sparsity: float, layers: int, kv_heads: int) -> None:
    gates = load_head_pattern(pattern, layers, kv_heads).gates  # a bad pattern fails here
    if not streaming_heads(gates, static_sparsity).any():
        raise ConfigError(
            f"--static-sparsity {static_sparsity} makes none of the model's "
            f"{layers * kv_heads} KV heads stream; raise it"
        )


def _check_budget(config: EngineConfig, lengths: Sequence[int]) -> None:
    """A budget that covers every prompt would make the dynamic modes attend every page: they
    would measure dense attention under another name."""
    budget = math.ceil(config.token_budget / config.page_size) * config.page_size
    if budget >= max(lengths):
        raise ConfigError(
            f"--token-budget {config.token_budget} ({budget} tokens in pages of "
            f"{config.page_size}) covers every prompt of --lengths {list(lengths)}: the dynamic "
            f"modes would attend every page; lower it or add a longer length"
        )


def _check(
    systems: Sequence[BenchSystem],
    modes: Sequence[Mode],
    batches: Sequence[int],
    lengths: Sequence[int],
    decode_tokens: int,
    static_sparsity: float,
    engine_options: dict[str, Any],
) -> None:
    if not systems:
        raise ConfigError("no system to measure: give at least one precision")
    if not modes or len(set(modes)) < len(modes) or not set(modes) <= set(MODES):
        raise ConfigError(
            f"--modes must be distinct modes of {', '.join(MODES)}, got {list(modes)}"
        )
    if not batches or min(batches) <= 0 or len(set(batches)) < len(batches):
        raise ConfigError(f"--batch must be distinct positive batch sizes, got {list(batches)}")
    if not lengths or min(lengths) <= 0 or len(set(lengths)) < len(lengths):
        raise ConfigError(f"--lengths must be distinct positive token counts, got {list(lengths)}")
    if decode_tokens < 2:
        # Decode speed is timed from the first token (the end of the prefill) to the last.
        raise ConfigError(f"--decode-tokens must be >= 2, got {decode_tokens}")
    if not 0.0 < static_sparsity <= 1.0:
        raise ConfigError(
            f"--static-sparsity must be in (0, 1] (the static modes' fraction of streaming KV "
            f"heads; the others use 0), got {static_sparsity}"
        )
    own = [name for name in _OWN_OPTIONS if name in engine_options]
    if own:
        reasons = "; ".join(f"{name}: {_OWN_OPTIONS[name]}" for name in own)
        flags = ", ".join("--" + name.replace("_", "-") for name in own)
        raise ConfigError(
            f"bench long-context sets {', '.join(own)} itself ({reasons}); drop {flags}"
        )


class _Scheduling(NamedTuple):
    """The scheduler options that bound how long a batch's prefill takes, in steps."""

    max_num_batched_tokens: int
    long_prefill_token_threshold: int


def _scheduling(options: dict[str, Any] | EngineConfig) -> _Scheduling:
    def get(name: str) -> int:
        if isinstance(options, EngineConfig):
            return int(getattr(options, name))
        return int(options.get(name, _ENGINE_DEFAULTS[name]))

    return _Scheduling(get("max_num_batched_tokens"), get("long_prefill_token_threshold"))


def _prefill_headroom(batch: int, length: int, scheduling: _Scheduling) -> int:
    """A bound of the tokens a batch's first request decodes while the others still prefill:
    one per step until the last prefill ends. Each such step gives the prefills its budget less
    the batch's decodes (capped by the per-request chunk limit), except the step where a
    prompt's last chunk is shorter; so at most ceil((batch - 1) x length / per_step) + batch - 1
    steps. (Were it short, the first request would end early: `_time_batch` would say so.)"""
    if batch == 1:
        return 0
    per_step = scheduling.max_num_batched_tokens - batch
    if scheduling.long_prefill_token_threshold > 0:
        per_step = min(per_step, scheduling.long_prefill_token_threshold)
    return math.ceil((batch - 1) * length / max(1, per_step)) + batch - 1


def bench_engine(
    config: EngineConfig,
    mode: Mode,
    batches: Sequence[int],
    lengths: Sequence[int],
    decode_tokens: int,
    seed: int,
    measured: Callable[[EngineRun], None] | None = None,
) -> EngineRun:
    """Measure one engine at every batch size and length (`measured` gets what it has after each
    measurement), then delete it and return its GPU memory for the next one."""
    from omniserve.engine.engine import Engine

    start = time.perf_counter()
    engine = Engine(config)
    startup = time.perf_counter() - start
    runner = engine.runner
    device, spec = runner.device, runner.kv_cache.spec
    info = _engine_info(engine, config, mode, startup)
    results: list[LengthResult] = []
    skipped: list[Skipped] = []
    for batch in batches:
        # The shortest prompts once per batch size, untimed, so that compilation (FlexAttention's
        # Triton kernel) and first-use allocations land outside the measurements.
        fitting = [n for n in lengths if _skip(engine, info, mode, batch, n, decode_tokens) is None]
        if fitting:
            warm = throughput.random_prompts(batch, min(fitting), runner.vocab_size, seed)
            _time_batch(engine, warm, min(decode_tokens, WARMUP_DECODE_TOKENS))
        for length in lengths:
            skip = _skip(engine, info, mode, batch, length, decode_tokens)
            if skip is not None:
                skipped.append(skip)
                continue
            prompts = throughput.random_prompts(batch, length, runner.vocab_size, seed + length)
            latency = _time_batch(engine, prompts, decode_tokens)
            kv_bytes = (
                latency.dense_pages * spec.bytes_per_page
                + latency.stream_pages * spec.bytes_per_stream_page
            )
            results.append(
                LengthResult(
                    info.precision,
                    info.group_size,
                    info.dtype,
                    mode,
                    batch,
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
                measured(EngineRun(info, list(results), device, list(skipped)))
    del engine, runner
    throughput.free_cuda()
    if device.type == "cuda":
        # Whatever torch still holds would shrink the next engine's KV cache (expected: ~0).
        held = torch.cuda.memory_allocated(device) / _GIB
        info = msgspec.structs.replace(info, held_after_free_gib=held)
    return EngineRun(info, results, device, skipped)


def _engine_info(engine: Engine, config: EngineConfig, mode: Mode, startup: float) -> EngineInfo:
    """What the engine serves (as it rounded the options) and the memory it holds."""
    runner = engine.runner
    spec, setup, selection = runner.kv_cache.spec, runner.streaming, runner.selection
    precision = throughput.served_precision(config, runner.precision)
    page = config.page_size
    windows = None
    if setup is not None:
        prefill, decode = setup.windows.prefill, setup.windows.decode
        windows = {
            "prefill_sink_tokens": prefill.sink_pages * page,
            "prefill_local_tokens": prefill.local_pages * page,
            "decode_sink_tokens": decode.sink_pages * page,
            "decode_local_tokens": decode.local_pages * page,
        }
    chosen: dict[str, int | str] | None = None
    if selection is not None:
        chosen = {
            "budget_tokens": selection.budget_pages * page,
            "budget_pages": selection.budget_pages,
            "page_selection": "query_head" if selection.per_query_head else "kv_head",
            "selector_interval": selection.interval,
            "logical_page_tokens": selection.logical_tokens,
        }
    memory = runner.memory_report()
    return EngineInfo(
        precision.name,
        precision.group_size,
        throughput.dtype_name(runner.dtype),
        mode,
        streaming_kv_heads=sum(map(len, spec.stream_heads)),
        total_kv_heads=spec.num_layers * spec.num_kv_heads,
        stream_windows=windows,
        selection=chosen,
        startup_s=startup,
        weights=memory["weights"],
        kv_cache=memory["kv_cache"],
        peak_activations=memory["peak_activations"],
        dense_pages_total=runner.num_kv_pages,
        stream_pages_total=runner.num_stream_pages,
        bytes_per_page=spec.bytes_per_page,
        bytes_per_stream_page=spec.bytes_per_stream_page,
    )


def _skip(
    engine: Engine, info: EngineInfo, mode: Mode, batch: int, length: int, decode_tokens: int
) -> Skipped | None:
    """A `Skipped` where the batch may need more dense pages than the scheduler admits into
    (preemption would then time recomputes), else None."""
    config = engine.config
    headroom = _prefill_headroom(batch, length, _scheduling(config))
    needed = batch * math.ceil((length + headroom + decode_tokens) / config.page_size)
    pages = engine.runner.num_kv_pages  # with the null page, as the scheduler counts them
    usable = pages - 1 - math.ceil(config.watermark * pages)
    if needed <= usable:
        return None
    return Skipped(info.precision, info.group_size, info.dtype, mode, batch, length, needed, usable)


def _time_batch(engine: Engine, prompts: list[list[int]], decode_tokens: int) -> _Latency:
    """Run the prompts together, step by step: the time until every one has its first token,
    then the time of decode_tokens - 1 steps that each give every request one token, reading the
    pages the batch holds before the last of them; then abort what is left of the batch (untimed).
    Each request may run to max_model_len, so that none ends before the last timed step."""
    from omniserve.sampling_params import SamplingParams

    device = engine.runner.device
    ids = [f"long-context-{i}" for i in range(len(prompts))]
    preemptions = engine.stats().num_preemptions
    sync(device)
    start = time.perf_counter()
    for request_id, prompt in zip(ids, prompts, strict=True):
        params = SamplingParams(
            max_tokens=engine.max_model_len - len(prompt), ignore_eos=True, temperature=0.0
        )
        engine.add_request(request_id, prompt, params, output_kind="delta")
    waiting = set(ids)
    while waiting:
        waiting -= {out.request_id for out in _step(engine, may_end=False) if out.token_ids}
    sync(device)
    first_token = time.perf_counter()
    dense_pages = stream_pages = 0
    for i in range(decode_tokens - 1):
        if i == decode_tokens - 2:
            stats = engine.stats()
            dense_pages, stream_pages = stats.dense_pages_used, stats.stream_pages_used
        last = i == decode_tokens - 2
        tokens = sum(len(out.token_ids) for out in _step(engine, may_end=last))
        if tokens != len(prompts):
            raise RuntimeError(f"a decode step of {len(prompts)} requests gave {tokens} tokens")
    sync(device)
    end = time.perf_counter()
    if engine.stats().num_preemptions != preemptions:
        raise RuntimeError(
            f"a batch of {len(prompts)} x {len(prompts[0])} tokens was preempted: its timings "
            f"include recomputes"
        )
    for request_id in ids:
        engine.abort(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    return _Latency(first_token - start, end - first_token, dense_pages, stream_pages)


def _step(engine: Engine, *, may_end: bool) -> list[RequestOutput]:
    """One step of a timed batch, none of whose requests may end before its last timed step
    (where a request at max_model_len does)."""
    outputs = engine.step()
    ended = [out.request_id for out in outputs if out.finished]
    if ended and not may_end:
        raise RuntimeError(
            f"{', '.join(ended)} ended before the batch's timed decode did (max_model_len "
            f"{engine.max_model_len} left no room for the tokens it decoded while the batch "
            f"prefilled)"
        )
    return outputs


def _report(setting: Setting, runs: Sequence[EngineRun], command: str) -> Report:
    results = [r for e in runs for r in e.results]
    environment = Environment(
        throughput.device_name(runs[0].device), str(torch.__version__), command
    )
    return Report(
        setting,
        environment,
        [e.info for e in runs],
        results,
        _comparisons(results),
        [s for e in runs for s in e.skipped],
    )


def _system(row: _Point) -> tuple[str, int, str]:
    return row.precision, row.group_size, row.dtype


def _comparisons(results: Sequence[LengthResult]) -> list[ModeVsDense]:
    """Each mode over dense for every (system, batch, length) measured both ways."""
    dense = {(_system(r), r.batch, r.prompt_len): r for r in results if r.mode == "dense"}
    out = []
    for s in results:
        d = dense.get((_system(s), s.batch, s.prompt_len))
        if s.mode != "dense" and d is not None:
            out.append(
                ModeVsDense(
                    *_system(s),
                    s.mode,
                    s.batch,
                    s.prompt_len,
                    d.ttft_s / s.ttft_s,
                    d.decode_ms_per_token / s.decode_ms_per_token,
                    s.kv_bytes / d.kv_bytes,
                )
            )
    return out


def to_json(report: Report) -> bytes:
    return msgspec.json.format(msgspec.json.encode(report), indent=2)


def label(row: _Point) -> str:
    """A row's precision and (g128 only) group size, e.g. `w4a8kv4 g128`."""
    group = "" if row.group_size == PER_CHANNEL else f" g{row.group_size}"
    return f"{row.precision}{group}"


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _pattern(setting: Setting) -> str:
    if setting.head_pattern is None:
        return f"random head pattern (seed {setting.seed})"
    return f"head pattern {setting.head_pattern}"


def _summary(report: Report) -> str:
    """The setting in one line: what each measured sparse mode means."""
    s = report.setting
    batches = " ".join(map(str, s.batches))
    parts = [
        f"{s.model} on {report.environment.device}, batch {batches}, "
        f"{s.decode_tokens} decoded tokens"
    ]
    if STATIC_MODES.intersection(s.modes):
        parts.append(f"static: sparsity {s.static_sparsity}, {_pattern(s)}")
    if DYNAMIC_MODES.intersection(s.modes):
        parts.append(
            f"dynamic: token budget {s.token_budget}, per {s.page_selection}, "
            f"every {s.selector_interval} steps"
        )
    return "; ".join(parts)


_ROW_HEADER = (
    f"{'system':<16} {'dtype':<9} {'mode':<14} {'batch':>5} {'prompt':>7} {'TTFT_s':>9} "
    f"{'decode_ms/tok':>14} {'KV_MiB':>10} {'dense_pg':>9} {'stream_pg':>9}"
)


def row_line(r: LengthResult) -> str:
    """One measurement as a row of `table`."""
    return (
        f"{label(r):<16} {r.dtype:<9} {r.mode:<14} {r.batch:>5} {_tokens(r.prompt_len):>7} "
        f"{r.ttft_s:>9.3f} {r.decode_ms_per_token:>14.2f} {r.kv_bytes / (1 << 20):>10.1f} "
        f"{r.dense_pages_used:>9} {r.stream_pages_used:>9}"
    )


def table(report: Report) -> str:
    lines = [_summary(report), "", _ROW_HEADER, *map(row_line, report.results)]
    if report.comparisons:
        lines += [
            "",
            "vs dense",
            f"{'system':<16} {'dtype':<9} {'mode':<14} {'batch':>5} {'prompt':>7} {'TTFT':>8} "
            f"{'decode':>8} {'KV':>8}",
        ]
        for c in report.comparisons:
            lines.append(
                f"{label(c):<16} {c.dtype:<9} {c.mode:<14} {c.batch:>5} "
                f"{_tokens(c.prompt_len):>7} {c.ttft_speedup:>7.2f}x {c.decode_speedup:>7.2f}x "
                f"{c.kv_bytes_ratio:>8.2f}"
            )
    if report.skipped:
        lines += ["", "skipped (the KV cache cannot hold the batch without preemption)"]
        for k in report.skipped:
            lines.append(
                f"{label(k):<16} {k.dtype:<9} {k.mode:<14} {k.batch:>5} "
                f"{_tokens(k.prompt_len):>7}   needs {k.pages_needed} pages of {k.pages_usable}"
            )
    return "\n".join(lines)


_BATCH_STYLES = ("-", "--", ":", "-.")


def plot(report: Report, path: Path) -> None:
    """A column per system, two rows against prompt length: TTFT and decode ms/token; one colour
    (and marker) per mode, one line style per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(dict.fromkeys(_system(r) for r in report.results))  # run order
    s = report.setting
    fig, axes = plt.subplots(
        2, len(systems), figsize=(4.8 * len(systems), 7.5), squeeze=False, sharex=True
    )
    panels = [("TTFT (s)", "ttft_s"), ("decode ms / step", "decode_ms_per_token")]
    for column, system in enumerate(systems):
        rows = [r for r in report.results if _system(r) == system]
        for (ylabel, field), ax in zip(panels, axes[:, column], strict=True):
            _plot_panel(ax, rows, field, s)
            ax.set_ylabel(ylabel)
        axes[0, column].set_title(label(rows[0]), fontsize="medium")
        axes[1, column].set_xlabel("prompt tokens")
        axes[1, column].legend(fontsize="x-small", ncol=2, handlelength=3)
    fig.suptitle(_summary(report), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_panel(ax: Any, rows: Sequence[LengthResult], field: str, setting: Setting) -> None:
    """One system's `field` against prompt length: a line per (mode, batch) measured."""
    for m, mode in enumerate(MODES):
        for b, batch in enumerate(setting.batches):
            line = [r for r in rows if (r.mode, r.batch) == (mode, batch)]
            if line:
                ax.plot(
                    [r.prompt_len for r in line],
                    [getattr(r, field) for r in line],
                    _BATCH_STYLES[b % len(_BATCH_STYLES)],
                    marker="osD^"[m],
                    color=f"C{m}",
                    label=f"{mode}, batch {batch}",
                )
    ax.set_xscale("log", base=2)
    ax.set_xticks(setting.lengths, [_tokens(n) for n in setting.lengths])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
