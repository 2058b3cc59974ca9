"""The engine behind its thread, as the worker uses it: many jobs at once, each step's energy
split across its requests so that nothing metered in a step is lost or counted twice, and a
cancelled job stopped."""

from __future__ import annotations

import asyncio
import itertools
from decimal import Decimal

import pytest

from tests.integration.helpers import eventually
from tests.unit.test_engine import engine, tiny
from tokenmill.events import JobCompleted, JobFailed, JobSubmitted
from tokenmill.meters import ScriptedMeter
from tokenmill.worker.serving import CANCELLED_BEFORE_OUTPUT, EngineFailed, EngineService

STEP_J = Decimal("0.5")


def step_meter() -> ScriptedMeter:
    """One watt on a clock that moves half a second per reading: each reading counts STEP_J."""
    return ScriptedMeter([(0.0, 1.0)], clock=itertools.count(0, float(STEP_J)).__next__)


def job(request_id: str, prompt: str, max_tokens: int = 8, **fields) -> JobSubmitted:
    return JobSubmitted(
        producer="test",
        customer_id=fields.pop("customer_id", "cus_1"),
        request_id=request_id,
        region="eu-west",
        tier=fields.pop("tier", "standard"),
        model="tiny",
        prompt=prompt,
        max_tokens=max_tokens,
        **fields,
    )


@pytest.fixture
def serving():
    eng = engine(tiny(), running_max=4, waiting_max=4)
    steps = []
    step = eng.step

    def counted():
        outputs = step()
        steps.append([o.request_id for o in outputs])
        return outputs

    eng.step = counted
    service = EngineService(eng, step_meter(), "worker-test")
    service.steps = steps
    yield service
    service.close()


async def test_jobs_run_together_and_share_each_steps_energy_exactly(serving):
    jobs = [job(f"j{i}", "hello there " * (i + 1), max_tokens=6 + i) for i in range(5)]
    outcomes = await asyncio.gather(*(serving.run(j) for j in jobs))
    assert all(isinstance(o, JobCompleted) for o in outcomes)
    # Every step ran for these jobs alone, so their shares add up to all that was metered.
    metered_j = STEP_J * len([s for s in serving.steps if s])
    assert sum(o.energy.energy_j for o in outcomes) == metered_j
    assert max(len(s) for s in serving.steps) > 1, "the jobs shared steps"
    for outcome in outcomes:
        assert outcome.worker == "worker-test" and outcome.energy.meter == "scripted"
        assert outcome.queue_ms <= outcome.ttft_ms <= outcome.e2e_ms
        assert outcome.completion_tokens == 1 or outcome.tpot_ms > 0
        assert outcome.cached_prompt_tokens <= outcome.prompt_tokens


async def test_a_repeated_prompt_reports_its_cached_tokens(serving):
    first = await serving.run(job("first", "the same long system prompt for all"))
    second = await serving.run(job("second", "the same long system prompt for all"))
    assert first.cached_prompt_tokens == 0
    assert second.cached_prompt_tokens > 0
    assert second.text == first.text


async def test_a_cancelled_job_stops_and_frees_the_engine(serving, monkeypatch):
    # Without an end-of-sequence token the job runs to its 200 tokens unless stopped.
    monkeypatch.setattr(serving.engine.runner, "eos_token_ids", frozenset())
    running = asyncio.ensure_future(serving.run(job("long", "go", max_tokens=200)))

    async def started() -> bool:
        return bool(serving.engine.running)

    await eventually(started)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    done = await serving.run(job("after", "next"))
    assert isinstance(done, JobCompleted)
    assert not serving.engine.has_work


async def test_a_job_that_cannot_fit_fails_without_running(serving):
    outcome = await serving.run(job("huge", "x" * 500, max_tokens=2))
    assert isinstance(outcome, JobFailed)
    assert "positions" in outcome.reason


async def test_a_failing_step_gives_every_job_back_for_a_retry(serving, monkeypatch):
    def broken():
        raise RuntimeError("a bug in a step")

    monkeypatch.setattr(serving.engine, "step", broken)
    with pytest.raises(EngineFailed, match="a bug in a step"):
        await serving.run(job("unlucky", "hello"))
    assert not serving.holds("unlucky") and not serving.engine.has_work


async def test_a_stopped_job_ends_cancelled_with_the_tokens_it_made(serving, monkeypatch):
    monkeypatch.setattr(serving.engine.runner, "eos_token_ids", frozenset())
    stop = asyncio.Event()
    running = asyncio.ensure_future(serving.run(job("long", "go", max_tokens=200), stop))

    async def made_tokens() -> bool:
        return any(len(r.output_ids) >= 3 for r in serving.engine.running)

    await eventually(made_tokens)
    stop.set()
    outcome = await running
    assert isinstance(outcome, JobCompleted) and outcome.finish_reason == "cancelled"
    assert 3 <= outcome.completion_tokens < 200 and outcome.energy.energy_j > 0
    assert not serving.engine.has_work and serving.engine.pool.available > 0


async def test_a_job_stopped_before_its_first_token_fails_unbilled(serving):
    stop = asyncio.Event()
    stop.set()
    outcome = await serving.run(job("early", "go"), stop)
    assert isinstance(outcome, JobFailed) and outcome.reason == CANCELLED_BEFORE_OUTPUT
    assert not serving.holds("early") and not serving.engine.has_work


async def test_each_steps_text_goes_to_the_step_hook_before_its_job_resolves(serving):
    seen: list[str] = []
    serving.on_step = lambda outputs: seen.extend(o.text_delta for o in outputs)
    outcome = await serving.run(job("hooked", "hello", max_tokens=12))
    assert "".join(seen).startswith(outcome.text) and outcome.text
