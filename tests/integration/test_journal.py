"""The journal on real Postgres: bookings, credits and top-ups post balanced entries exactly
once, whatever the order and however often events come, and the database itself refuses an
unbalanced posting and any change to a posted one."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from tokenmill.events import (
    EnergyReading,
    JobCompleted,
    PrepaidCreditAdded,
    QualitySignal,
    QualityVerdict,
    UsageBooked,
    new_id,
    parse_event,
)
from tokenmill.ledger import books, journal
from tokenmill.ledger.journal import Leg, Posting, UnbalancedPosting

BOOKED_STREAM = "test.booked"
# Some tests book usage in the future; balances "as of" this include every posting.
END_OF_TIME = datetime(9999, 1, 1, tzinfo=UTC)
SLO = books.SloPolicy({"premium": 100.0, "standard": 0.0}, {"premium": Decimal("0.25")})


def completion(
    customer_id: str,
    *,
    tier: str = "standard",
    prompt_tokens: int = 1000,
    cached: int = 0,
    completion_tokens: int = 500,
    submitted_at: datetime | None = None,
    ttft_ms: float = 50.0,
    request_id: str | None = None,
) -> JobCompleted:
    submitted = submitted_at or datetime.now(UTC) - timedelta(minutes=1)
    return JobCompleted(
        producer="test",
        customer_id=customer_id,
        request_id=request_id or new_id(),
        region="eu-west",
        tier=tier,
        submitted_at=submitted,
        occurred_at=submitted + timedelta(seconds=1),
        worker="w",
        model="smollm2",
        device="cpu",
        max_tokens=completion_tokens,
        text="fine",
        finish_reason="stop",
        prompt_tokens=prompt_tokens,
        cached_prompt_tokens=cached,
        completion_tokens=completion_tokens,
        queue_ms=1.0,
        ttft_ms=ttft_ms,
        generation_ms=10.0,
        e2e_ms=20.0,
        compute_s=Decimal("3.6"),
        energy=EnergyReading(energy_j=Decimal("360"), meter="scripted", estimated=True),
    )


def verdict(done: JobCompleted, outcome: str = "defective") -> QualityVerdict:
    return QualityVerdict(
        **done.envelope_for("inspector"),
        completion_event_id=done.event_id,
        verdict=outcome,
        signals=(
            QualitySignal(name="empty", severity="defect" if outcome == "defective" else "ok"),
        ),
    )


async def book(pool: asyncpg.Pool, *events: JobCompleted) -> list[books.Booking]:
    async with pool.acquire() as conn, conn.transaction():
        return await books.book_completions(
            conn, [books.Logged(e, "test.completions") for e in events], BOOKED_STREAM, SLO
        )


async def judge(pool: asyncpg.Pool, event: QualityVerdict) -> None:
    async with pool.acquire() as conn, conn.transaction():
        if await books.append_event(conn, event, "test.quality"):
            await books.record_verdicts(conn, [event])


async def top_up(pool: asyncpg.Pool, event: PrepaidCreditAdded) -> None:
    async with pool.acquire() as conn, conn.transaction():
        if await books.append_event(conn, event, "test.billing"):
            await books.record_prepaid(conn, event)


def prepaid_added(customer_id: str, amount: str) -> PrepaidCreditAdded:
    return PrepaidCreditAdded(
        producer="test", customer_id=customer_id, request_id="", region="eu-west",
        amount=Decimal(amount), currency="USD", reference="test",
    )  # fmt: skip


async def assert_books_hold(conn: asyncpg.Connection) -> None:
    """Every posting balances per currency; every account's balance is the sum of its legs;
    each customer's prepaid position is its prepaid account's balance."""
    unbalanced = await conn.fetch(
        "SELECT posting_id, currency FROM ledger.posting_legs GROUP BY posting_id, currency "
        "HAVING sum(amount) <> 0"
    )
    assert unbalanced == []
    sums = {
        r["account_id"]: r["total"]
        for r in await conn.fetch(
            "SELECT account_id, sum(amount) AS total FROM ledger.posting_legs GROUP BY account_id"
        )
    }
    for account_id, total in sums.items():
        assert await journal.balance(conn, account_id, END_OF_TIME) == total
    # Usage is posted in summary; the sub-ledger (request_usage) backs every summary exactly:
    # each customer's legs in a posting are its requests' revenue there, the revenue legs
    # their revenue, the expense legs their cost, and every usage posting covers a request.
    mismatched = await conn.fetch(
        "SELECT u.posting_id, u.customer_id FROM ledger.request_usage u "
        "WHERE u.posting_id IS NOT NULL GROUP BY u.posting_id, u.customer_id "
        "HAVING sum(u.revenue) <> (SELECT coalesce(sum(l.amount), 0) FROM ledger.posting_legs l "
        "WHERE l.posting_id = u.posting_id AND l.account_id IN ('customer:' || u.customer_id "
        "|| ':receivable', 'customer:' || u.customer_id || ':prepaid'))"
    )
    assert mismatched == []
    mismatched = await conn.fetch(
        "SELECT posting_id FROM (SELECT posting_id, sum(revenue) AS revenue, sum(cost) AS cost "
        "FROM ledger.request_usage WHERE posting_id IS NOT NULL GROUP BY posting_id) u "
        "JOIN (SELECT posting_id, "
        "coalesce(sum(amount) FILTER (WHERE account_id LIKE 'revenue:%'), 0) AS revenue, "
        "coalesce(sum(amount) FILTER (WHERE account_id LIKE 'expense:%'), 0) AS cost "
        "FROM ledger.posting_legs GROUP BY posting_id) l USING (posting_id) "
        "WHERE u.revenue <> -l.revenue OR u.cost <> l.cost"
    )
    assert mismatched == []
    uncovered = await conn.fetch(
        "SELECT p.posting_id FROM ledger.postings p WHERE p.kind = 'usage' AND NOT EXISTS "
        "(SELECT 1 FROM ledger.request_usage u WHERE u.posting_id = p.posting_id)"
    )
    assert uncovered == []
    positions = await conn.fetch("SELECT * FROM ledger.prepaid_positions")
    for p in positions:
        held = -await journal.balance(conn, journal.prepaid(p["customer_id"]), END_OF_TIME)
        assert held == p["available"], p


async def customer_rows(conn: asyncpg.Connection, customer_id: str, table: str) -> int:
    return await conn.fetchval(
        f"SELECT count(*) FROM ledger.{table} WHERE customer_id = $1", customer_id
    )


async def test_booking_posts_revenue_by_class_and_cost_once(pool: asyncpg.Pool):
    customer = f"cus_{new_id()}"
    done = completion(customer, prompt_tokens=1000, cached=400, completion_tokens=500)
    (booking,) = await book(pool, done, done)  # The same entry twice in one batch.
    assert await book(pool, done) == []  # ...and redelivered later.
    # 600 input x 0.50 + 400 cached x 0.25 + 500 output x 1.50, per million.
    assert booking.revenue == Decimal("0.00115")
    async with pool.acquire() as conn:
        usage = await conn.fetchrow(
            "SELECT * FROM ledger.request_usage WHERE request_id = $1", done.request_id
        )
        assert usage["revenue_input"] == Decimal("0.0003")
        assert usage["revenue_cached_input"] == Decimal("0.0001")
        assert usage["charged_cached_input_tokens"] == 400
        assert (usage["plan_id"], usage["plan_version"]) == ("tier:standard", "2026-01")
        assert await journal.balance(conn, journal.receivable(customer)) == booking.revenue
        # One summary posting, naming this completion, which the sub-ledger row names back.
        covered = await conn.fetch(
            "SELECT e.event_id FROM ledger.posting_events e WHERE e.posting_id = $1",
            usage["posting_id"],
        )
        assert [c["event_id"] for c in covered] == [done.event_id]
        (queued,) = await conn.fetch(
            "SELECT body FROM ledger.outbox WHERE body::jsonb ->> 'request_id' = $1",
            done.request_id,
        )
        # Serialized without the model, yet exactly the event's canonical JSON.
        booked = parse_event(queued["body"])
        assert isinstance(booked, UsageBooked) and booked.revenue == booking.revenue
        expected = booking.booked_event(booked.event_id, booked.occurred_at)
        assert queued["body"] == booked.canonical_json() == expected.canonical_json()
        await assert_books_hold(conn)


async def test_verdict_before_its_completion_credits_once(pool: asyncpg.Pool):
    customer = f"cus_{new_id()}"
    done = completion(customer)
    bad = verdict(done)
    await judge(pool, bad)  # Arrives first: nothing booked to credit yet.
    await judge(pool, bad)
    (booking,) = await book(pool, done)
    await book(pool, done)
    await judge(pool, bad)
    async with pool.acquire() as conn:
        (credit,) = await conn.fetch(
            "SELECT * FROM ledger.credits WHERE customer_id = $1", customer
        )
        assert (credit["reason"], credit["amount"]) == ("defective", booking.revenue)
        assert await journal.balance(conn, journal.receivable(customer)) == 0
        assert await journal.balance(conn, "credits:defective") >= booking.revenue
        await assert_books_hold(conn)


async def test_verdict_after_its_completion_credits_what_is_left_once(pool: asyncpg.Pool):
    customer = f"cus_{new_id()}"
    slow = completion(customer, tier="premium", ttft_ms=500.0)
    (booking,) = await book(pool, slow)
    await judge(pool, verdict(slow))
    await judge(pool, verdict(slow))  # A second verdict event (new id) on the same completion.
    async with pool.acquire() as conn:
        credits = await conn.fetch(
            "SELECT reason, amount FROM ledger.credits WHERE customer_id = $1 ORDER BY reason",
            customer,
        )
        share = booking.revenue * Decimal("0.25")
        assert [(c["reason"], c["amount"]) for c in credits] == [
            ("defective", booking.revenue - share),
            ("slo_ttft", share),
        ]
        assert await journal.balance(conn, journal.receivable(customer)) == 0
        await assert_books_hold(conn)


async def test_verdicts_recorded_as_one_set_keep_their_signals_and_credit_once(
    pool: asyncpg.Pool,
):
    """Several verdicts in one call (as a replay records them): each keeps all its signals,
    and two defective verdicts on one booked completion credit it once, in one posting."""
    customer = f"cus_{new_id()}"
    done = [completion(customer), completion(customer)]
    bookings = await book(pool, *done)
    signals = (
        QualitySignal(name="empty", severity="defect", detail="no text"),
        QualitySignal(name="length", severity="ok"),
    )
    judged = [
        QualityVerdict(
            **d.envelope_for("inspector"),
            completion_event_id=d.event_id,
            verdict="defective",
            signals=signals,
        )  # fmt: skip
        for d in (done[0], done[0], done[1])
    ]
    async with pool.acquire() as conn, conn.transaction():
        await books.append_events(conn, [books.Logged(v, "test.quality") for v in judged])
        await books.record_verdicts(conn, judged)
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT q.event_id, q.request_id, q.signals FROM ledger.quality q "
            "WHERE q.completion_event_id = ANY($1::text[]) ORDER BY q.event_id",
            [d.event_id for d in done],
        )
        assert [(r["event_id"], r["request_id"]) for r in rows] == sorted(
            (v.event_id, v.request_id) for v in (judged[0], judged[2])
        )
        want = [s.model_dump() for s in signals]
        assert all(r["signals"] == want for r in rows), rows
        credits = await conn.fetch(
            "SELECT request_id, amount FROM ledger.credits WHERE customer_id = $1", customer
        )
        assert sorted((c["request_id"], c["amount"]) for c in credits) == sorted(
            (b.event.request_id, b.revenue) for b in bookings
        )
        assert await journal.balance(conn, journal.receivable(customer)) == 0
        await assert_books_hold(conn)


async def test_two_transactions_creating_one_account_at_once_both_commit(pool: asyncpg.Pool):
    """Two ledgers (or two lanes of a replay) post at the same moment to an account neither has
    seen: both commit, rather than one failing on a duplicate account.

    The race is narrow (one commit landing between the other's conflict check and its index
    insert), so it is run many times: with the conflict target on account_id alone, about 1
    round in 100 failed on (account_id, currency)."""

    async def post(account: str) -> None:
        posting = Posting(
            event_id=new_id(), kind="test", description="test", effective_at=datetime.now(UTC),
            legs=journal.legs("USD", (account, Decimal(1)), ("cash", Decimal(-1))),
        )  # fmt: skip
        async with pool.acquire() as conn, conn.transaction():
            await journal.write(conn, [posting])

    accounts = [f"expense:test_{new_id().lower()}" for _ in range(300)]
    for account in accounts:
        await asyncio.gather(post(account), post(account))
    async with pool.acquire() as conn:
        assert {await journal.balance(conn, account) for account in accounts} == {2}


async def test_prepaid_credit_is_drawn_first_then_receivable(pool: asyncpg.Pool):
    customer = f"cus_{new_id()}"
    added = prepaid_added(customer, "0.001")
    await top_up(pool, added)
    await top_up(pool, added)  # Redelivered: posted once.
    (first,) = await book(pool, completion(customer))  # 0.00125: 0.001 prepaid, rest owed.
    async with pool.acquire() as conn:
        assert await journal.balance(conn, journal.prepaid(customer)) == 0
        assert await journal.balance(conn, journal.receivable(customer)) == first.revenue - Decimal(
            "0.001"
        )
        assert await customer_rows(conn, customer, "prepaid_positions") == 1
        await assert_books_hold(conn)


async def test_an_event_twice_in_one_batch_is_logged_and_applied_once(pool: asyncpg.Pool):
    """A relay that crashed after publishing publishes again: both copies can come in one
    batch of the ledger's consumer."""
    customer = f"cus_{new_id()}"
    added = prepaid_added(customer, "0.25")
    done = completion(customer)
    judged = verdict(done)
    twice = [books.Logged(e, "test.stream") for e in (added, judged, added, judged)]
    async with pool.acquire() as conn:
        async with conn.transaction():
            assert await books.apply_events(conn, twice) == {added.event_id, judged.event_id}
        async with conn.transaction():
            assert await books.apply_events(conn, twice) == set()  # The whole batch again.
        assert await journal.balance(conn, journal.prepaid(customer)) == Decimal("-0.25")
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM ledger.events WHERE event_id = ANY($1::text[])",
                [added.event_id, judged.event_id],
            )
            == 2
        )
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM ledger.quality WHERE completion_event_id = $1", done.event_id
            )
            == 1
        )
        await assert_books_hold(conn)


async def test_price_change_mid_period_keeps_the_old_price_for_earlier_usage(pool: asyncpg.Pool):
    customer = f"cus_{new_id()}"
    plan = f"deal-{new_id().lower()}"
    start = datetime(2031, 3, 1, tzinfo=UTC)
    change = datetime(2031, 3, 15, tzinfo=UTC)
    async with pool.acquire() as conn, conn.transaction():
        for effective, version, price in ((start, "v1", 1), (change, "v2", 3)):
            await conn.execute(
                "INSERT INTO ledger.price_plans (plan_id, version, effective_from, currency, "
                "tiers_mode) VALUES ($1, $2, $3, 'USD', 'graduated')",
                plan,
                version,
                effective,
            )
            await conn.execute(
                "INSERT INTO ledger.price_bands SELECT $1, $2, c, 1, NULL, $3 "
                "FROM unnest(ARRAY['input', 'cached_input', 'output']) AS c",
                plan,
                effective,
                price,
            )
        await conn.execute(
            "INSERT INTO ledger.customer_plans VALUES ($1, $2, $3)", customer, start, plan
        )
    before = completion(customer, submitted_at=change - timedelta(days=1))
    after = completion(customer, submitted_at=change + timedelta(days=1))
    # Booked in the other order: the price is the one in force when each was submitted.
    (late,) = await book(pool, after)
    (early,) = await book(pool, before)
    assert (early.plan.version, early.revenue) == ("v1", Decimal("0.0015"))
    assert (late.plan.version, late.revenue) == ("v2", Decimal("0.0045"))


async def test_database_refuses_an_unbalanced_posting_at_commit(pool: asyncpg.Pool):
    with pytest.raises(UnbalancedPosting):
        Posting("e", "usage", "x", datetime.now(UTC), (Leg("cash", Decimal(1), "USD"),))
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute(
            "INSERT INTO ledger.accounts VALUES ('cash', 'asset', 'USD') ON CONFLICT DO NOTHING"
        )
        posting_id = await conn.fetchval(
            "INSERT INTO ledger.postings (event_id, kind, description, effective_at) "
            "VALUES ($1, 'usage', 'one-legged', now()) RETURNING posting_id",
            new_id(),
        )
        await conn.execute(
            "INSERT INTO ledger.posting_legs VALUES ($1, 1, 'cash', 5, 'USD')", posting_id
        )
        # Each statement passes: the check is deferred to the commit, which fails.
        with pytest.raises(asyncpg.CheckViolationError, match="does not balance"):
            await transaction.commit()
        assert not conn.is_in_transaction()  # The failed commit rolled it all back.


async def test_database_checks_every_posting_whatever_order_their_ids_come_in(pool: asyncpg.Pool):
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO ledger.accounts VALUES ('cash', 'asset', 'USD') ON CONFLICT DO NOTHING"
        )
        low, high = await conn.fetchval(
            "SELECT array_agg(nextval(pg_get_serial_sequence('ledger.postings', 'posting_id'))) "
            "FROM generate_series(1, 2)"
        )
        transaction = conn.transaction()
        await transaction.start()
        # The balanced posting first, with the higher id; then an unbalanced one below it.
        for posting_id, amounts in ((high, (5, -5)), (low, (5, -4))):
            await conn.execute(
                "INSERT INTO ledger.postings (posting_id, event_id, kind, description, "
                "effective_at) VALUES ($1, $2, 'usage', 'ordered', now())",
                posting_id,
                new_id(),
            )
            for leg_no, amount in enumerate(amounts, start=1):
                await conn.execute(
                    "INSERT INTO ledger.posting_legs VALUES ($1, $2, 'cash', $3, 'USD')",
                    posting_id,
                    leg_no,
                    amount,
                )
        with pytest.raises(asyncpg.CheckViolationError, match=f"posting {low} does not balance"):
            await transaction.commit()


async def test_database_refuses_changes_to_postings_and_legs(pool: asyncpg.Pool):
    customer = f"cus_{new_id()}"
    await book(pool, completion(customer))
    async with pool.acquire() as conn:
        posting_id = await conn.fetchval(
            "SELECT posting_id FROM ledger.request_usage WHERE customer_id = $1", customer
        )
        statements = [
            "UPDATE ledger.postings SET description = 'edited' WHERE posting_id = $1",
            "DELETE FROM ledger.postings WHERE posting_id = $1",
            "UPDATE ledger.posting_legs SET amount = amount * 2 WHERE posting_id = $1",
            "DELETE FROM ledger.posting_legs WHERE posting_id = $1",
            # A leg added later to a committed posting would unbalance it.
            "INSERT INTO ledger.posting_legs VALUES ($1, 31, 'cash', 1, 'USD')",
        ]
        for statement in statements:
            with pytest.raises(asyncpg.PostgresError, match="append-only|with their posting"):
                await conn.execute(statement, posting_id)
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            await conn.execute("TRUNCATE ledger.posting_legs")


async def test_balance_as_of_a_time(pool: asyncpg.Pool):
    customer = f"cus_{new_id()}"
    day = datetime(2026, 5, 10, tzinfo=UTC)
    await book(pool, completion(customer, submitted_at=day))
    await book(pool, completion(customer, submitted_at=day + timedelta(days=2)))
    async with pool.acquire() as conn:
        account = journal.receivable(customer)
        assert await journal.balance(conn, account, day) == 0
        assert await journal.balance(conn, account, day + timedelta(days=1)) == Decimal("0.00125")
        assert await journal.balance(conn, account) == Decimal("0.0025")
        as_of = await journal.balances(conn, day + timedelta(days=1))
        assert as_of[account] == Decimal("0.00125")


async def test_a_batch_is_posted_in_summary_per_day_with_exact_balances(pool: asyncpg.Pool):
    customers = [f"cus_{new_id()}" for _ in range(3)]
    day = datetime(2026, 7, 1, 22, tzinfo=UTC)
    done = [
        completion(c, submitted_at=day + timedelta(hours=hours))
        for hours in (0, 1, 3)  # The last is completed the next day.
        for c in customers
    ]
    bookings = await book(pool, *done)
    async with pool.acquire() as conn:
        postings = await conn.fetch(
            "SELECT p.posting_id, p.effective_at, count(*) AS covered FROM ledger.postings p "
            "JOIN ledger.posting_events e USING (posting_id) WHERE e.event_id = ANY($1::text[]) "
            "GROUP BY p.posting_id ORDER BY p.effective_at",
            [e.event_id for e in done],
        )
        assert [(p["effective_at"], p["covered"]) for p in postings] == [
            (day + timedelta(hours=1, seconds=1), 6),
            (day + timedelta(hours=3, seconds=1), 3),
        ]
        end_of_day = datetime(2026, 7, 1, 23, 59, 59, tzinfo=UTC)
        for c in customers:
            owed = sum((b.revenue for b in bookings if b.event.customer_id == c), Decimal(0))
            assert await journal.balance(conn, journal.receivable(c), END_OF_TIME) == owed
            assert await journal.balance(conn, journal.receivable(c), end_of_day) == owed * 2 / 3
        await assert_books_hold(conn)


# One step of a history: book a completion (maybe redelivered), a verdict on one, a top-up.
steps = st.lists(
    st.one_of(
        st.tuples(st.just("book"), st.integers(0, 5), st.integers(0, 3000), st.integers(0, 3000)),
        st.tuples(st.just("redeliver"), st.integers(0, 5)),
        st.tuples(st.just("verdict"), st.integers(0, 5), st.sampled_from(["pass", "defective"])),
        st.tuples(st.just("top_up"), st.integers(1, 5000)),
    ),
    min_size=1,
    max_size=12,
)


@hypothesis_settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(history=steps, tier=st.sampled_from(["standard", "premium"]), batch=st.booleans())
async def test_any_history_leaves_balanced_books_and_exact_balances(
    pool: asyncpg.Pool, history, tier, batch
):
    customer = f"cus_{new_id()}"
    completions: list[JobCompleted] = []
    pending: list[JobCompleted] = []
    for step in history:
        if step[0] == "book":
            _, slot, prompt, output = step
            done = completion(
                customer, tier=tier, prompt_tokens=prompt, cached=prompt // 3,
                completion_tokens=output, ttft_ms=float(slot * 40),
            )  # fmt: skip
            completions.append(done)
            pending.append(done)
        elif step[0] == "redeliver" and completions:
            pending.append(completions[step[1] % len(completions)])
        elif step[0] == "verdict" and completions:
            await judge(pool, verdict(completions[step[1] % len(completions)], step[2]))
        elif step[0] == "top_up":
            await top_up(pool, prepaid_added(customer, f"0.{step[1]:06d}"))
        if pending and not batch:
            await book(pool, *pending)
            pending.clear()
    if pending:
        await book(pool, *pending)
    async with pool.acquire() as conn:
        await assert_books_hold(conn)
        booked = await conn.fetch(
            "SELECT request_id, revenue FROM ledger.request_usage WHERE customer_id = $1",
            customer,
        )
        assert len(booked) == len({c.request_id for c in completions})
        # Every booked request is in one summary posting, which names its completion.
        unposted = await conn.fetchval(
            "SELECT count(*) FROM ledger.request_usage u WHERE u.customer_id = $1 AND NOT EXISTS "
            "(SELECT 1 FROM ledger.posting_events e JOIN ledger.postings p USING (posting_id) "
            "WHERE e.event_id = u.completion_event_id AND p.kind = 'usage')",
            customer,
        )
        assert unposted == 0
        # Credits per request never exceed its charge, and each reason is given at most once.
        over = await conn.fetch(
            "SELECT c.request_id FROM ledger.credits c JOIN ledger.request_usage u "
            "USING (request_id) WHERE c.customer_id = $1 GROUP BY c.request_id, u.revenue "
            "HAVING sum(c.amount) > u.revenue",
            customer,
        )
        assert over == []
        # What the customer owes plus holds is revenue less credits less cash paid in.
        revenue = sum((r["revenue"] for r in booked), Decimal(0))
        credited = await conn.fetchval(
            "SELECT coalesce(sum(amount), 0) FROM ledger.credits WHERE customer_id = $1", customer
        )
        paid_in = await conn.fetchval(
            "SELECT coalesce(sum(l.amount), 0) FROM ledger.posting_legs l JOIN ledger.postings p "
            "USING (posting_id) WHERE p.customer_id = $1 AND p.kind = 'prepaid' "
            "AND l.account_id = 'cash'",
            customer,
        )
        owed = await journal.balance(conn, journal.receivable(customer))
        held = await journal.balance(conn, journal.prepaid(customer))
        assert owed + held == revenue - credited - paid_in
