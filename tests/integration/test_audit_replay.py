"""`tokenmill audit replay` on real Postgres and Redis: a mixed month rebuilt from the log equals
the live books and re-issues its invoices exactly; a book row altered by a superuser is the one
difference found; the streams' copy of the log agrees with it, or is reported where it does not.

Each test has a database of its own: a replay folds the whole log, so it must not share one."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from faststream.redis import BinaryMessageFormatV1
from redis.asyncio import Redis as RedisClient

from tests.integration.audit_helpers import audit_db, tamper, template_db
from tests.integration.test_audit_export import ROOT
from tests.integration.test_journal import completion, prepaid_added, verdict
from tokenmill.db import create_pool
from tokenmill.events import Event, new_id
from tokenmill.ledger import books, invoices, replay
from tokenmill.ledger.billing import Period
from tokenmill.settings import Settings
from tokenmill.signing import KEY_FILE_NAME, SIGNATURE_HEADER, SigningKeys
from tokenmill.streams import Streams

__all__ = ["audit_db", "template_db"]  # Fixtures, used by name.

OCTOBER = Period.parse("2026-10")
WINDOW = replay.Window(OCTOBER.start_at, OCTOBER.end_at)
PRICE_CHANGE = datetime(2026, 10, 15, tzinfo=UTC)


@pytest.fixture
def live(settings: Settings, audit_db: str) -> Settings:
    """The test's settings on its own database, with a TTFT objective for premium."""
    prefix = f"{settings.stream_prefix}.{new_id().lower()[-8:]}"
    return dataclasses.replace(
        settings,
        database_url=audit_db,
        stream_prefix=prefix,
        slo_ttft_ms_premium=100.0,
        slo_ttft_credit_share_premium="0.25",
    )


@pytest.fixture
async def audit_pool(live: Settings) -> AsyncIterator[asyncpg.Pool]:
    """The live books' pool, reading and writing JSON as the ledger's does."""
    pool = await create_pool(live)
    yield pool
    await pool.close()


def at(day: int, hour: int = 12) -> datetime:
    return datetime(2026, 10, day, hour, tzinfo=UTC)


async def negotiated_plan(conn: asyncpg.Connection, customer: str) -> None:
    """A graduated plan for `customer` whose price triples mid-October."""
    plan = f"deal-{new_id().lower()}"
    for effective, version, price in ((OCTOBER.start_at, "v1", 1), (PRICE_CHANGE, "v2", 3)):
        await conn.execute(
            "INSERT INTO ledger.price_plans (plan_id, version, effective_from, currency, "
            "tiers_mode) VALUES ($1, $2, $3, 'USD', 'graduated')",
            plan,
            version,
            effective,
        )
        await conn.execute(
            "INSERT INTO ledger.price_bands SELECT $1::text, $2::timestamptz, c, 1, 5000, "
            "$3::numeric FROM unnest(ARRAY['input', 'cached_input', 'output']) AS c UNION ALL "
            "SELECT $1, $2, c, 2, NULL, round($3 / 2.0, 2) FROM "
            "unnest(ARRAY['input', 'cached_input', 'output']) AS c",
            plan,
            effective,
            price,
        )
    await conn.execute(
        "INSERT INTO ledger.customer_plans VALUES ($1, $2, $3)", customer, OCTOBER.start_at, plan
    )


class Ledger:
    """Applies events to the live books the way the ledger's consumers do."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool, self.settings = pool, settings
        self.streams = Streams(settings.stream_prefix)
        self.slo = books.SloPolicy.from_settings(settings)

    async def start(self, slo: books.SloPolicy | None = None) -> None:
        """Log the SLO policy it books under from now on (the settings' unless given), as the
        ledger does as it starts."""
        self.slo = slo or books.SloPolicy.from_settings(self.settings)
        async with self.pool.acquire() as conn:
            await books.log_slo_policy(conn, self.slo, self.streams.ledger, self.settings.region)

    async def completions(self, *events: Event) -> None:
        logged = [books.Logged(e, self.streams.completions) for e in events]
        async with self.pool.acquire() as conn, conn.transaction():
            await books.apply_completions(conn, logged, self.streams.booked, self.slo)

    async def other(self, event: Event, stream: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await books.apply_event(conn, books.Logged(event, stream))


async def mixed_month(pool: asyncpg.Pool, settings: Settings) -> dict[str, list[Event]]:
    """Several customers and tiers, a price change mid-period, prepaid and SLO and defective
    credits, re-run completions, a finalized invoice, a credit note and a supplement.
    Returns the events by the stream they travel on."""
    ledger = Ledger(pool, settings)
    await ledger.start()
    standard, premium, negotiated, prepaid = (f"cus_{new_id()}" for _ in range(4))
    async with pool.acquire() as conn, conn.transaction():
        await negotiated_plan(conn, negotiated)
    top_up = prepaid_added(prepaid, "0.05")
    top_up = top_up.model_copy(update={"occurred_at": at(1, 1)})
    await ledger.other(top_up, ledger.streams.billing)
    sent: dict[str, list[Event]] = {ledger.streams.completions: [], ledger.streams.quality: []}
    sent[ledger.streams.billing] = [top_up]
    done = []
    for day in range(2, 29, 2):
        batch = [
            completion(standard, submitted_at=at(day)),
            completion(premium, tier="premium", ttft_ms=50.0 + 30 * day, submitted_at=at(day)),
            completion(negotiated, prompt_tokens=1500, cached=500, submitted_at=at(day, 9)),
            completion(prepaid, tier="free" if day % 4 else "standard", submitted_at=at(day)),
        ]
        if day == 10:  # A worker re-ran a job: a second completion of the same request.
            batch.append(batch[0].model_copy(update={"event_id": new_id(), "text": "again"}))
        await ledger.completions(*batch)
        sent[ledger.streams.completions] += batch
        done += batch
    # Verdicts: one before its completion is booked, one after.
    early = completion(standard, submitted_at=at(29))
    judged_first = verdict(early)
    await ledger.other(judged_first, ledger.streams.quality)
    await ledger.completions(early)
    judged_after = verdict(done[4])
    await ledger.other(judged_after, ledger.streams.quality)
    sent[ledger.streams.quality] += [judged_first, judged_after]
    sent[ledger.streams.completions].append(early)
    async with pool.acquire() as conn:
        issued = await invoices.issue_period(
            conn, OCTOBER, now=datetime.now(UTC), grace_s=0, batch_size=2
        )
    assert len(issued.finalized) == 4, issued
    # After the invoices: a late defective verdict (a credit note) and a late booking of
    # October (a supplementary invoice).
    late_verdict = verdict(done[8])
    await ledger.other(late_verdict, ledger.streams.quality)
    late = completion(premium, tier="premium", submitted_at=at(30))
    await ledger.completions(late)
    sent[ledger.streams.quality].append(late_verdict)
    sent[ledger.streams.completions].append(late)
    async with pool.acquire() as conn:
        again = await invoices.issue_period(
            conn, OCTOBER, now=datetime.now(UTC), grace_s=0, batch_size=10
        )
    assert len(again.credit_notes) == 1 and len(again.supplementary) == 1, again
    return sent


@pytest.mark.parametrize("lanes", [1, 3])
async def test_a_mixed_month_replays_to_the_same_books_and_invoices(
    live: Settings, audit_pool: asyncpg.Pool, lanes: int
) -> None:
    """In one lane (this process) and in three (processes, customers split among them)."""
    await mixed_month(audit_pool, live)
    report = await replay.replay(live, WINDOW, lanes=lanes)
    assert report.ok, report.text()
    assert report.counts["requests"] == {"live": 58, "rebuilt": 58}
    assert report.counts["invoice"] == {"live": 5, "rebuilt": 5}
    assert report.counts["credit note"] == {"live": 1, "rebuilt": 1}
    assert report.counts["credits"]["live"] >= 3
    assert report.events["job.completed"] == 59  # The re-run's completion is logged, not billed.
    assert any(k.startswith("balance customer:") for k in report.totals)
    assert all(pair["live"] == pair["rebuilt"] for pair in report.totals.values())
    scratch_left = await audit_pool.fetchval(
        "SELECT count(*) FROM pg_database WHERE datname = $1", report.scratch
    )
    assert scratch_left == 0, "the scratch database is dropped after the run"


async def test_a_reissued_invoice_is_the_same_document(
    live: Settings, audit_pool: asyncpg.Pool
) -> None:
    """Re-issued from the log, each invoice has the same number, lines, totals and rounding."""
    await mixed_month(audit_pool, live)
    report = await replay.replay(live, WINDOW, keep=True)
    rebuilt_url = replay.scratch_url(live.database_url, report.scratch)
    query = (
        "SELECT i.number, i.total, i.subtotal, i.credits_total, l.line_no, l.kind, "
        "l.token_class, l.reason, l.amount_exact, l.amount FROM ledger.invoices i "
        "JOIN ledger.invoice_lines l USING (invoice_id) ORDER BY i.number, l.line_no"
    )
    rebuilt = await asyncpg.connect(rebuilt_url)
    try:
        assert [tuple(r) for r in await rebuilt.fetch(query)] == [
            tuple(r) for r in await audit_pool.fetch(query)
        ]
        # The scratch books skip the write-ahead log; the live ones never do.
        persistence = (
            "SELECT DISTINCT relpersistence::text FROM pg_class "
            "WHERE relnamespace = 'ledger'::regnamespace AND relkind = 'r'"
        )
        assert [r[0] for r in await rebuilt.fetch(persistence)] == ["u"]
        assert [r[0] for r in await audit_pool.fetch(persistence)] == ["p"]
    finally:
        await rebuilt.close()
        await audit_pool.execute(f'DROP DATABASE "{report.scratch}" WITH (FORCE)')


async def test_a_tampered_book_row_is_the_one_difference(
    live: Settings, audit_pool: asyncpg.Pool
) -> None:
    await mixed_month(audit_pool, live)
    leg = await audit_pool.fetchrow(
        "SELECT l.posting_id, l.leg_no, l.account_id, l.amount, p.effective_at "
        "FROM ledger.posting_legs l JOIN ledger.postings p USING (posting_id) "
        "WHERE l.account_id LIKE 'revenue:premium:%' AND p.kind = 'usage' "
        "ORDER BY p.effective_at LIMIT 1"
    )
    async with audit_pool.acquire() as conn:
        await conn.execute("ALTER TABLE ledger.posting_legs DISABLE TRIGGER USER")
        try:
            await conn.execute(
                "UPDATE ledger.posting_legs SET amount = amount - 1 "
                "WHERE posting_id = $1 AND leg_no = $2",
                leg["posting_id"],
                leg["leg_no"],
            )
        finally:
            await conn.execute("ALTER TABLE ledger.posting_legs ENABLE TRIGGER USER")
        await tamper(
            conn,
            "ledger.request_usage",
            "UPDATE ledger.request_usage SET energy_j = energy_j + 1 WHERE request_id = "
            "(SELECT min(request_id) FROM ledger.request_usage)",
        )
    tampered = await audit_pool.fetchval("SELECT min(request_id) FROM ledger.request_usage")
    report = await replay.replay(live, WINDOW)
    day = leg["effective_at"].astimezone(UTC).date().isoformat()
    request_line, balance_line = report.differences
    assert request_line == f"request {tampered}: energy_j live 361, rebuilt 360"
    assert balance_line == (
        f"balance {leg['account_id']} USD {day}: amount live {leg['amount'] - 1}, "
        f"rebuilt {leg['amount']}"
    )
    assert not report.ok


async def test_each_completion_is_credited_under_the_slo_policy_logged_before_it(
    live: Settings, audit_pool: asyncpg.Pool
) -> None:
    """The ledger restarted mid-month with another latency objective; the replay runs with a
    third (none at all) and still rebuilds the credits given live under the first two."""
    ledger = Ledger(audit_pool, live)
    await ledger.start()  # Premium: 100 ms, a quarter of the charge.
    customers = [f"cus_{new_id()}" for _ in range(4)]
    slow = [completion(c, tier="premium", ttft_ms=150.0, submitted_at=at(3)) for c in customers]
    await ledger.completions(*slow)
    await ledger.start(books.SloPolicy({"premium": 200.0}, {"premium": Decimal("0.5")}))
    later = [completion(c, tier="premium", ttft_ms=150.0, submitted_at=at(5)) for c in customers]
    slower = [completion(c, tier="premium", ttft_ms=250.0, submitted_at=at(7)) for c in customers]
    await ledger.completions(*later, *slower)
    await ledger.start()  # Back to the first: logged again, as it is not the last one logged.
    again = [completion(c, tier="premium", ttft_ms=150.0, submitted_at=at(9)) for c in customers]
    await ledger.completions(*again)
    async with audit_pool.acquire() as conn:
        assert not await books.log_slo_policy(conn, ledger.slo, ledger.streams.ledger, "eu-west")
        shares = await conn.fetchval(
            "SELECT array_agg(DISTINCT round(c.amount / u.revenue, 2)) "
            "FROM ledger.credits c JOIN ledger.request_usage u USING (request_id)"
        )
    assert shares == [Decimal("0.25"), Decimal("0.50")], "both policies gave credits"
    without_objectives = dataclasses.replace(live, slo_ttft_ms_premium=0.0)
    for lanes in (1, 3):
        report = await replay.replay(without_objectives, WINDOW, lanes=lanes)
        assert report.ok, report.text()
        assert report.events["ledger.slo_policy"] == 3
        assert report.counts["credits"] == {"live": 12, "rebuilt": 12}


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    """`tokenmill audit replay` in a child process with the test's settings (those of a log
    with no SLO policy logged, from before the ledger logged one, are the replay's)."""
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": f"{ROOT / 'libs'}:{ROOT / 'services'}"}
    return subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", "audit", "replay", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


async def test_the_command_exits_non_zero_on_a_difference_and_2_on_bad_input(
    live: Settings, audit_pool: asyncpg.Pool
) -> None:
    await mixed_month(audit_pool, live)
    equal = _cli(live, "--from", "2026-10-01", "--to", "2026-11-01", "--lanes", "2")
    assert equal.returncode == 0, equal.stdout + equal.stderr
    assert "OK: the rebuilt books equal the live books" in equal.stdout
    assert "applied migration" not in equal.stderr, "the scratch migrations stay quiet"
    async with audit_pool.acquire() as conn:
        await tamper(
            conn,
            "ledger.request_usage",
            "UPDATE ledger.request_usage SET plan_version = 'v9' WHERE request_id = "
            "(SELECT min(request_id) FROM ledger.request_usage)",
        )
    different = _cli(live, "--from", "2026-10-01", "--json")
    assert different.returncode == 1
    assert '"ok": false' in different.stdout and "plan_version live v9" in different.stdout
    backwards = _cli(live, "--from", "2026-11-01", "--to", "2026-10-01")
    assert backwards.returncode == 2 and "must be later than --from" in backwards.stderr
    nonsense = _cli(live, "--from", "last tuesday")
    assert nonsense.returncode == 2
    assert "--from 'last tuesday' is not an ISO 8601 date or time" in nonsense.stderr
    no_lanes = _cli(live, "--from", "2026-10-01", "--lanes", "0")
    assert no_lanes.returncode == 2 and "--lanes 0 is not between 1 and" in no_lanes.stderr
    databases = await audit_pool.fetchval(
        "SELECT count(*) FROM pg_database WHERE datname LIKE '%_replay_%' AND datname LIKE $1",
        (await audit_pool.fetchval("SELECT current_database()"))[:40] + "%",
    )
    assert databases == 0, "every scratch database was dropped, and bad input made none"


async def publish_as_sent(redis: RedisClient, settings: Settings, sent: dict) -> None:
    """Put each event on its stream as its producer did (signed, FastStream's frame)."""
    keys = SigningKeys.parse(settings.signing_keys)
    for stream, events in sent.items():
        for event in events:
            body = event.canonical_json().encode()
            headers = {
                "event_id": event.event_id,
                "event_type": event.type,
                SIGNATURE_HEADER: keys.sign(body),
            }
            data = await BinaryMessageFormatV1.encode(message=body, reply_to=None, headers=headers,
                                                correlation_id=new_id())  # fmt: skip
            await redis.xadd(stream, {b"__data__": data})


async def test_the_streams_agree_with_the_log_or_are_reported_where_they_do_not(
    live: Settings, audit_pool: asyncpg.Pool, redis: RedisClient
) -> None:
    sent = await mixed_month(audit_pool, live)
    await publish_as_sent(redis, live, sent)
    agreeing = await replay.replay(live, WINDOW, source="redis")
    assert agreeing.ok, agreeing.text()
    assert agreeing.archive["stream entries"] == sum(len(v) for v in sent.values())

    streams = Streams(live.stream_prefix)
    changed = sent[streams.completions][3]
    forged = changed.model_copy(update={"completion_tokens": changed.completion_tokens + 100})
    extra = completion(f"cus_{new_id()}", submitted_at=at(20))
    await publish_as_sent(redis, live, {streams.completions: [forged, extra]})
    # One verdict entry lost from the middle of its stream (its head may have been trimmed).
    await redis.xdel(streams.quality, (await redis.xrange(streams.quality, count=2))[1][0])
    report = await replay.replay(live, WINDOW, source="redis")
    assert not report.ok
    text = "\n".join(report.differences)
    assert f"event {changed.event_id} payload differs from the log's" in text
    assert f"event {extra.event_id} is in the stream, not in the log" in text
    lost = sent[streams.quality][1].event_id
    assert f"log event {lost} of {streams.quality}: in the log, not in the stream" in text
    # The forged payload and the extra completion change the rebuilt books too.
    assert f"request {changed.request_id}: completion_tokens live 500, rebuilt 600" in text
    assert f"request {extra.request_id}: rebuilt from the log, not in the live books" in text


async def test_the_command_checks_the_streams_with_the_data_dirs_signing_key(
    live: Settings, audit_pool: asyncpg.Pool, redis: RedisClient, tmp_path: Path
) -> None:
    """As `make run` leaves it: the signing key in the data dir, none in the environment."""
    await publish_as_sent(redis, live, await mixed_month(audit_pool, live))
    (tmp_path / KEY_FILE_NAME).write_text(live.signing_keys + "\n")
    from_data_dir = dataclasses.replace(live, signing_keys="", data_dir=str(tmp_path))
    done = _cli(from_data_dir, "--from", "2026-10-01", "--to", "2026-11-01", "--source", "redis")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: the rebuilt books equal the live books" in done.stdout


def test_the_help_names_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", "audit", "replay", "--help"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{ROOT / 'libs'}:{ROOT / 'services'}"},
        timeout=60,
    )
    assert done.returncode == 0 and "--source {log,redis}" in done.stdout
