"""The worker's Prometheus endpoint after real requests through the engine (tiny random-weight
Llama), the per-step token counts on each completion, and the per-worker metrics port of `up`."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.factory import free_port
from tests.unit.test_engine import engine, tiny
from tests.unit.test_serving import job, step_meter
from tokenmill.cli import process_settings
from tokenmill.events import STEP_TOKEN_RUNS_MAX, JobCompleted
from tokenmill.settings import Settings
from tokenmill.worker.metrics import WorkerMetrics, add_step_tokens
from tokenmill.worker.serving import EngineService


@pytest.fixture
def served():
    eng = engine(tiny(), running_max=4, waiting_max=4)
    metrics = WorkerMetrics(eng)
    port = free_port()
    metrics.serve("127.0.0.1", port)
    service = EngineService(eng, step_meter(), "worker-test", metrics=metrics)
    yield service, f"http://127.0.0.1:{port}/metrics"
    service.close()


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of the page by (name, labels)."""
    text = httpx.get(url, timeout=5).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset({"model_name": "tiny", **labels}.items()))]


async def test_the_endpoint_counts_what_the_requests_did(served):
    service, url = served
    before = scrape(url)
    assert value(before, "tokenmill:num_requests_running") == 0
    shared = "a shared system prompt, long enough to fill blocks. "
    jobs = [
        job("p1", shared + "first", max_tokens=7, tier="premium"),
        job("s1", shared + "second", max_tokens=5),
        job("s2", "something else", max_tokens=6),
    ]
    first = await service.run(jobs[0])  # Fills the prefix cache that s1 then hits.
    rest = await asyncio.gather(*(service.run(j) for j in jobs[1:]))
    outcomes = [first, *rest]
    assert all(isinstance(o, JobCompleted) for o in outcomes)
    samples = scrape(url)

    for tier in ("premium", "standard"):
        done = [o for o in outcomes if o.tier == tier]
        assert value(samples, "tokenmill:prompt_tokens_total", tier=tier) == sum(
            o.prompt_tokens for o in done
        )
        assert value(samples, "tokenmill:generation_tokens_total", tier=tier) == sum(
            o.completion_tokens for o in done
        )
        for histogram in ("time_to_first_token", "e2e_request_latency"):
            name = f"tokenmill:{histogram}_seconds_count"
            assert value(samples, name, tier=tier) == len(done)
        # One inter-token latency per token after each request's first.
        itl_count = value(samples, "tokenmill:inter_token_latency_seconds_count", tier=tier)
        assert itl_count == sum(o.completion_tokens - 1 for o in done)
    ttft_sum_s = value(samples, "tokenmill:time_to_first_token_seconds_sum", tier="premium")
    assert ttft_sum_s == pytest.approx(first.ttft_ms / 1000)
    hits = value(samples, "tokenmill:prefix_cache_hits_total")
    assert hits == service.engine.prefix_hit_tokens_total > 0
    assert rest[0].cached_prompt_tokens > 0
    assert value(samples, "tokenmill:prefix_cache_queries_total") > hits
    assert value(samples, "tokenmill:num_requests_waiting") == 0
    assert value(samples, "tokenmill:kv_cache_usage_perc") == 0  # Cached blocks are evictable.


async def test_each_completion_carries_its_tokens_per_step(served):
    service, _ = served
    outcomes = await asyncio.gather(
        *(service.run(job(f"j{i}", "hello there " * (i + 3), max_tokens=6)) for i in range(4))
    )
    for outcome in outcomes:
        assert outcome.preemptions == 0
        computed = outcome.prompt_tokens - outcome.cached_prompt_tokens
        # Every prompt position not cached was run once, and every output token but the last
        # was fed back once.
        total = sum(tokens * steps for tokens, steps in outcome.step_tokens)
        assert total == computed + outcome.completion_tokens - 1
        assert outcome.step_tokens[-1] == (1, outcome.completion_tokens - 1)


def test_step_tokens_are_run_length_encoded_and_bounded():
    runs: list[list[int]] = []
    for tokens in (16, 16, 9, 1, 1, 1):
        add_step_tokens(runs, tokens)
    assert runs == [[16, 2], [9, 1], [1, 3]]
    many: list[list[int]] = []
    for step in range(3 * STEP_TOKEN_RUNS_MAX):
        add_step_tokens(many, 2 + step % 2)  # Alternating sizes: a new run every step.
    assert len(many) == STEP_TOKEN_RUNS_MAX
    assert many[-1] == [0, 3 * STEP_TOKEN_RUNS_MAX - (STEP_TOKEN_RUNS_MAX - 1)]
    with pytest.raises(AssertionError):
        add_step_tokens(runs, 0)


def test_up_gives_each_worker_its_own_metrics_port():
    settings = Settings(worker_metrics_port=9400)
    ports = [process_settings(f"worker-{i}", settings).worker_metrics_port for i in (1, 2, 3)]
    assert ports == [9400, 9401, 9402]
    assert process_settings("worker", settings).worker_metrics_port == 9400
    assert process_settings("intake", settings) is settings
    off = dataclasses.replace(settings, worker_metrics_port=0)
    assert process_settings("worker-2", off).worker_metrics_port == 0
