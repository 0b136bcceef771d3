"""Prometheus metrics in the `lmstack:` namespace, named as vLLM's `vllm:` ones where they exist.

Latency histograms (time to first token, inter-token latency, time per output token, end to
end, queue time) are observed by the server as tokens stream out. The engine's own state
(running/waiting, KV-cache usage, preemptions, prefix-cache hits, token counters) is read from
`engine.stats()` at scrape time by a custom collector, so the two never drift apart. Each app
has its own `CollectorRegistry`: no global state, and several servers can live in one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

NS = "lmstack:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets, so dashboards built for vLLM read ours the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class EngineStatsCollector:
    """Reads `stats()` (an `EngineStats`, or None while the engine loads) at every scrape."""

    def __init__(self, model_name: str, stats: Callable[[], Any], admission: Any):
        self.model_name = model_name
        self.stats = stats
        self.admission = admission

    def describe(self) -> list:  # no describe-time scrape: the engine may not exist yet
        return []

    def collect(self):
        labels, value = ["model_name"], [self.model_name]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(NS + name, doc, labels=labels)
            g.add_metric(value, v)
            return g

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            c = CounterMetricFamily(NS + name, doc, labels=labels)
            c.add_metric(value, v)
            return c

        yield gauge("server_requests_waiting", "Requests admitted by the server that have no output yet.",
                    self.admission.num_waiting)
        yield gauge("server_requests_in_flight", "HTTP requests being served.", self.admission.num_in_flight)
        s = self.stats()
        if s is None:
            return
        yield gauge("num_requests_running", "Sequences being computed by the engine.", s.num_running)
        yield gauge("num_requests_waiting", "Sequences queued in the engine (new or preempted).", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", s.kv_cache_usage)
        yield gauge("kv_cache_blocks_total", "KV-cache blocks in the pool.", s.kv_blocks_total)
        yield counter("num_preemptions", "Sequences preempted (blocks freed, recomputed later).",
                      s.num_preemptions_total)
        yield counter("prompt_tokens", "Prompt tokens of admitted requests.", s.prompt_tokens_total)
        yield counter("generation_tokens", "Generated tokens.", s.generation_tokens_total)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_cache_queries_total)
        yield counter("prefix_cache_hits", "Prompt tokens served from the prefix cache.", s.prefix_cache_hits_total)


class ServerMetrics:
    """Every metric of one server; `observe_*` are called by the request handlers."""

    def __init__(self, model_name: str, stats: Callable[[], Any], admission: Any):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.ttft = Histogram(NS + "time_to_first_token_seconds", "Time from arrival to the first token.",
                              labels, registry=r, buckets=TTFT_BUCKETS)
        self.itl = Histogram(NS + "inter_token_latency_seconds", "Time between consecutive output tokens.",
                             labels, registry=r, buckets=ITL_BUCKETS)
        self.tpot = Histogram(NS + "time_per_output_token_seconds", "Mean time per output token after the "
                              "first, per request.", labels, registry=r, buckets=ITL_BUCKETS)
        self.e2e = Histogram(NS + "e2e_request_latency_seconds", "Time from arrival to the last token.",
                             labels, registry=r, buckets=LATENCY_BUCKETS)
        self.queue = Histogram(NS + "request_queue_time_seconds", "Time from arrival to first scheduling.",
                               labels, registry=r, buckets=LATENCY_BUCKETS)
        self.prompt_len = Histogram(NS + "request_prompt_tokens", "Prompt length per request.", labels,
                                    registry=r, buckets=TOKEN_BUCKETS)
        self.output_len = Histogram(NS + "request_generation_tokens", "Generated tokens per request.", labels,
                                    registry=r, buckets=TOKEN_BUCKETS)
        self.success = Counter(NS + "request_success", "Finished sequences by finish reason.",
                               labels + ["finished_reason"], registry=r)
        self.refused = Counter(NS + "requests_refused", "Requests refused before generation, by reason "
                               "(queue_full, safety, shutting_down).", labels + ["reason"], registry=r)
        self.safety_refusals = Counter(NS + "safety_refusals", "Requests refused or stopped by the content "
                                       "filter, by stage (input/output) and category.",
                                       labels + ["stage", "category"], registry=r)
        self.errors = Counter(NS + "request_errors", "Requests answered with an error, by HTTP status.",
                              labels + ["status"], registry=r)
        self.starting = Gauge(NS + "engine_loading", "1 while the model is loading, else 0.", labels, registry=r)
        r.register(EngineStatsCollector(model_name, stats, admission))
        # Children for this model, looked up once: observed for every token.
        self.ttft_m, self.itl_m, self.tpot_m, self.e2e_m, self.queue_m, self.prompt_len_m, self.output_len_m = (
            h.labels(model_name) for h in (self.ttft, self.itl, self.tpot, self.e2e, self.queue, self.prompt_len,
                                           self.output_len))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def refusal(self, reason: str) -> None:
        self.refused.labels(self.model_name, reason).inc()

    def safety_refusal(self, stage: str, category: str) -> None:
        self.safety_refusals.labels(self.model_name, stage, category).inc()
        self.refusal("safety")

    def error(self, status: int) -> None:
        self.errors.labels(self.model_name, str(status)).inc()

    def timer(self, num_prompt_tokens: int) -> RequestTimer:
        return RequestTimer(self, num_prompt_tokens)


class RequestTimer:
    """Latencies of one engine request (all its n samples), observed as its tokens stream out."""

    def __init__(self, metrics: ServerMetrics, num_prompt_tokens: int):
        self.metrics = metrics
        self.arrival = time.perf_counter()
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.num_prompt_tokens = num_prompt_tokens
        self.num_output_tokens = 0
        self.queue_observed = False

    def tokens(self, count: int, queue_time: float | None = None) -> None:
        """`count` new tokens arrived now (over all samples)."""
        if count <= 0:
            return
        m = self.metrics
        t = time.perf_counter()
        if queue_time is not None and not self.queue_observed:
            self.queue_observed = True
            m.queue_m.observe(max(0.0, queue_time))
        if self.first_token is None:
            self.first_token = t
            m.ttft_m.observe(t - self.arrival)
        else:
            gap = (t - self.last_token) / count
            for _ in range(count):
                m.itl_m.observe(gap)
        self.num_output_tokens += count
        self.last_token = t

    def finished(self, finish_reasons: list[str]) -> None:
        m, name = self.metrics, self.metrics.model_name
        end = time.perf_counter()
        m.e2e_m.observe(end - self.arrival)
        m.prompt_len_m.observe(self.num_prompt_tokens)
        m.output_len_m.observe(self.num_output_tokens)
        if self.first_token is not None and self.num_output_tokens > 1:
            m.tpot_m.observe((self.last_token - self.first_token) / (self.num_output_tokens - 1))
        for reason in finish_reasons:
            m.success.labels(name, reason).inc()
