"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

The engine's own counters (requests running/waiting, KV pages per pool, preemptions, token totals)
come from `AsyncEngine.stats()` at scrape time; latency histograms and the recent token rate are
fed by the request handlers as outputs reach them, which is the latency a client sees minus the
network. Everything here runs on the event loop's thread, so nothing needs a lock.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque

from omniserve.engine.engine import EngineStats
from omniserve.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class Histogram:
    """Cumulative-bucket histogram with Prometheus `le` semantics (a value equal to a bound counts
    in that bucket)."""

    def __init__(self, name: str, help_text: str, bounds: tuple[float, ...]) -> None:
        self.name = name
        self.help = help_text
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times
        self.count += times

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {self.help}")
        out.append(f"# TYPE {self.name} histogram")
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            running += n
            le = "+Inf" if bound == math.inf else repr(float(bound))
            out.append(f'{self.name}_bucket{{le="{le}"}} {running}')
        out.append(f"{self.name}_sum {self.sum!r}")
        out.append(f"{self.name}_count {self.count}")


class TokenRate:
    """Generated tokens per second over the last `window` seconds, in one-second buckets."""

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self._buckets: deque[list[int]] = deque()  # [second, tokens]
        self._start = time.monotonic()

    def add(self, tokens: int, now: float) -> None:
        second = int(now)
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += tokens
        else:
            self._buckets.append([second, tokens])
        self._expire(second)

    def rate(self, now: float) -> float:
        self._expire(int(now))
        span = min(float(self.window), now - self._start)
        return sum(n for _, n in self._buckets) / span if span > 0 else 0.0

    def _expire(self, second: int) -> None:
        while self._buckets and self._buckets[0][0] <= second - self.window:
            self._buckets.popleft()


class RequestTimer:
    """Follows one request's outputs (any output kind) and feeds the latency metrics. Times are
    taken when outputs reach the handler, from when it submitted the request: the latency a client
    sees, minus the network."""

    __slots__ = ("_ended", "_last", "_metrics", "_start", "_tokens")

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self._start = self._last = time.monotonic()
        self._tokens = 0
        self._ended = False

    def observe(self, out: RequestOutput) -> None:
        m = self._metrics
        now = time.monotonic()
        new = out.num_generated_tokens - self._tokens
        if new > 0:
            m.token_rate.add(new, now)
            if self._tokens > 0:
                m.itl.observe((now - self._last) / new, new)
            elif new > 1 and out.finish_time is not None and out.first_token_time is not None:
                # A "final" output brings every token at once: only the engine's timestamps tell
                # when the first came, and the gaps' mean is all that is known of them.
                generating = out.finish_time - out.first_token_time
                m.ttft.observe(now - self._start - generating)
                m.itl.observe(generating / (new - 1), new - 1)
            else:
                m.ttft.observe(now - self._start)
            self._tokens = out.num_generated_tokens
            self._last = now
        if out.finished:
            self._end(out.finish_reason or "unknown", now)

    def cancelled(self) -> None:
        """The client went away before the request's last output (the engine aborts it, and
        its final output reaches nobody): counted as finished with reason "abort"."""
        if not self._ended:
            self._end("abort", time.monotonic())

    def _end(self, reason: str, now: float) -> None:
        m = self._metrics
        self._ended = True
        m.e2e.observe(now - self._start)
        m.finished[reason] = m.finished.get(reason, 0) + 1


class ServerMetrics:
    def __init__(self) -> None:
        self.ttft = Histogram(
            "omniserve_time_to_first_token_seconds",
            "Time from a request's submission to its first generated token.",
            _TTFT_BUCKETS,
        )
        self.itl = Histogram(
            "omniserve_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request.",
            _ITL_BUCKETS,
        )
        self.e2e = Histogram(
            "omniserve_request_latency_seconds",
            "Time from a request's submission to its end.",
            _E2E_BUCKETS,
        )
        self.token_rate = TokenRate()
        self.finished: dict[str, int] = {}
        self.rejected: dict[int, int] = {}
        """Requests answered with an error, by HTTP status."""

    def render(self, stats: EngineStats) -> str:
        now = time.monotonic()
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {value!r}" for labels, value in samples)

        metric(
            "omniserve_requests_running", "gauge", "Requests being computed.", [("", stats.running)]
        )
        metric(
            "omniserve_requests_waiting",
            "gauge",
            "Requests waiting for admission.",
            [("", stats.waiting)],
        )
        metric(
            "omniserve_kv_pages_used",
            "gauge",
            "KV cache pages in use, per pool.",
            [
                ('{pool="dense"}', stats.dense_pages_used),
                ('{pool="stream"}', stats.stream_pages_used),
            ],
        )
        metric(
            "omniserve_kv_pages_total",
            "gauge",
            "KV cache pages available, per pool.",
            [
                ('{pool="dense"}', stats.dense_pages_total),
                ('{pool="stream"}', stats.stream_pages_total),
            ],
        )
        metric(
            "omniserve_preemptions_total",
            "counter",
            "Requests preempted (recomputed later).",
            [("", stats.num_preemptions)],
        )
        metric(
            "omniserve_prompt_tokens_total",
            "counter",
            "Prompt tokens accepted.",
            [("", stats.prompt_tokens_total)],
        )
        metric(
            "omniserve_generation_tokens_total",
            "counter",
            "Tokens generated.",
            [("", stats.generated_tokens_total)],
        )
        metric(
            "omniserve_generation_tokens_per_second",
            "gauge",
            f"Tokens generated per second over the last {self.token_rate.window} s.",
            [("", self.token_rate.rate(now))],
        )
        metric(
            "omniserve_requests_finished_total",
            "counter",
            "Requests finished, by finish reason.",
            [(f'{{finish_reason="{r}"}}', n) for r, n in sorted(self.finished.items())],
        )
        metric(
            "omniserve_requests_rejected_total",
            "counter",
            "Requests answered with an error, by HTTP status.",
            [(f'{{status="{s}"}}', n) for s, n in sorted(self.rejected.items())],
        )
        for hist in (self.ttft, self.itl, self.e2e):
            hist.render(out)
        out.append("")
        return "\n".join(out)
