"""Where a generation run's time goes: prefill, decode steps, and the device's share of a step.

`measure` runs a batch through an engine the way `Engine.generate` does, stamping every step:
- prefill: from the start until every request has its first token; where the batch's prompts
  fill enough whole steps, the median prefill step and the per-op device time of a few of them
  under `torch.profiler` (after one warm step), as for decode;
- decode steps: the intervals between consecutive `step()` returns once every request has its
  first token (with async scheduling one return per device step), median and p90;
- per-op device time of a decode step: a window of decode steps under `torch.profiler` (CUDA
  kernels on a GPU, aten ops' own time on the CPU), summed per kernel and per category, divided
  by the steps in the window. The window's steps are left out of the step statistics (the
  profiler slows the host down).
The device-busy fraction is the device time per decode step over the median decode step; what is
left is time the device waits for the host. On a GPU a few more decode steps run under torch's
sync check (`torch.cuda.set_sync_debug_mode("warn")`), which names each call that makes the host
wait for the device: with async scheduling only the wait for the previous step's tokens belongs
there, and any other site is time the host cannot overlap.
"""

from __future__ import annotations

import re
import statistics
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import torch
from torch.profiler import ProfilerActivity, profile

from omniserve.bench.timing import percentile, sync

if TYPE_CHECKING:
    from omniserve.engine.engine import Engine
    from omniserve.outputs import RequestOutput
    from omniserve.sampling_params import SamplingParams

CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE))
    for name, pattern in (
        ("attention", r"attention|attn|flash|sdpa|paged|combine"),
        ("rope + kv write", r"rope|rotary|kv_write|kvwrite"),
        # Before quantization: a quantized GEMM's name may say "quant" too.
        ("gemm", r"gemm|matmul|\bmm\b|addmm|cutlass|wgmma|xmma|sm90|cublas|linear"),
        ("activation quantization", r"quant"),
        ("norm", r"norm"),
        ("sampling", r"softmax|argmax|sort|topk|cumsum|searchsorted|sampl"),
    )
)
"""Kernel (or op) name patterns, first match wins; anything else is "other"."""

SLACK_STEPS = 3
"""Steps beyond the longest prefill's own before the profiled window starts."""

PREFILL_PROFILE_STEPS = 2
"""Prefill steps profiled, after a first one (which also pays one-time costs), where the prompts
fill at least this many + 2 whole steps (so the window holds no decode)."""

SYNC_CHECK_STEPS = 8
"""Decode steps (after the profiled window) run under torch's sync check on a GPU."""

_SYNC_WARNING = "called a synchronizing CUDA operation"  # the check's warning, one per call


class KernelTime(msgspec.Struct, frozen=True):
    name: str
    ms_per_step: float
    calls_per_step: float


class HostWait(msgspec.Struct, frozen=True):
    site: str
    """file:line of the Python call that waited."""
    per_step: float


class Breakdown(msgspec.Struct, frozen=True):
    prefill_s: float
    """Until every request has its first token."""
    decode_steps: int
    """Decode steps in the statistics (the profiled window excluded)."""
    decode_step_ms_median: float
    decode_step_ms_p90: float
    profiled_steps: int
    device_ms_per_step: float
    """Device time of one decode step in the profiled window (0: the profiler saw none)."""
    device_busy_fraction: float
    """device_ms_per_step / decode_step_ms_median."""
    categories_ms: dict[str, float]
    """Device ms per decode step by category (`CATEGORIES`, then "other")."""
    top_kernels: list[KernelTime]
    """The kernels (ops on the CPU) taking the most time, most first."""
    host_waits_per_step: float | None = None
    """Calls per decode step that made the host wait for the device (torch's sync check); None
    where not measured (the CPU, or no steps left after the profiled window)."""
    host_wait_sites: list[HostWait] = []
    """Those calls by site, most first."""
    prefill_step_ms_median: float | None = None
    """Median interval between steps before every request has its first token (None: fewer
    than two such intervals outside the profiled window)."""
    prefill_profiled_steps: int = 0
    """Prefill steps profiled (0: the prompts fill too few whole steps)."""
    prefill_device_ms_per_step: float = 0.0
    prefill_categories_ms: dict[str, float] = {}
    """Device ms per profiled prefill step by category."""
    prefill_top_kernels: list[KernelTime] = []


def category(name: str) -> str:
    return next((cat for cat, pattern in CATEGORIES if pattern.search(name)), "other")


def measure(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    profile_steps: int = 16,
    top: int = 15,
) -> Breakdown:
    """Run `prompts` (on an otherwise idle engine) to the end and break the time down."""
    device = engine.runner.device
    for i, prompt in enumerate(prompts):
        engine.add_request(f"breakdown-{i}", prompt, params)
    sync(device)
    # time.monotonic: the clock of the outputs' first_token_time.
    start = time.monotonic()
    stamps: list[list[float]] = [[]]  # runs of consecutive unprofiled steps
    window_start: float | None = None
    totals: dict[str, list[float]] = {}
    waits: dict[str, int] | None = None
    first_tokens: list[float] = []
    since_admitted = 0
    window_after = _prefill_steps(engine, max(map(len, prompts))) + SLACK_STEPS
    full_prefill_steps = sum(map(len, prompts)) // engine.config.max_num_batched_tokens
    profile_prefill = full_prefill_steps >= PREFILL_PROFILE_STEPS + 2
    prefill_totals: dict[str, list[float]] = {}
    steps_taken = 0
    while engine.has_unfinished_requests():
        if profile_prefill and steps_taken == 1:
            prefill_totals, outputs = _profile(engine, PREFILL_PROFILE_STEPS, device)
            stamps.append([])
        elif window_start is None and since_admitted == window_after and profile_steps:
            window_start = time.monotonic()
            totals, outputs = _profile(engine, profile_steps, device)
            if device.type == "cuda" and engine.has_unfinished_requests():
                waits, checked = _host_waits(engine, SYNC_CHECK_STEPS)
                outputs += checked
            stamps.append([])  # no interval spans the window
        else:
            outputs = engine.step()
            stamps[-1].append(time.monotonic())
        steps_taken += 1
        first_tokens += [o.first_token_time for o in outputs if o.first_token_time is not None]
        if window_start is None and engine.stats().waiting == 0:  # only to place the window
            since_admitted += 1
    sync(device)
    prefill_end = max(first_tokens, default=start)
    if window_start is not None and window_start < prefill_end:  # a bound above is wrong
        raise RuntimeError("the profiled window began before every request had its first token")
    intervals = [(a, 1e3 * (b - a)) for run in stamps for a, b in zip(run, run[1:])]
    steps_ms = [ms for a, ms in intervals if a >= prefill_end]
    prefill_ms = [ms for a, ms in intervals if a + ms / 1e3 <= prefill_end]
    median = statistics.median(steps_ms) if steps_ms else 0.0
    p90 = percentile(steps_ms, 0.9)
    device_ms, categories, kernels = _per_step(totals, profile_steps, top)
    prefill_device_ms, prefill_categories, prefill_kernels = _per_step(
        prefill_totals, PREFILL_PROFILE_STEPS, top
    )
    return Breakdown(
        prefill_s=prefill_end - start,
        decode_steps=len(steps_ms),
        decode_step_ms_median=median,
        decode_step_ms_p90=p90,
        profiled_steps=profile_steps if window_start is not None else 0,
        device_ms_per_step=device_ms,
        device_busy_fraction=device_ms / median if median else 0.0,
        categories_ms=categories,
        top_kernels=kernels,
        host_waits_per_step=None if waits is None else sum(waits.values()) / SYNC_CHECK_STEPS,
        host_wait_sites=[
            HostWait(site, count / SYNC_CHECK_STEPS)
            for site, count in sorted((waits or {}).items(), key=lambda kv: -kv[1])
        ],
        prefill_step_ms_median=statistics.median(prefill_ms) if len(prefill_ms) > 1 else None,
        prefill_profiled_steps=PREFILL_PROFILE_STEPS if profile_prefill else 0,
        prefill_device_ms_per_step=prefill_device_ms,
        prefill_categories_ms=prefill_categories,
        prefill_top_kernels=prefill_kernels,
    )


def _per_step(
    totals: dict[str, list[float]], steps: int, top: int
) -> tuple[float, dict[str, float], list[KernelTime]]:
    """Device ms per step, its split by category (most first) and the `top` kernels, from a
    profiled window's (total ms, calls) per kernel over `steps` steps."""
    per_kernel = [
        KernelTime(name, ms / steps, calls / steps) for name, (ms, calls) in totals.items()
    ]
    categories: dict[str, float] = defaultdict(float)
    for kernel in per_kernel:
        categories[category(kernel.name)] += kernel.ms_per_step
    return (
        sum(k.ms_per_step for k in per_kernel),
        dict(sorted(categories.items(), key=lambda kv: -kv[1])),
        sorted(per_kernel, key=lambda k: -k.ms_per_step)[:top],
    )


def _prefill_steps(engine: Engine, prompt_len: int) -> int:
    """The most steps a prompt admitted now takes to its first token: chunks of the step budget
    left beside every running decode (within the per-request cap), one more for a first chunk cut
    short, one more for the token's own step to come back (async scheduling)."""
    config = engine.config
    chunk = config.max_num_batched_tokens - config.max_num_seqs
    if config.long_prefill_token_threshold:
        chunk = min(chunk, config.long_prefill_token_threshold)
    return -(-prompt_len // max(chunk, 1)) + 2


def _profile(
    engine: Engine, steps: int, device: torch.device
) -> tuple[dict[str, list[float]], list[RequestOutput]]:
    """(total ms, calls) per kernel over `steps` engine steps (CUDA kernels on a GPU, aten ops'
    self time on the CPU), and the steps' outputs."""
    cuda = device.type == "cuda"
    outputs: list[RequestOutput] = []
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            outputs += engine.step()
        sync(device)
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for event in prof.events():
        if cuda != (event.device_type == torch.autograd.DeviceType.CUDA):
            continue
        if not cuda and not event.name.startswith("aten::"):
            continue
        entry = totals[event.name]
        entry[0] += (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e3
        entry[1] += 1
    return dict(totals), outputs


def _host_waits(engine: Engine, steps: int) -> tuple[dict[str, int], list[RequestOutput]]:
    """Calls that made the host wait for the device over `steps` engine steps, by call site (the
    warnings of torch's sync check), and the steps' outputs."""
    outputs: list[RequestOutput] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                outputs += engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # Only torch's per-call warning: setting the mode also warns (that it is a prototype), from
    # torch's own file, which is no wait.
    sites = Counter(f"{w.filename}:{w.lineno}" for w in caught if _SYNC_WARNING in str(w.message))
    return dict(sites), outputs


def table(breakdown: dict[str, Any]) -> str:
    """The breakdown as printed lines (from its JSON form)."""
    b = breakdown
    median = b["decode_step_ms_median"]
    lines = [
        f"prefill {b['prefill_s']:.2f} s; decode step median {median:.2f} ms, "
        f"p90 {b['decode_step_ms_p90']:.2f} ms ({b['decode_steps']} steps); device busy "
        f"{100 * b['device_busy_fraction']:.0f}% ({b['device_ms_per_step']:.2f} ms of device "
        f"time per step over {b['profiled_steps']} profiled steps)",
        f"  {'part':<28} {'ms/step':>8} {'share':>6}",
    ]
    parts = list(b["categories_ms"].items())
    parts.append(("waiting for the host", max(median - b["device_ms_per_step"], 0.0)))
    for name, ms in parts:
        share = 100 * ms / median if median else 0.0
        lines.append(f"  {name:<28} {ms:>8.3f} {share:>5.0f}%")
    if b.get("host_waits_per_step") is not None:
        lines.append(f"  host waits per step (torch sync check): {b['host_waits_per_step']:.2f}")
        for w in b["host_wait_sites"]:
            lines.append(f"    {w['site'][-64:]:<64} {w['per_step']:>6.2f}")
    lines += _kernel_lines(b["top_kernels"])
    if b.get("prefill_profiled_steps"):
        step = b["prefill_step_ms_median"]
        lines.append(
            f"prefill step median {step or float('nan'):.2f} ms; "
            f"{b['prefill_device_ms_per_step']:.2f} ms of device time per step over "
            f"{b['prefill_profiled_steps']} profiled steps"
        )
        lines.append(f"  {'part':<28} {'ms/step':>8} {'share':>6}")
        for name, ms in b["prefill_categories_ms"].items():
            share = 100 * ms / step if step else 0.0
            lines.append(f"  {name:<28} {ms:>8.3f} {share:>5.0f}%")
        lines += _kernel_lines(b["prefill_top_kernels"])
    return "\n".join(lines)


def _kernel_lines(kernels: list[dict[str, Any]]) -> list[str]:
    lines = [f"  {'kernel':<60} {'ms/step':>8} {'calls':>6}"]
    for k in kernels:
        lines.append(f"  {k['name'][:60]:<60} {k['ms_per_step']:>8.3f} {k['calls_per_step']:>6.1f}")
    return lines
