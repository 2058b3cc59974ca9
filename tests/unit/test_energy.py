"""The energy account under a real batched workload: every joule the meter counted is either a
completion's or idle, within 0.5 % (the shares are exact decimals, so in fact exactly)."""

from __future__ import annotations

import asyncio
import itertools
from decimal import Decimal

import pytest

from tests.integration.helpers import eventually
from tests.unit.test_engine import engine, tiny
from tests.unit.test_serving import job
from tokenmill.events import JobCompleted, parse_event
from tokenmill.meters import ScriptedMeter
from tokenmill.money import joules_per_token
from tokenmill.worker.energy import EnergyAccount
from tokenmill.worker.serving import EngineFailed, EngineService

# A recorded-looking trace: a 40 W floor with bursts to 180 W, repeating every 0.3 s.
TRACE = [(i * 0.1, w) for i, w in enumerate(itertools.islice(itertools.cycle([40, 180, 95]), 600))]


@pytest.fixture
def serving():
    service = EngineService(
        engine(tiny(), running_max=4, waiting_max=8), ScriptedMeter(TRACE), "w1"
    )
    yield service
    service.close()


async def test_attributed_and_idle_joules_add_up_to_the_metered_under_batching(serving):
    serving.energy.close_interval()  # Start a closed interval from here.
    metered_from_j = serving.meter.energy_j()
    outcomes = []
    for wave in range(3):  # Waves of concurrent requests, with idle gaps between them.
        jobs = [job(f"w{wave}r{i}", "tell me " * (i + 1), max_tokens=4 + 3 * i) for i in range(6)]
        outcomes += await asyncio.gather(*(serving.run(j) for j in jobs))
        await asyncio.sleep(0.05)
    interval = serving.energy.close_interval()
    metered_j = serving.meter.energy_j() - metered_from_j
    assert all(isinstance(o, JobCompleted) for o in outcomes)
    for o in outcomes:  # Each completion carries its joules per token and how they were metered.
        tokens = o.prompt_tokens + o.completion_tokens
        assert o.energy.joules_per_token == joules_per_token(o.energy.energy_j, tokens) > 0
        assert (o.energy.meter, o.energy.estimated) == ("scripted", True)
    t = interval.totals
    completions_j = sum(o.energy.energy_j for o in outcomes)
    assert t.idle_j > 0 and t.steps > 0 and t.unbilled_j == 0
    assert t.metered_j == t.attributed_j + t.idle_j
    assert abs(completions_j - t.attributed_j) < Decimal("1e-15")  # Decimal's 28 digits.
    error = abs(completions_j + t.idle_j - metered_j) / metered_j
    assert error <= Decimal("0.005"), error
    # Each step processed the uncached prompt and every output token but the last (sampled,
    # never fed back).
    processed = (
        o.prompt_tokens - o.cached_prompt_tokens + o.completion_tokens - 1 for o in outcomes
    )
    assert t.tokens == sum(processed)


async def test_a_cancelled_request_energy_is_counted_unbilled(serving, monkeypatch):
    monkeypatch.setattr(serving.engine.runner, "eos_token_ids", frozenset())
    serving.energy.close_interval()
    long = asyncio.ensure_future(serving.run(job("long", "go", max_tokens=200)))
    done = await serving.run(job("short", "hi", max_tokens=5))
    steps = serving.energy.totals().steps

    async def long_ran_alone() -> bool:  # So it has joules of its own to lose.
        return serving.energy.totals().steps > steps + 2

    await eventually(long_ran_alone)
    long.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long
    await serving.run(job("after", "next", max_tokens=2))  # The cancel is applied by now.
    t = serving.energy.close_interval().totals
    assert t.unbilled_j > 0
    assert t.metered_j == t.attributed_j + t.idle_j
    assert isinstance(done, JobCompleted)


def test_an_interval_closed_while_idle_is_all_idle_and_its_event_round_trips():
    clock = itertools.count(0, 2).__next__  # Two seconds per reading.
    account = EnergyAccount(ScriptedMeter([(0.0, 5.0)], clock=clock, device="cuda:0"))
    first = account.close_interval()
    second = account.close_interval()
    assert first.totals.idle_j == first.totals.metered_j == 10
    merged = first.merged(second)
    assert merged.totals.metered_j == 20 and merged.start == first.start
    event = merged.event(account.meter, "w1", "eu-west")
    assert parse_event(event.canonical_json()) == event
    assert event.device == "cuda:0" and event.meter == "scripted" and event.idle_j == 20


async def test_a_failed_step_and_its_given_back_jobs_energy_is_counted_unbilled(
    serving, monkeypatch
):
    monkeypatch.setattr(serving.engine.runner, "eos_token_ids", frozenset())
    serving.energy.close_interval()
    running = asyncio.ensure_future(serving.run(job("doomed", "go", max_tokens=200)))

    async def ran_a_while() -> bool:
        return serving.energy.totals().steps > 3

    await eventually(ran_a_while)
    step = serving.engine.step

    def broken():
        raise RuntimeError("a bug in a step")

    monkeypatch.setattr(serving.engine, "step", broken)
    with pytest.raises(EngineFailed):
        await running
    monkeypatch.setattr(serving.engine, "step", step)
    t = serving.energy.close_interval().totals
    assert t.metered_j == t.attributed_j + t.idle_j
    # Everything the steps used went to the job given back, and none of it was billed.
    assert t.unbilled_j == t.attributed_j > 0
