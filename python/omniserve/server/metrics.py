"""Server metrics through `prometheus_client`: the standard exposition (Prometheus text, or
OpenMetrics when the scraper asks for it), its escaping, and the process, platform and GC
collectors, in a registry of the server's own.

The engine's own numbers (requests running/waiting, KV pages per pool, preemptions, prefix-cache
lookups, token totals) are read from `AsyncEngine.stats()` at scrape time; latency histograms and
the recent token rate are fed by the request handlers as outputs reach them, which is the latency
a client sees minus the network. Everything here runs on the event loop's thread.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from omniserve.engine.engine import EngineStats
from omniserve.outputs import RequestOutput

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
                _observe(m.itl, (now - self._last) / new, new)
            elif new > 1 and out.finish_time is not None and out.first_token_time is not None:
                # A "final" output brings every token at once: only the engine's timestamps tell
                # when the first came, and the gaps' mean is all that is known of them.
                generating = out.finish_time - out.first_token_time
                m.ttft.observe(now - self._start - generating)
                _observe(m.itl, generating / (new - 1), new - 1)
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
        m.finished.labels(finish_reason=reason).inc()


def _observe(hist: Histogram, value: float, times: int) -> None:
    """`times` observations of one value (tokens that arrived together share their gap)."""
    for _ in range(times):
        hist.observe(value)


class _EngineCollector:
    """The engine's gauges and counters, read from its stats snapshot when scraped."""

    def __init__(self, stats: Callable[[], EngineStats], token_rate: TokenRate) -> None:
        self._stats = stats
        self._token_rate = token_rate

    def collect(self) -> Iterator[Metric]:
        s = self._stats()

        def gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, help_text, value=value)

        def counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, help_text, value=value)

        def per_pool(name: str, help_text: str, dense: int, stream: int) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, help_text, labels=["pool"])
            family.add_metric(["dense"], dense)
            family.add_metric(["stream"], stream)
            return family

        yield gauge("omniserve_requests_running", "Requests being computed.", s.running)
        yield gauge("omniserve_requests_waiting", "Requests waiting for admission.", s.waiting)
        yield per_pool(
            "omniserve_kv_pages_used",
            "KV cache pages in use, per pool.",
            s.dense_pages_used,
            s.stream_pages_used,
        )
        yield per_pool(
            "omniserve_kv_pages_total",
            "KV cache pages available, per pool.",
            s.dense_pages_total,
            s.stream_pages_total,
        )
        yield gauge(
            "omniserve_prefix_cache_pages",
            "Dense pages the prefix cache holds, in use or free.",
            s.prefix_cache_pages,
        )
        yield counter(
            "omniserve_prefix_cache_queries",
            "Prompt tokens of admitted requests looked up in the prefix cache.",
            s.prefix_cache_queries,
        )
        yield counter(
            "omniserve_prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            s.prefix_cache_hits,
        )
        yield counter(
            "omniserve_preemptions",
            "Requests preempted (recomputed later).",
            s.num_preemptions,
        )
        yield counter("omniserve_prompt_tokens", "Prompt tokens accepted.", s.prompt_tokens_total)
        yield counter("omniserve_generation_tokens", "Tokens generated.", s.generated_tokens_total)
        yield gauge(
            "omniserve_generation_tokens_per_second",
            f"Tokens generated per second over the last {self._token_rate.window} s.",
            self._token_rate.rate(time.monotonic()),
        )


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        """`stats`: the engine's current numbers (a cheap snapshot), read at every scrape."""
        self.registry = CollectorRegistry()
        registry = self.registry
        self.ttft = Histogram(
            "omniserve_time_to_first_token_seconds",
            "Time from a request's submission to its first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            "omniserve_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request.",
            buckets=_ITL_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            "omniserve_request_latency_seconds",
            "Time from a request's submission to its end.",
            buckets=_E2E_BUCKETS,
            registry=registry,
        )
        self.finished = Counter(
            "omniserve_requests_finished",
            "Requests finished, by finish reason (abort: cancelled by the client or the server).",
            ["finish_reason"],
            registry=registry,
        )
        self.rejected = Counter(
            "omniserve_requests_rejected",
            "Requests answered with an error, by HTTP status.",
            ["status"],
            registry=registry,
        )
        self.token_rate = TokenRate()
        registry.register(_EngineCollector(stats, self.token_rate))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition the `Accept` header asks for, and its content type."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type
