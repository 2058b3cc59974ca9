"""Invoices on real Postgres: drafts that follow the books, gapless numbers (re-runs, a crash,
concurrent finalizations), immutability enforced by the database, credit notes for late
credits, the rounding rule, a price change mid-period, and the exports.

Each test bills its own customers in its own past month, so `issue` for that month finalizes
only that test's drafts, whatever else the session's database holds."""

from __future__ import annotations

import asyncio
import re
import zlib
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import pytest

from tests.integration.usage_rows import book, usage_record
from tokenmill.events import new_id
from tokenmill.ledger import invoice_render, invoices
from tokenmill.ledger.billing import Period

GRACE_S = 3600.0


def at(period: str, day: int = 10, hour: int = 12) -> datetime:
    year, month = map(int, period.split("-"))
    return datetime(year, month, day, hour, tzinfo=UTC)


def customer() -> str:
    return f"cus_{new_id()}"


async def issue(pool: asyncpg.Pool, period: str, batch_size: int = 50, **kw):
    async with pool.acquire() as conn:
        return await invoices.issue_period(
            conn,
            Period.parse(period),
            now=datetime.now(UTC),
            grace_s=GRACE_S,
            batch_size=batch_size,
            **kw,
        )


async def the_invoice(pool: asyncpg.Pool, customer_id: str) -> invoices.Invoice:
    (summary,) = await invoices.list_invoices(pool, customer_id=customer_id, limit=10)
    found = await invoices.find_invoice(pool, summary.invoice_id)
    assert found is not None
    return found


async def credit(pool, customer_id: str, request_id: str | None, reason: str, amount: str):
    await pool.execute(
        "INSERT INTO ledger.credits (credit_id, customer_id, request_id, reason, amount, "
        "currency, event_id) VALUES ($1, $2, $3, $4, $5, 'USD', $6)",
        f"cr_{new_id()}",
        customer_id,
        request_id,
        reason,
        Decimal(amount),
        f"evt_{new_id()}",
    )


async def assert_numbers_gapless(pool: asyncpg.Pool) -> None:
    """Every series holds exactly the numbers 1..its counter, each once."""
    numbers = [
        row["number"]
        for row in await pool.fetch(
            "SELECT number FROM ledger.invoices WHERE number IS NOT NULL "
            "UNION ALL SELECT number FROM ledger.credit_notes"
        )
    ]
    series: dict[str, list[int]] = defaultdict(list)
    for number in numbers:
        prefix, _, n = number.rpartition("-")
        series[prefix].append(int(n))
    counters = dict(await pool.fetch("SELECT series, last_no FROM ledger.document_counters"))
    for prefix, taken in series.items():
        assert sorted(taken) == list(range(1, counters[prefix] + 1)), prefix


def lines_of(invoice: invoices.Invoice) -> list[tuple]:
    return [
        (line.kind, line.plan_version or line.reason, line.token_class, line.tokens, line.amount)
        for line in invoice.figures.lines
    ]


MTOK = 1_000_000


async def test_a_draft_follows_the_books_and_a_late_credit_goes_on_a_credit_note(pool):
    who = customer()
    first = usage_record(who, at("2025-01"), input_tokens=MTOK, output_tokens=2 * MTOK)
    await book(pool, [first])
    draft = await the_invoice(pool, who)
    assert draft.status == "draft" and draft.number is None
    assert draft.figures.total == Decimal("3.50")  # 0.50 input + 3.00 output

    second = usage_record(who, at("2025-01", 20), input_tokens=2 * MTOK, output_tokens=0)
    await book(pool, [second])
    await credit(pool, who, first[0], "defective", "0.50")
    draft = await the_invoice(pool, who)
    assert draft.figures.subtotal == Decimal("4.50")
    assert draft.figures.credits_total == Decimal("-0.50")

    result = await issue(pool, "2025-01")
    final = await the_invoice(pool, who)
    assert final.status == "finalized" and final.number in result.finalized
    assert re.fullmatch(r"TM-\d{4}-\d{6}", final.number)
    assert final.figures.total == Decimal("4.00")
    before = invoice_render.invoice_json(final)

    # A credit for a request of the finalized period: a credit note, the invoice unchanged.
    await credit(pool, who, second[0], "slo_ttft", "0.25")
    result = await issue(pool, "2025-01")
    assert result.finalized == [] and len(result.credit_notes) == 1
    after = await the_invoice(pool, who)
    (note,) = after.credit_notes
    assert (note.invoice_id, note.invoice_number) == (final.invoice_id, final.number)
    assert note.total == Decimal("-0.25") and note.lines[0].reason == "slo_ttft"
    assert {**invoice_render.invoice_json(after), "credit_notes": []} == before
    # Counted once: another run issues nothing, and every credit is on exactly one document.
    assert (await issue(pool, "2025-01")).credit_notes == []
    applied = await pool.fetchval(
        "SELECT count(*) FROM ledger.credit_applications a JOIN ledger.credits c USING "
        "(credit_id) WHERE c.customer_id = $1",
        who,
    )
    assert applied == 2
    await assert_numbers_gapless(pool)


async def test_the_database_refuses_to_change_a_finalized_invoice_or_its_lines(pool):
    who = customer()
    await book(pool, [usage_record(who, at("2025-02"), input_tokens=MTOK)])
    await issue(pool, "2025-02")
    invoice = await the_invoice(pool, who)
    attempts = (
        ("UPDATE ledger.invoices SET total = 0 WHERE invoice_id = $1", "finalized"),
        ("UPDATE ledger.invoices SET status = 'draft' WHERE invoice_id = $1", "finalized"),
        ("DELETE FROM ledger.invoices WHERE invoice_id = $1", "finalized"),
        ("UPDATE ledger.invoice_lines SET amount = 0 WHERE invoice_id = $1", "append-only"),
        ("DELETE FROM ledger.invoice_lines WHERE invoice_id = $1", "append-only"),
        (
            "INSERT INTO ledger.invoice_lines (invoice_id, line_no, kind, reason, requests, "
            "tokens, charged_tokens, amount_exact, amount) "
            "VALUES ($1, 99, 'credit', 'goodwill', 1, 0, 0, -1, -1)",
            "finalized",
        ),
    )
    for sql, refusal in attempts:
        with pytest.raises(asyncpg.PostgresError, match=refusal):
            await pool.execute(sql, invoice.invoice_id)
    assert invoice_render.invoice_json(await the_invoice(pool, who)) == (
        invoice_render.invoice_json(invoice)
    )


async def test_the_database_refuses_a_total_that_is_not_the_sum_of_the_lines(pool):
    who = customer()
    await book(pool, [usage_record(who, at("2025-10"), input_tokens=MTOK)])
    draft = await the_invoice(pool, who)
    with pytest.raises(asyncpg.PostgresError, match="not the sum of its lines"):
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO ledger.invoice_lines (invoice_id, line_no, kind, token_class, "
                "requests, tokens, charged_tokens, amount_exact, amount) "
                "VALUES ($1, 1, 'usage', 'input', 1, 1, 1, 0.5, 0.50)",
                draft.invoice_id,
            )
            await conn.execute(
                "UPDATE ledger.invoices SET status = 'finalized', number = 'X-1', total = 0.51, "
                "subtotal = 0.51, credits_total = 0, included_tokens = 0, used_tokens = 1, "
                "finalized_at = now() WHERE invoice_id = $1",
                draft.invoice_id,
            )
    assert (await the_invoice(pool, who)).status == "draft"


async def test_issue_again_after_a_crash_gives_no_second_invoice_and_no_gap(pool):
    customers = [customer() for _ in range(5)]
    await book(pool, [usage_record(c, at("2025-03"), input_tokens=MTOK) for c in customers])
    drafts = [(await the_invoice(pool, c)).invoice_id for c in customers]
    # A run that dies mid-batch: its transaction never commits, so its numbers go back.
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        assert len(await invoices.finalize_batch(conn, Period.parse("2025-03"), drafts[:2])) == 2
        await transaction.rollback()

    first = await issue(pool, "2025-03", batch_size=2)
    assert len(first.finalized) == 5 and first.already_final == 0
    again = await issue(pool, "2025-03", batch_size=2)
    assert again.finalized == [] and again.already_final == 5
    assert again.supplementary == [] and again.unbilled_requests == 0
    numbers = [(await the_invoice(pool, c)).number for c in customers]
    assert sorted(numbers) == sorted(first.finalized)
    assert [int(n[-6:]) for n in sorted(numbers)] == list(
        range(int(min(numbers)[-6:]), int(min(numbers)[-6:]) + 5)
    )
    await assert_numbers_gapless(pool)


async def test_numbers_are_gapless_under_concurrent_finalization(pool):
    customers = [customer() for _ in range(24)]
    await book(pool, [usage_record(c, at("2025-04"), input_tokens=MTOK) for c in customers])
    # Four whole-period runs and one admin finalization per customer, all at once.
    results = await asyncio.gather(
        *(issue(pool, "2025-04", batch_size=3) for _ in range(4)),
        *(issue(pool, "2025-04", customer_id=c) for c in customers),
    )
    issued = [number for result in results for number in result.finalized]
    assert len(issued) == len(set(issued)) == len(customers)
    finals = [await the_invoice(pool, c) for c in customers]
    assert {invoice.number for invoice in finals} == set(issued)
    await assert_numbers_gapless(pool)


async def test_the_total_is_the_sum_of_the_lines_rounded_half_to_even(pool):
    who = customer()
    # Two lines of exactly 0.125 (250,000 input tokens at 0.50): half to even, each is 0.12
    # and the total 0.24, where rounding the exact total (0.25) would not match the lines.
    await book(
        pool,
        [
            usage_record(who, at("2025-05"), input_tokens=250_000, output_tokens=0),
            usage_record(who, at("2025-05"), model="tm-b", input_tokens=250_000, output_tokens=0),
        ],
    )
    await issue(pool, "2025-05")
    invoice = await the_invoice(pool, who)
    amounts = [line.amount for line in invoice.figures.lines]
    assert [line.amount_exact for line in invoice.figures.lines] == [Decimal("0.125")] * 2
    assert amounts == [Decimal("0.12"), Decimal("0.12")]
    assert invoice.figures.total == sum(amounts) == Decimal("0.24")
    stored = await pool.fetchrow(
        "SELECT i.total, sum(l.amount) AS lines FROM ledger.invoices i JOIN ledger.invoice_lines "
        "l USING (invoice_id) WHERE i.invoice_id = $1 GROUP BY i.total",
        invoice.invoice_id,
    )
    assert stored["total"] == stored["lines"] == Decimal("0.24")


async def test_a_price_change_mid_period_shows_each_versions_usage(pool):
    who = customer()
    plan = f"nego-{new_id().lower()}"
    async with pool.acquire() as conn, conn.transaction():
        await conn.executemany(
            "INSERT INTO ledger.price_plans (plan_id, version, effective_from, currency, "
            "tiers_mode, included_tokens_monthly) VALUES ($1, $2, $3, 'USD', 'graduated', $4)",
            [(plan, "v1", at("2025-01", 1, 0), 1000), (plan, "v2", at("2025-06", 15, 0), 0)],
        )
        # Every version prices every class (the database refuses one that does not).
        await conn.executemany(
            "INSERT INTO ledger.price_bands SELECT $1, $2, c, 1, NULL, 1 "
            "FROM unnest(ARRAY['input', 'cached_input', 'output']) AS c",
            [(plan, at("2025-01", 1, 0)), (plan, at("2025-06", 15, 0))],
        )
    old = (Decimal("1.00"), Decimal("0.50"), Decimal("2.00"))
    new = (Decimal("2.00"), Decimal("1.00"), Decimal("4.00"))
    rows = [
        usage_record(who, at("2025-06", 3), prices=old, plan_id=plan, plan_version="v1",
                     input_tokens=MTOK, output_tokens=MTOK),
        usage_record(who, at("2025-06", 14, 23), prices=old, plan_id=plan, plan_version="v1",
                     input_tokens=MTOK, output_tokens=0),
        usage_record(who, at("2025-06", 15, 1), prices=new, plan_id=plan, plan_version="v2",
                     input_tokens=MTOK, output_tokens=MTOK),
    ]  # fmt: skip
    await book(pool, rows)
    draft = await the_invoice(pool, who)
    await issue(pool, "2025-06")
    final = await the_invoice(pool, who)
    expected = [
        ("usage", "v1", "input", 2 * MTOK, Decimal("2.00")),
        ("usage", "v1", "output", MTOK, Decimal("2.00")),
        ("usage", "v2", "input", MTOK, Decimal("2.00")),
        ("usage", "v2", "output", MTOK, Decimal("4.00")),
    ]
    assert lines_of(draft) == lines_of(final) == expected
    assert final.figures.total == Decimal("10.00")
    assert final.figures.included_tokens == 1000


def parse_pdf(data: bytes) -> list[bytes]:
    """Check the file's structure the way a reader walks it (header, startxref, the xref
    table's offsets each at its object, trailer with a Root, %%EOF); return the page streams,
    inflated."""
    assert data.startswith(b"%PDF-1.") and data.rstrip().endswith(b"%%EOF")
    xref_at = int(re.search(rb"startxref\s+(\d+)\s+%%EOF\s*$", data).group(1))
    assert data[xref_at:].startswith(b"xref")
    table = re.match(rb"xref\s+(\d+) (\d+)\s+", data[xref_at:])
    first, count = int(table.group(1)), int(table.group(2))
    entries = re.findall(rb"(\d{10}) (\d{5}) ([nf])", data[xref_at + table.end() :])[:count]
    assert len(entries) == count
    for number, (offset, _, kind) in enumerate(entries, first):
        if kind == b"n":
            assert data[int(offset) :].startswith(b"%d 0 obj" % number), number
    assert re.search(rb"trailer\s*<<.*?/Root \d+ 0 R", data, re.S)
    streams = re.findall(rb"/Filter /FlateDecode[^>]*>>\s*stream\r?\n(.*?)endstream", data, re.S)
    return [zlib.decompress(stream) for stream in streams]


async def test_exports_are_a_pdf_a_reader_can_walk_and_a_csv_that_adds_up(pool):
    import csv
    import io

    who = customer()
    await book(pool, [usage_record(who, at("2025-07"), input_tokens=MTOK, output_tokens=MTOK)])
    draft = await the_invoice(pool, who)
    assert b"Draft invoice" in b"".join(parse_pdf(invoice_render.invoice_pdf(draft)))
    await issue(pool, "2025-07")
    final = await the_invoice(pool, who)
    pages = b"".join(parse_pdf(invoice_render.invoice_pdf(final)))
    assert final.number.encode() in pages and b"2.00" in pages

    rows = list(csv.DictReader(io.StringIO(invoice_render.invoice_csv(final))))
    *lines, total = rows
    assert total["kind"] == "total" and total["invoice"] == final.number
    assert sum(Decimal(row["amount"]) for row in lines) == Decimal(total["amount"])
    assert Decimal(total["amount"]) == Decimal("2.00")


async def test_a_late_credit_under_half_a_cent_still_gets_its_note_once(pool):
    who = customer()
    request = usage_record(who, at("2025-11"), input_tokens=MTOK)
    await book(pool, [request])
    await issue(pool, "2025-11")
    await credit(pool, who, request[0], "slo_e2e", "0.004")
    (number,) = (await issue(pool, "2025-11")).credit_notes
    (note,) = (await the_invoice(pool, who)).credit_notes
    assert note.number == number and note.total == Decimal("0.00")
    assert note.lines[0].amount_exact == Decimal("-0.004")
    assert (await issue(pool, "2025-11")).credit_notes == []


async def invoices_of(pool: asyncpg.Pool, customer_id: str) -> list[invoices.Invoice]:
    """The customer's invoices, oldest first, each with its lines."""
    found = await invoices.list_invoices(pool, customer_id=customer_id, limit=100)
    return [await invoices.find_invoice(pool, summary.invoice_id) for summary in found]


async def billed_on(pool: asyncpg.Pool, customer_id: str) -> dict[str, list[str]]:
    """Per request of the customer: the invoices (numbers or draft ids) that bill it."""
    rows = await pool.fetch(
        "SELECT u.request_id, coalesce(i.number, i.invoice_id) AS invoice FROM "
        "ledger.request_usage u LEFT JOIN ledger.invoice_usage b USING (request_id) "
        "LEFT JOIN ledger.invoices i ON i.invoice_id = b.invoice_id WHERE u.customer_id = $1",
        customer_id,
    )
    found: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        found[row["request_id"]] += [row["invoice"]] if row["invoice"] else []
    return found


async def test_usage_booked_after_finalizing_goes_on_a_supplementary_invoice_once(pool):
    who = customer()
    await book(pool, [usage_record(who, at("2025-12"), input_tokens=MTOK)])
    (number,) = (await issue(pool, "2025-12")).finalized
    (original,) = await invoices_of(pool, who)
    before = invoice_render.invoice_json(original)
    # Requests of December booked after December's invoice was final: a draft supplement at
    # once, showing only them.
    late = [
        usage_record(who, at("2025-12", 31, 23), input_tokens=2 * MTOK, output_tokens=0),
        usage_record(who, at("2025-12", 31, 23), output_tokens=MTOK, input_tokens=0),
    ]
    await book(pool, late)
    _, draft = await invoices_of(pool, who)
    assert draft.status == "draft" and draft.supplement_of == number
    assert draft.figures.total == Decimal("2.50")

    result = await issue(pool, "2025-12")
    (supplement_number,) = result.finalized
    assert result.supplementary == [supplement_number] and result.unbilled_requests == 0
    assert int(supplement_number[-6:]) > int(number[-6:])  # the same series, numbered on
    original, supplement = await invoices_of(pool, who)
    assert invoice_render.invoice_json(original) == before
    assert supplement.number == supplement_number and supplement.supplement_of == number
    assert lines_of(supplement) == [
        ("usage", "2026-01", "input", 2 * MTOK, Decimal("1.00")),
        ("usage", "2026-01", "output", MTOK, Decimal("1.50")),
    ]
    assert supplement.figures.used_tokens == 3 * MTOK
    assert "Supplementary to invoice " + number in invoice_render.invoice_text(supplement)
    # Re-running issues nothing more, and every request is on exactly one issued invoice.
    again = await issue(pool, "2025-12")
    assert again.finalized == [] and again.supplementary == [] and again.already_final == 2
    assert sorted(map(len, (await billed_on(pool, who)).values())) == [1, 1, 1]
    # A late credit still goes on a credit note for the original, never on the supplement.
    await credit(pool, who, late[0][0], "defective", "1.00")
    assert len(await invoices_of(pool, who)) == 2
    (note_number,) = (await issue(pool, "2025-12")).credit_notes
    original, _ = await invoices_of(pool, who)
    assert [note.number for note in original.credit_notes] == [note_number]
    await assert_numbers_gapless(pool)


async def test_a_booking_committed_after_the_finalizer_read_the_books_is_billed_once(pool):
    who = customer()
    await book(pool, [usage_record(who, at("2026-02"), input_tokens=MTOK, output_tokens=0)])
    racing = usage_record(who, at("2026-02", 28, 23), input_tokens=2 * MTOK, output_tokens=0)
    async with pool.acquire() as booking:
        # The booking inserts while the draft is still open (its trigger finds the draft and
        # opens nothing), then commits only after the whole issue run committed.
        transaction = booking.transaction()
        await transaction.start()
        await book(booking, [racing])
        first = await issue(pool, "2026-02")
        assert len(first.finalized) == 1 and first.unbilled_requests == 0  # not visible yet
        await transaction.commit()
    (original,) = await invoices_of(pool, who)
    assert original.figures.used_tokens == MTOK
    # Not lost: the next run opens its supplement and issues it.
    second = await issue(pool, "2026-02")
    assert second.supplementary == second.finalized and len(second.finalized) == 1
    _, supplement = await invoices_of(pool, who)
    assert supplement.figures.used_tokens == 2 * MTOK
    billed = await billed_on(pool, who)
    assert billed[racing[0]] == [supplement.number]
    assert sorted(map(len, billed.values())) == [1, 1]


async def test_a_booking_waiting_on_a_finalization_opens_the_supplement_itself(pool):
    who = customer()
    await book(pool, [usage_record(who, at("2026-03"), input_tokens=MTOK, output_tokens=0)])
    (draft,) = await invoices_of(pool, who)
    racing = usage_record(who, at("2026-03", 31, 23), output_tokens=MTOK, input_tokens=0)
    async with pool.acquire() as finalizer:
        # The finalization has marked its rows and holds the draft when the booking arrives:
        # the booking's trigger waits for it, then opens a new draft.
        transaction = finalizer.transaction()
        await transaction.start()
        assert await invoices.finalize_batch(finalizer, Period.parse("2026-03"), [draft.invoice_id])
        booking = asyncio.create_task(book(pool, [racing]))
        await asyncio.sleep(0.5)
        assert not booking.done()
        await transaction.commit()
        await booking
    original, supplement = await invoices_of(pool, who)
    assert original.figures.used_tokens == MTOK and supplement.status == "draft"
    (number,) = (await issue(pool, "2026-03")).supplementary
    assert (await billed_on(pool, who))[racing[0]] == [number]


async def test_bookings_racing_issue_runs_are_each_billed_exactly_once(pool):
    who = [customer() for _ in range(3)]
    await book(
        pool, [usage_record(c, at("2026-04"), input_tokens=MTOK, output_tokens=0) for c in who]
    )

    async def keep_booking():
        for n in range(30):
            late = usage_record(
                who[n % 3], at("2026-04", 30, 23), input_tokens=MTOK, output_tokens=0
            )
            await book(pool, [late])

    async def keep_issuing():
        for _ in range(5):
            await issue(pool, "2026-04")

    await asyncio.gather(keep_booking(), keep_issuing(), keep_issuing())
    await issue(pool, "2026-04")  # after the last booking committed: bills what is left
    for c in who:
        billed = await billed_on(pool, c)
        assert len(billed) == 11 and all(len(on) == 1 for on in billed.values()), billed
        found = await invoices_of(pool, c)
        assert all(invoice.status == "finalized" for invoice in found)
        assert sum(invoice.figures.used_tokens for invoice in found) == 11 * MTOK
        original, *supplements = found
        assert original.supplement_of is None
        assert all(s.supplement_of == original.number and s.figures.lines for s in supplements)
    await assert_numbers_gapless(pool)
