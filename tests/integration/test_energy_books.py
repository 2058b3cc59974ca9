"""Energy in the books on real Postgres: over a period, the requests' energy cost plus the
factory overhead (idle and unbilled joules, with their PUE) is the metered energy x PUE x
tariff, to the cent, under a time-of-use tariff; each request's row carries its price, PUE
and carbon; a redelivered interval books nothing twice."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from tokenmill.events import EnergyInterval, EnergyReading, JobCompleted, new_id
from tokenmill.ledger import books, tariffs
from tokenmill.ledger.prices import PriceError
from tokenmill.ledger.reports import energy_report
from tokenmill.money import JOULES_PER_KWH, quantize_amount

# A tariff version of its own, years ahead, so no other test's bookings fall in its period.
FROM = datetime(2031, 3, 1, tzinfo=UTC)
FLAT, PEAK, PUE, CARBON = Decimal("0.12"), Decimal("0.30"), Decimal("1.3"), Decimal("400")


@pytest.fixture
async def tariff(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        exists = await conn.fetchval(
            "SELECT count(*) FROM ledger.cost_rates WHERE version = 'test-tou'"
        )
        if exists:
            return
        await conn.execute(
            "INSERT INTO ledger.cost_rates (version, device_class, energy_price_per_kwh, pue, "
            "compute_price_per_hour, currency, effective_from, carbon_g_per_kwh) "
            "VALUES ('test-tou', 'cpu', $1, $2, 0.04, 'USD', $3, $4)",
            FLAT,
            PUE,
            FROM,
            CARBON,
        )
        await conn.execute(
            "INSERT INTO ledger.tariff_hours (device_class, effective_from, hour_from, hour_to, "
            "energy_price_per_kwh) VALUES ('cpu', $1, 17, 21, $2)",
            FROM,
            PEAK,
        )


def completion(at: datetime, energy_j: str, worker: str) -> JobCompleted:
    return JobCompleted(
        producer="worker", customer_id=f"cus_{worker}", request_id=new_id(), region="eu-west",
        tier="standard", submitted_at=at, worker=worker, model="smollm2", device="cpu",
        prompt="p", max_tokens=8, text="t", finish_reason="stop", prompt_tokens=7,
        completion_tokens=5, queue_ms=1.0, ttft_ms=2.0, generation_ms=3.0, e2e_ms=4.0,
        compute_s=Decimal("0.5"), occurred_at=at + timedelta(seconds=2),
        energy=EnergyReading(energy_j=Decimal(energy_j), meter="modelled-cpu", estimated=True),
    )  # fmt: skip


def interval(start: datetime, worker: str, attributed: str, idle: str, unbilled: str):
    a, i = Decimal(attributed), Decimal(idle)
    return EnergyInterval(
        producer="worker", customer_id="", request_id="", region="eu-west", worker=worker,
        meter="modelled-cpu", device="cpu", estimated=True, interval_start=start,
        interval_end=start + timedelta(seconds=10), metered_j=a + i, attributed_j=a,
        idle_j=i, unbilled_j=Decimal(unbilled), tokens=36, steps=9,
    )  # fmt: skip


async def deliver(pool: asyncpg.Pool, event: EnergyInterval) -> None:
    """As the ledger applies an event from the power stream: logged once, booked once."""
    async with pool.acquire() as conn, conn.transaction():
        if await books.append_event(conn, event, "test.power"):
            await books.record_energy(conn, [event])


@pytest.mark.parametrize("together", [False, True])
async def test_a_periods_energy_cost_is_metered_energy_times_pue_times_tariff(
    pool, tariff, together: bool
):
    """Intervals delivered one at a time (the ledger's consumer) or recorded as one set (a
    replay) book the same."""
    worker = new_id()[-8:].lower()
    noon, evening = datetime(2031, 3, 2, 12, tzinfo=UTC), datetime(2031, 3, 2, 18, tzinfo=UTC)
    completions = [
        completion(noon, "333.123457", worker),
        completion(noon + timedelta(seconds=1), "517.000001", worker),
        completion(evening, "1201.987654", worker),
    ]
    intervals = [
        # Attributed = its completions' joules + what reached none (unbilled).
        interval(noon, worker, "900.123458", "77.777777", "50.000000"),
        interval(evening, worker, "1300.000000", "12.345678", "98.012346"),
    ]
    async with pool.acquire() as conn, conn.transaction():
        logged = [books.Logged(c, "test.completions") for c in completions]
        await books.book_completions(conn, logged, "test.booked")
    if together:
        async with pool.acquire() as conn, conn.transaction():
            await books.append_events(conn, [books.Logged(i, "test.power") for i in intervals])
            await books.record_energy(conn, intervals)
    for event in intervals:
        await deliver(pool, event)
        await deliver(pool, event)  # Redelivered: nothing booked twice.

    expected = sum(
        i.metered_j / JOULES_PER_KWH * PUE * price
        for i, price in zip(intervals, (FLAT, PEAK), strict=True)
    )
    async with pool.acquire() as conn:
        booked = await conn.fetchval(
            "SELECT sum(l.amount) FROM ledger.posting_legs l JOIN ledger.postings p "
            "USING (posting_id) WHERE l.account_id LIKE 'expense:%' "
            "AND l.account_id <> 'expense:compute' AND p.effective_at >= $1 "
            "AND p.effective_at < $2 AND (p.event_id = ANY($3::text[]) OR p.event_id = ANY($4))",
            noon,
            noon + timedelta(days=1),
            [i.event_id for i in intervals],
            [c.event_id for c in completions],
        )
        overhead = await conn.fetch(
            "SELECT idle_j, unbilled_j, energy_price_per_kwh, posting_id "
            "FROM ledger.energy_intervals WHERE worker = $1 ORDER BY interval_start",
            worker,
        )
        rows = await conn.fetch(
            "SELECT energy_j, energy_price_per_kwh, pue, carbon_g FROM ledger.request_usage "
            "WHERE request_id = ANY($1::text[]) ORDER BY submitted_at",
            [c.request_id for c in completions],
        )
    assert booked.quantize(Decimal("0.01")) == expected.quantize(Decimal("0.01"))
    assert abs(booked - expected) < Decimal("1e-9")
    assert [r["energy_price_per_kwh"] for r in overhead] == [FLAT, PEAK]
    assert all(r["posting_id"] is not None for r in overhead) and len(overhead) == 2
    assert [r["energy_price_per_kwh"] for r in rows] == [FLAT, FLAT, PEAK]
    assert all(r["pue"] == PUE for r in rows)
    assert rows[2]["carbon_g"] == quantize_amount(
        rows[2]["energy_j"] / JOULES_PER_KWH * PUE * CARBON
    )


async def test_the_energy_report_shows_metered_attributed_idle_and_j_per_token(pool, tariff):
    worker = new_id()[-8:].lower()
    at = datetime(2031, 4, 5, 9, tzinfo=UTC)
    await deliver(pool, interval(at, worker, "100", "20", "0"))
    async with pool.acquire() as conn, conn.transaction():
        logged = [books.Logged(completion(at, "100", worker), "test.completions")]
        await books.book_completions(conn, logged, "test.booked")
    async with pool.acquire() as conn:
        report = await energy_report(conn, at.date(), (at + timedelta(days=1)).date())
    assert report.metered_j == 120 and report.attributed_j == 100 and report.idle_j == 20
    (row,) = report.rows
    assert (row.model, row.tier, row.tokens) == ("smollm2", "standard", 12)
    assert row.joules_per_token == Decimal(100) / 12


async def test_an_interval_whose_joules_do_not_add_up_is_refused(pool, tariff):
    bad = interval(datetime(2031, 3, 3, tzinfo=UTC), "w", "10", "1", "0")
    bad = bad.model_copy(update={"metered_j": Decimal("12")})
    async with pool.acquire() as conn, conn.transaction():
        with pytest.raises(ValueError, match="metered_j 12 is not attributed_j 10"):
            await books.record_energy(conn, [bad])


def tariff_args(**overrides: str | None) -> argparse.Namespace:
    fields = {
        "device_class": "cuda", "version": "test-set", "effective": "2032-01-01T00:00:00Z",
        "energy_price": "0.10", "pue": "1.25", "compute_price": "2.00", "carbon": "300",
        "hours": "17-21:0.25,0-6:0.06", "currency": "USD",
    }  # fmt: skip
    return argparse.Namespace(**{**fields, **overrides})


async def test_an_operator_sets_a_tariff_with_hours_and_the_books_use_it(pool):
    tariff = tariffs.tariff_from_args(tariff_args())
    async with pool.acquire() as conn:
        await tariffs.add_tariff(conn, tariff)
        with pytest.raises(PriceError, match="already has a tariff"):
            await tariffs.add_tariff(conn, tariff)
        listed = {(t.device_class, t.effective_from): t for t in await tariffs.list_tariffs(conn)}
        book = await books.CostRateBook.read(conn)
    assert listed[("cuda", tariff.effective_from)] == tariff
    evening = tariff.effective_from.replace(hour=18)
    assert book.at("cuda:0", evening).energy_price_per_kwh == Decimal("0.25")
    assert book.at("cuda:0", evening.replace(hour=12)).energy_price_per_kwh == Decimal("0.10")
    assert book.at("cuda:0", evening).carbon_g_per_kwh == 300


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hours": "17-21:0.25,20-22:0.30"}, "17-21 and 20-22 overlap"),
        ({"hours": "21-17:0.25"}, "is not FROM-TO:PRICE"),
        ({"pue": "0.9"}, "--pue: '0.9' is below 1"),
        ({"energy_price": "-1"}, "--energy-price: '-1' is negative"),
        ({"carbon": "lots"}, "--carbon: 'lots' is not a decimal number"),
        ({"effective": "2032-01-01"}, "needs a time zone"),
    ],
)
def test_a_bad_tariff_is_refused_naming_the_flag(overrides, message):
    with pytest.raises(PriceError, match=message):
        tariffs.tariff_from_args(tariff_args(**overrides))


async def test_a_tariff_in_the_past_is_refused_and_nothing_is_written(pool):
    past = tariffs.tariff_from_args(tariff_args(effective="2020-01-01T00:00:00Z"))
    async with pool.acquire() as conn:
        with pytest.raises(PriceError, match="in the past"):
            await tariffs.add_tariff(conn, past)
        assert not await conn.fetchval(
            "SELECT count(*) FROM ledger.cost_rates WHERE effective_from = $1", past.effective_from
        )


async def test_an_interval_that_only_cancels_earlier_work_is_booked_whole(pool, tariff):
    # Nothing ran in it, but a request attributed joules earlier was cancelled in it.
    event = interval(datetime(2031, 3, 4, tzinfo=UTC), new_id()[-8:].lower(), "0", "5", "3")
    await deliver(pool, event)
    async with pool.acquire() as conn:
        cost = await conn.fetchval(
            "SELECT overhead_cost FROM ledger.energy_intervals WHERE event_id = $1",
            event.event_id,
        )
    assert cost == quantize_amount(Decimal(8) / JOULES_PER_KWH * PUE * FLAT)
