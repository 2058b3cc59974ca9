"""The worker's Prometheus metrics, named like vLLM's so that its dashboards carry over.

vLLM prefixes its metrics `vllm:`; the worker uses `tokenmill:` the same way and otherwise
keeps vLLM's names, units and label `model_name` (request-level series also carry `tier`):

- histograms `tokenmill:time_to_first_token_seconds`, `tokenmill:inter_token_latency_seconds`
  and `tokenmill:e2e_request_latency_seconds`, with vLLM's buckets;
- gauges `tokenmill:num_requests_running`, `tokenmill:num_requests_waiting` and
  `tokenmill:kv_cache_usage_perc` (a fraction, 0 to 1, as in vLLM despite the name);
- counters `tokenmill:prompt_tokens_total`, `tokenmill:generation_tokens_total`,
  `tokenmill:prefix_cache_queries_total` and `tokenmill:prefix_cache_hits_total` (prompt
  tokens looked up in, and found in, the prefix cache), and `tokenmill:num_preemptions_total`.

Time to first token and end to end latency are the ones on JobCompleted: from the job's
submission at the intake, so they include the time the job waited in Redis (vLLM's start when
its server receives the request). Token counters count completed requests only: the tokens of
a cancelled or failed request were never billed either. The gauges and the engine's own
counters are read from the engine when scraped, so no step pays for them; the scrape runs on
the HTTP server's thread and reads a few integers the engine thread writes, which needs no lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenmill.events import STEP_TOKEN_RUNS_MAX, JobCompleted
from tokenmill.worker.engine import BatchEngine, StepOutput

PREFIX = "tokenmill:"
# vLLM's buckets (vllm/v1/metrics/loggers.py), so that the same quantile queries work.
TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS_S = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


class WorkerMetrics:
    """The metrics of one engine, in `registry`. `on_step` runs on the engine thread after each
    step, `on_completed` once per completed request."""

    def __init__(self, engine: BatchEngine, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model = engine.runner.name
        request_labels = ("model_name", "tier")
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from the job's submission to its first output token.",
            request_labels,
            registry=self.registry,
            buckets=TTFT_BUCKETS_S,
        )
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between two consecutive output tokens of a request.",
            request_labels,
            registry=self.registry,
            buckets=ITL_BUCKETS_S,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Time from the job's submission to its completion.",
            request_labels,
            registry=self.registry,
            buckets=E2E_BUCKETS_S,
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens",
            "Prompt tokens of completed requests.",
            request_labels,
            registry=self.registry,
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens",
            "Output tokens of completed requests.",
            request_labels,
            registry=self.registry,
        )
        self._last_token_s: dict[str, float] = {}  # Request id -> when its last token came.
        self._live_max = engine.config.running_max + engine.config.waiting_max
        self.registry.register(_EngineCollector(engine))

    def on_step(self, outputs: list[StepOutput], tier_of: Callable[[str], str | None]) -> None:
        """One inter-token latency per output token after a request's first. `tier_of` is the
        tier of a request in hand, None for one no longer in hand (cancelled, given back)."""
        now_s = time.perf_counter()
        for output in outputs:
            if not output.new_token_ids:
                continue  # A prompt chunk that did not reach the end of the prompt.
            tier = tier_of(output.request_id)
            last_s = self._last_token_s.pop(output.request_id, None)
            if last_s is not None and tier is not None:
                self.itl.labels(self.model, tier).observe(now_s - last_s)
            if output.finished is None and tier is not None:
                self._last_token_s[output.request_id] = now_s
        if len(self._last_token_s) > self._live_max:
            # Requests cancelled between their tokens never finish: forget them here.
            self._last_token_s = {
                request_id: last_s
                for request_id, last_s in self._last_token_s.items()
                if tier_of(request_id) is not None
            }

    def on_completed(self, completed: JobCompleted) -> None:
        labels = (self.model, completed.tier)
        self.ttft.labels(*labels).observe(completed.ttft_ms / 1000)
        self.e2e.labels(*labels).observe(completed.e2e_ms / 1000)
        self.prompt_tokens.labels(*labels).inc(completed.prompt_tokens)
        self.generation_tokens.labels(*labels).inc(completed.completion_tokens)

    def serve(self, host: str, port: int) -> None:
        """Serve `/metrics` (any path, in fact) on `host:port` from a daemon thread."""
        start_http_server(port, addr=host, registry=self.registry)


class _EngineCollector(Collector):
    """The engine's state and running totals, read when scraped."""

    def __init__(self, engine: BatchEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine, labels = self.engine, ["model_name"]
        values = [engine.runner.name]
        gauges = (
            ("num_requests_running", "Requests in the running batch.", len(engine.running)),
            ("num_requests_waiting", "Requests waiting in the engine.", len(engine.waiting)),
            ("kv_cache_usage_perc", "Fraction of KV cache blocks in use.", engine.pool.usage),
        )
        for name, documentation, value in gauges:
            family = GaugeMetricFamily(PREFIX + name, documentation, labels=labels)
            family.add_metric(values, value)
            yield family
        counters = (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             engine.prefix_queried_tokens_total),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
             engine.prefix_hit_tokens_total),
            ("num_preemptions", "Requests preempted (KV freed, recomputed later).",
             engine.preemptions_total),
        )  # fmt: skip
        for name, documentation, value in counters:
            family = CounterMetricFamily(PREFIX + name, documentation, labels=labels)
            family.add_metric(values, value)
            yield family


def add_step_tokens(runs: list[list[int]], tokens: int) -> None:
    """Count one step of `tokens` into `runs`, the run-length encoding of
    JobCompleted.step_tokens, keeping it within STEP_TOKEN_RUNS_MAX runs."""
    assert tokens >= 1, "a request in a step has at least one token"
    if runs and runs[-1][0] in (tokens, 0):
        runs[-1][1] += 1
    elif len(runs) < STEP_TOKEN_RUNS_MAX - 1:
        runs.append([tokens, 1])
    else:
        runs.append([0, 1])  # The cap: every later step is counted here, not itemized.
