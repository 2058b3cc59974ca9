"""Invoices and credit notes in Postgres: drafts read live, finalization, numbering, listing.

A draft's lines are computed from the books whenever it is read. Finalizing a batch of a
period's drafts is one transaction: lock the drafts (in id order, so two runs never deadlock,
and a draft another run finalized meanwhile is skipped), compute their lines, take the next
numbers of the year's series by incrementing its counter row (locked until commit, so numbers
are gapless in commit order and a crash gives them back), write lines and totals, and apply
the period's credits. The database then refuses any change to them (migration 0009).

Late credits: a credit whose period's invoice is already finalized is put on a credit note by
`issue_credit_notes`, which `tokenmill invoices issue` and the admin API run. Doing it there,
rather than in a trigger on ledger.credits, keeps the credit-note counter's lock out of the
ledger's booking transactions. No credit is lost or counted twice: ledger.credit_applications
holds exactly one row per applied credit (its primary key), a finalization applies the credits
it showed, and every sweep applies all the credits of finalized invoices not applied yet.

Late usage: a request is billed exactly once, on the invoice ledger.invoice_usage names for
it. A finalization marks exactly the rows it bills, in the same statement that sums them for
the lines, so its lines and its marks are the same rows whatever commits meanwhile. A request
booked after its period's invoice was finalized, or whose booking committed after the
finalizer read the books, is unmarked: it goes on a SUPPLEMENTARY invoice of the same customer
and period (a draft the booking opens, or the next issue run opens first thing), numbered from
the same series and referencing the original. We mark rows rather than keep a watermark on
booked_at or the event seq because transactions commit out of that order: a row with an
earlier timestamp can become visible after the finalizer's snapshot, and a watermark would
skip it forever.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

import asyncpg

from tokenmill.ledger.billing import (
    CREDIT_NOTE_SERIES,
    INVOICE_SERIES,
    CreditGroup,
    Figures,
    Line,
    Period,
    UsageGroup,
    credit_lines,
    document_number,
    figures,
)
from tokenmill.ledger.rating import TokenCounts


class PeriodNotOver(ValueError):
    """The period (or its grace for late bookings) has not ended: it cannot be invoiced."""


@dataclass(frozen=True)
class CreditNote:
    credit_note_id: str
    number: str
    invoice_id: str
    invoice_number: str
    customer_id: str
    currency: str
    total: Decimal
    issued_at: datetime
    lines: tuple[Line, ...]


@dataclass(frozen=True)
class Invoice:
    invoice_id: str
    customer_id: str
    period: Period
    currency: str
    status: str
    number: str | None
    created_at: datetime
    finalized_at: datetime | None
    figures: Figures
    # The number of the period's original invoice when this is a supplementary invoice (or a
    # draft that will be one).
    supplement_of: str | None = None
    credit_notes: tuple[CreditNote, ...] = field(default=())


@dataclass(frozen=True)
class IssueResult:
    finalized: list[str]
    already_final: int
    credit_notes: list[str]
    # Those of `finalized` that are supplementary invoices (usage booked after the original).
    supplementary: list[str]
    # Requests of the period booked while this run ran, on no issued invoice yet: each is on a
    # draft supplement now, which the next run issues.
    unbilled_requests: int


# The requests of the drafts $3 (with their customers $4 and currencies $5) that no issued
# invoice bills yet, in period [$1, $2).
_UNBILLED = """
SELECT d.invoice_id, u.request_id, u.model, u.tier,
       coalesce(u.plan_id, 'tier:' || u.tier) AS plan_id,
       coalesce(u.plan_version, u.price_version) AS plan_version,
       u.prompt_tokens, u.cached_prompt_tokens, u.completion_tokens,
       u.charged_input_tokens, u.charged_cached_input_tokens, u.charged_output_tokens,
       u.revenue_input, u.revenue_cached_input, u.revenue_output
FROM unnest($3::text[], $4::text[], $5::text[]) AS d (invoice_id, customer_id, currency)
JOIN ledger.request_usage u ON u.customer_id = d.customer_id AND u.currency = d.currency
WHERE u.submitted_at >= $1 AND u.submitted_at < $2
  -- Batches are runs of customers in id order: this range lets the customer index find a
  -- batch's rows without reading the whole period for each batch.
  AND u.customer_id BETWEEN $6 AND $7
  AND NOT EXISTS (SELECT 1 FROM ledger.invoice_usage b WHERE b.request_id = u.request_id)
"""
_SUMS = """
SELECT u.invoice_id, u.model, u.tier, u.plan_id, u.plan_version, count(*) AS requests,
       sum(u.prompt_tokens - u.cached_prompt_tokens) AS input_tokens,
       sum(u.cached_prompt_tokens) AS cached_input_tokens,
       sum(u.completion_tokens) AS output_tokens,
       sum(u.charged_input_tokens) AS charged_input_tokens,
       sum(u.charged_cached_input_tokens) AS charged_cached_input_tokens,
       sum(u.charged_output_tokens) AS charged_output_tokens,
       sum(u.revenue_input) AS revenue_input,
       sum(u.revenue_cached_input) AS revenue_cached_input,
       sum(u.revenue_output) AS revenue_output
FROM unbilled u
GROUP BY 1, 2, 3, 4, 5
"""
# A draft as the books stand now.
_USAGE = f"WITH unbilled AS ({_UNBILLED}) {_SUMS}"
# A draft being finalized: the rows summed are the rows marked, in one statement. Marks go
# in request id order: the primary key's index then fills page after page instead of at
# random, which made a month's marking a third faster than unordered.
_MARK_USAGE = f"""
WITH unbilled AS ({_UNBILLED}),
marked AS (INSERT INTO ledger.invoice_usage (request_id, invoice_id)
           SELECT request_id, invoice_id FROM unbilled ORDER BY request_id)
{_SUMS}"""
# The period's original (finalized, not supplementary) invoices of customers $2.
_ORIGINALS = """
SELECT customer_id, currency, invoice_id FROM ledger.invoices
WHERE period = $1 AND customer_id = ANY($2::text[]) AND status = 'finalized'
  AND supplement_of IS NULL
"""
# The quota shown is the largest any plan version used in the period included.
_INCLUDED = """
SELECT plan_id, version, included_tokens_monthly FROM ledger.price_plans
WHERE (plan_id, version) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""
_PENDING_CREDITS = """
SELECT c.customer_id, c.currency, c.reason, count(*) AS requests, sum(c.amount) AS amount,
       array_agg(c.credit_id) AS credit_ids
FROM ledger.credits c
WHERE c.period = $1 AND c.customer_id = ANY($2::text[])
  AND NOT EXISTS (SELECT 1 FROM ledger.credit_applications a WHERE a.credit_id = c.credit_id)
GROUP BY 1, 2, 3
"""


def _usage_group(row: asyncpg.Record) -> UsageGroup:
    return UsageGroup(
        model=row["model"],
        tier=row["tier"],
        plan_id=row["plan_id"],
        plan_version=row["plan_version"],
        requests=row["requests"],
        tokens=TokenCounts(row["input_tokens"], row["cached_input_tokens"], row["output_tokens"]),
        charged=TokenCounts(
            row["charged_input_tokens"],
            row["charged_cached_input_tokens"],
            row["charged_output_tokens"],
        ),
        revenue={
            "input": row["revenue_input"],
            "cached_input": row["revenue_cached_input"],
            "output": row["revenue_output"],
        },
    )


async def _quotas(
    conn: asyncpg.Connection, versions: set[tuple[str, str]]
) -> dict[tuple[str, str], int]:
    """The included tokens of each (plan, version)."""
    if not versions:
        return {}
    plan_ids, plan_versions = zip(*sorted(versions), strict=True)
    rows = await conn.fetch(_INCLUDED, list(plan_ids), list(plan_versions))
    return {(row["plan_id"], row["version"]): row["included_tokens_monthly"] for row in rows}


@dataclass(frozen=True)
class DraftFigures:
    """A draft's figures, the ids of the credits they show, and the original invoice (id) it
    supplements, if any."""

    figures: Figures
    credit_ids: list[str]
    supplement_of: str | None


async def _drafts_figures(
    conn: asyncpg.Connection, period: Period, drafts: Sequence[asyncpg.Record], *, mark: bool
) -> dict[str, DraftFigures]:
    """Per draft of `period` (invoice_id, customer_id, currency): its figures from the usage no
    issued invoice bills yet; with `mark`, those requests are marked as billed by it. Credits
    not applied yet go on original invoices only: after the original, on credit notes."""
    assert drafts, "a batch names its drafts"
    customers = sorted({d["customer_id"] for d in drafts})
    bounds = (
        period.start_at,
        period.end_at,
        [d["invoice_id"] for d in drafts],
        [d["customer_id"] for d in drafts],
        [d["currency"] for d in drafts],
        customers[0],
        customers[-1],
    )
    usage: dict[str, list[UsageGroup]] = defaultdict(list)
    for row in await conn.fetch(_MARK_USAGE if mark else _USAGE, *bounds):
        usage[row["invoice_id"]].append(_usage_group(row))
    quota = await _quotas(conn, {(g.plan_id, g.plan_version) for gs in usage.values() for g in gs})
    originals = {
        (row["customer_id"], row["currency"]): row["invoice_id"]
        for row in await conn.fetch(_ORIGINALS, period.start, customers)
    }
    credits: dict[tuple[str, str], list[CreditGroup]] = defaultdict(list)
    credit_ids: dict[tuple[str, str], list[str]] = defaultdict(list)
    for row in await conn.fetch(_PENDING_CREDITS, period.start, customers):
        key = (row["customer_id"], row["currency"])
        credits[key].append(CreditGroup(row["reason"], row["requests"], row["amount"]))
        credit_ids[key].extend(row["credit_ids"])
    result = {}
    for draft in drafts:
        key, groups = (draft["customer_id"], draft["currency"]), usage[draft["invoice_id"]]
        original = originals.get(key)
        included = max((quota.get((g.plan_id, g.plan_version), 0) for g in groups), default=0)
        shown = credits[key] if original is None else []
        result[draft["invoice_id"]] = DraftFigures(
            figures(groups, shown, included),
            credit_ids[key] if original is None else [],
            original,
        )
    return result


async def take_numbers(conn: asyncpg.Connection, series: str, count: int) -> list[int]:
    """The next `count` numbers of `series`; the counter row stays locked until commit."""
    assert count >= 1, count
    last = await conn.fetchval(
        "INSERT INTO ledger.document_counters (series, last_no) VALUES ($1, $2) "
        "ON CONFLICT (series) DO UPDATE SET last_no = document_counters.last_no + $2 "
        "RETURNING last_no",
        series,
        count,
    )
    return list(range(last - count + 1, last + 1))


_LINE_COLUMNS = (
    "invoice_id",
    "line_no",
    "kind",
    "model",
    "tier",
    "plan_id",
    "plan_version",
    "token_class",
    "reason",
    "requests",
    "tokens",
    "charged_tokens",
    "amount_exact",
    "amount",
)


def _line_record(invoice_id: str, line_no: int, line: Line) -> tuple:
    return (
        invoice_id,
        line_no,
        line.kind,
        line.model,
        line.tier,
        line.plan_id,
        line.plan_version,
        line.token_class,
        line.reason,
        line.requests,
        line.tokens,
        line.charged_tokens,
        line.amount_exact,
        line.amount,
    )


async def finalize_batch(
    conn: asyncpg.Connection, period: Period, invoice_ids: Sequence[str], year: int | None = None
) -> list[str]:
    """Finalize those of `invoice_ids` (drafts of `period`) still drafts; return their numbers,
    from `year`'s series (default: this year's; a replay re-issues in the original's year)."""
    async with conn.transaction():
        drafts = await conn.fetch(
            "SELECT invoice_id, customer_id, currency FROM ledger.invoices "
            "WHERE invoice_id = ANY($1::text[]) AND period = $2 AND status = 'draft' "
            "ORDER BY invoice_id FOR UPDATE",
            list(invoice_ids),
            period.start,
        )
        if not drafts:
            return []
        found = await _drafts_figures(conn, period, drafts, mark=True)
        drafts = await _drop_empty_supplements(conn, drafts, found)
        if not drafts:
            return []
        drafts = sorted(drafts, key=lambda d: (d["customer_id"], d["currency"]))
        year = year or await _this_year(conn)
        series = f"{INVOICE_SERIES}-{year}"
        numbers = await take_numbers(conn, series, len(drafts))
        lines, applied, updates = [], [], []
        for draft, number in zip(drafts, numbers, strict=True):
            invoice_id = draft["invoice_id"]
            draft_figures = found[invoice_id]
            fig = draft_figures.figures
            lines += [_line_record(invoice_id, n, line) for n, line in enumerate(fig.lines, 1)]
            applied += [(credit_id, invoice_id) for credit_id in draft_figures.credit_ids]
            updates.append(
                (
                    invoice_id,
                    document_number(INVOICE_SERIES, year, number),
                    fig.included_tokens,
                    fig.used_tokens,
                    fig.subtotal,
                    fig.credits_total,
                    fig.total,
                    draft_figures.supplement_of,
                )
            )
        if lines:
            await conn.copy_records_to_table(
                "invoice_lines", schema_name="ledger", records=lines, columns=_LINE_COLUMNS
            )
        if applied:
            await conn.executemany(
                "INSERT INTO ledger.credit_applications (credit_id, invoice_id) VALUES ($1, $2)",
                applied,
            )
        await conn.executemany(
            "UPDATE ledger.invoices SET status = 'finalized', number = $2, included_tokens = $3, "
            "used_tokens = $4, subtotal = $5, credits_total = $6, total = $7, "
            "supplement_of = $8, finalized_at = now() WHERE invoice_id = $1",
            updates,
        )
        return [update[1] for update in updates]


async def _this_year(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT extract(year FROM now() AT TIME ZONE 'UTC')::int")


async def _drop_empty_supplements(
    conn: asyncpg.Connection, drafts: list[asyncpg.Record], found: dict[str, DraftFigures]
) -> list[asyncpg.Record]:
    """Delete the supplementary drafts that bill nothing, and return the other drafts.

    Such a draft is opened when a run or a booking read usage as unbilled while a finalization
    that bills it was still committing (the insert waits for that draft, then opens a new
    one). Issuing it would be an empty supplementary invoice; a booking it missed is unbilled
    still, and the next run opens a draft for it again.
    """
    empty = [
        d["invoice_id"]
        for d in drafts
        if found[d["invoice_id"]].supplement_of is not None
        and not found[d["invoice_id"]].figures.lines
    ]
    if empty:
        await conn.execute("DELETE FROM ledger.invoices WHERE invoice_id = ANY($1::text[])", empty)
    return [d for d in drafts if d["invoice_id"] not in empty]


def check_period_over(period: Period, now: datetime, grace_s: float) -> None:
    closes_at = period.end_at.timestamp() + grace_s
    if now.timestamp() < closes_at:
        raise PeriodNotOver(
            f"period {period} is not over: it can be invoiced from "
            f"{datetime.fromtimestamp(closes_at, period.end_at.tzinfo).isoformat()} "
            f"(its end, plus {grace_s:g} s for the bookings of its last requests)"
        )


async def issue_period(
    conn: asyncpg.Connection,
    period: Period,
    *,
    now: datetime,
    grace_s: float,
    batch_size: int,
    customer_id: str | None = None,
    on_total: Callable[[int], None] = lambda total: None,
    on_batch: Callable[[int], None] = lambda done: None,
) -> IssueResult:
    """Finalize every draft of `period` (one customer's with `customer_id`), `batch_size` per
    transaction, then put late credits (of any period; that customer's) on credit notes.
    Drafts are first opened for any of the period's requests no invoice bills yet (a booking
    that committed after an earlier run read the books), so those are issued too, on
    supplementary invoices. Safe to re-run after a crash: only drafts are finalized, and a
    batch that did not commit took no number."""
    check_period_over(period, now, grace_s)
    assert batch_size >= 1, batch_size
    await open_drafts_for_unbilled(conn, period, customer_id)
    rows = await conn.fetch(
        "SELECT invoice_id, status FROM ledger.invoices WHERE period = $1 "
        "AND ($2::text IS NULL OR customer_id = $2) ORDER BY customer_id, currency",
        period.start,
        customer_id,
    )
    drafts = [row["invoice_id"] for row in rows if row["status"] == "draft"]
    on_total(len(drafts))
    finalized: list[str] = []
    for start in range(0, len(drafts), batch_size):
        batch = drafts[start : start + batch_size]
        finalized += await finalize_batch(conn, period, batch)
        on_batch(len(batch))
    notes = await issue_credit_notes(conn, batch_size, customer_id)
    supplementary = await conn.fetch(
        "SELECT number FROM ledger.invoices WHERE number = ANY($1::text[]) "
        "AND supplement_of IS NOT NULL ORDER BY number",
        finalized,
    )
    # Bookings that committed while this run ran: they get their drafts now, never lost.
    unbilled = await open_drafts_for_unbilled(conn, period, customer_id)
    return IssueResult(
        finalized,
        len(rows) - len(drafts),
        notes,
        [row["number"] for row in supplementary],
        unbilled,
    )


# Opens a draft for each customer and currency with requests of period [$2, $3) that no
# invoice bills (customer $4 only, when given); returns how many such requests there are.
_OPEN_DRAFTS_FOR_UNBILLED = """
WITH unbilled AS (
    SELECT u.customer_id, u.currency, count(*) AS requests FROM ledger.request_usage u
    WHERE u.submitted_at >= $2 AND u.submitted_at < $3
      AND ($4::text IS NULL OR u.customer_id = $4)
      AND NOT EXISTS (SELECT 1 FROM ledger.invoice_usage b WHERE b.request_id = u.request_id)
    GROUP BY 1, 2),
opened AS (
    INSERT INTO ledger.invoices (customer_id, period, currency)
    SELECT customer_id, $1, currency FROM unbilled
    ON CONFLICT (customer_id, period, currency) WHERE status = 'draft' DO NOTHING)
SELECT coalesce(sum(requests), 0)::bigint FROM unbilled
"""


async def open_drafts_for_unbilled(
    conn: asyncpg.Connection, period: Period, customer_id: str | None = None
) -> int:
    """Make sure every request of `period` that no invoice bills yet is on a draft (the
    booking's trigger opens it, except when the booking committed after a finalizer read the
    books); return how many such requests there are."""
    return await conn.fetchval(
        _OPEN_DRAFTS_FOR_UNBILLED, period.start, period.start_at, period.end_at, customer_id
    )


# Credits no document shows yet whose period's invoice is final, for the first $1 invoices
# (of customer $2 only, when given).
_LATE_CREDITS = """
WITH late AS (
    SELECT i.invoice_id, i.customer_id, i.currency, c.credit_id, c.reason, c.amount
    FROM ledger.credits c
    JOIN ledger.invoices i ON i.customer_id = c.customer_id AND i.period = c.period
                          AND i.currency = c.currency AND i.status = 'finalized'
                          AND i.supplement_of IS NULL
    WHERE ($2::text IS NULL OR c.customer_id = $2)
      AND NOT EXISTS (SELECT 1 FROM ledger.credit_applications a
                      WHERE a.credit_id = c.credit_id))
SELECT * FROM late
WHERE invoice_id IN (SELECT DISTINCT invoice_id FROM late ORDER BY invoice_id LIMIT $1)
ORDER BY invoice_id, credit_id
"""


async def issue_credit_notes(
    conn: asyncpg.Connection,
    batch_size: int,
    customer_id: str | None = None,
    year: int | None = None,
) -> list[str]:
    """Put every credit of a finalized invoice (of `customer_id` only, when given) that no
    document shows yet on a credit note for that invoice, `batch_size` invoices per
    transaction; return the notes' numbers (from `year`'s series; default this year's)."""
    numbers: list[str] = []
    while True:
        issued = await _credit_notes_batch(conn, batch_size, customer_id, year)
        if not issued:
            return numbers
        numbers += issued


async def _credit_notes_batch(
    conn: asyncpg.Connection, batch_size: int, customer_id: str | None, year: int | None
) -> list[str]:
    async with conn.transaction():
        year = year or await _this_year(conn)
        series = f"{CREDIT_NOTE_SERIES}-{year}"
        # Taking the series' counter first serializes sweeps: a second one waits here, then
        # sees the first one's applications.
        await conn.execute(
            "INSERT INTO ledger.document_counters (series, last_no) VALUES ($1, 0) "
            "ON CONFLICT (series) DO UPDATE SET last_no = document_counters.last_no",
            series,
        )
        rows = await conn.fetch(_LATE_CREDITS, batch_size, customer_id)
        by_invoice: dict[str, list[asyncpg.Record]] = defaultdict(list)
        for row in rows:
            by_invoice[row["invoice_id"]].append(row)
        if not by_invoice:
            return []
        numbers = await take_numbers(conn, series, len(by_invoice))
        issued = []
        for (invoice_id, credits), number in zip(by_invoice.items(), numbers, strict=True):
            issued.append(
                await _write_credit_note(
                    conn, invoice_id, credits, document_number(CREDIT_NOTE_SERIES, year, number)
                )
            )
        return issued


async def _write_credit_note(
    conn: asyncpg.Connection, invoice_id: str, credits: list[asyncpg.Record], number: str
) -> str:
    by_reason: dict[str, list[Decimal]] = defaultdict(list)
    for credit in credits:
        by_reason[credit["reason"]].append(credit["amount"])
    lines = credit_lines(
        CreditGroup(reason, len(amounts), sum(amounts, Decimal(0)))
        for reason, amounts in by_reason.items()
    )
    note_id = await conn.fetchval(
        "INSERT INTO ledger.credit_notes (number, invoice_id, customer_id, currency, total) "
        "VALUES ($1, $2, $3, $4, $5) RETURNING credit_note_id",
        number,
        invoice_id,
        credits[0]["customer_id"],
        credits[0]["currency"],
        sum((line.amount for line in lines), Decimal(0)),
    )
    await conn.executemany(
        "INSERT INTO ledger.credit_note_lines (credit_note_id, line_no, reason, requests, "
        "amount_exact, amount) VALUES ($1, $2, $3, $4, $5, $6)",
        [
            (note_id, n, line.reason, line.requests, line.amount_exact, line.amount)
            for n, line in enumerate(lines, 1)
        ],
    )
    await conn.executemany(
        "INSERT INTO ledger.credit_applications (credit_id, credit_note_id) VALUES ($1, $2)",
        [(credit["credit_id"], note_id) for credit in credits],
    )
    return number


# The original's number is that of the period's other invoice that is final and no supplement.
_INVOICE_COLUMNS = (
    "invoice_id, customer_id, period, currency, status, number, created_at, finalized_at, "
    "included_tokens, used_tokens, "
    "(SELECT o.number FROM ledger.invoices o WHERE o.customer_id = i.customer_id "
    "AND o.period = i.period AND o.currency = i.currency AND o.status = 'finalized' "
    "AND o.supplement_of IS NULL AND o.invoice_id <> i.invoice_id) AS supplement_of"
)


async def list_invoices(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    period: Period | None = None,
    customer_id: str | None = None,
    limit: int,
) -> list[Invoice]:
    """Invoices (drafts with their current figures), newest period first."""
    rows = await conn.fetch(
        f"SELECT {_INVOICE_COLUMNS} FROM ledger.invoices i "
        "WHERE ($1::date IS NULL OR period = $1) AND ($2::text IS NULL OR customer_id = $2) "
        "ORDER BY period DESC, customer_id, currency, created_at LIMIT $3",
        period.start if period else None,
        customer_id,
        limit,
    )
    return [await _invoice(conn, row, with_notes=False) for row in rows]


async def find_invoice(
    conn: asyncpg.Connection | asyncpg.Pool, ref: str, customer_id: str | None = None
) -> Invoice | None:
    """The invoice with id or number `ref` (only `customer_id`'s when given), with its lines
    and credit notes."""
    row = await conn.fetchrow(
        f"SELECT {_INVOICE_COLUMNS} FROM ledger.invoices i "
        "WHERE (invoice_id = $1 OR number = $1) "
        "AND ($2::text IS NULL OR customer_id = $2)",
        ref,
        customer_id,
    )
    return None if row is None else await _invoice(conn, row, with_notes=True)


async def _invoice(conn, row: asyncpg.Record, *, with_notes: bool) -> Invoice:
    period = Period(row["period"])
    if row["status"] == "draft":
        found = await _drafts_figures(conn, period, [row], mark=False)
        fig = found[row["invoice_id"]].figures
    else:
        lines = await conn.fetch(
            "SELECT * FROM ledger.invoice_lines WHERE invoice_id = $1 ORDER BY line_no",
            row["invoice_id"],
        )
        used, included = row["used_tokens"], row["included_tokens"]
        charged = sum(line["charged_tokens"] for line in lines if line["kind"] == "usage")
        fig = Figures(tuple(_line(line) for line in lines), included, used, charged)
    notes = await credit_notes(conn, invoice_id=row["invoice_id"]) if with_notes else []
    return Invoice(
        invoice_id=row["invoice_id"],
        customer_id=row["customer_id"],
        period=period,
        currency=row["currency"],
        status=row["status"],
        number=row["number"],
        created_at=row["created_at"],
        finalized_at=row["finalized_at"],
        figures=fig,
        supplement_of=row["supplement_of"],
        credit_notes=tuple(notes),
    )


def _line(row: asyncpg.Record) -> Line:
    return Line(
        kind=row["kind"],
        requests=row["requests"],
        amount_exact=row["amount_exact"],
        amount=row["amount"],
        tokens=row["tokens"],
        charged_tokens=row["charged_tokens"],
        model=row["model"],
        tier=row["tier"],
        plan_id=row["plan_id"],
        plan_version=row["plan_version"],
        token_class=row["token_class"],
        reason=row["reason"],
    )


async def credit_notes(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    invoice_id: str | None = None,
    customer_id: str | None = None,
    limit: int = 1000,
) -> list[CreditNote]:
    notes = await conn.fetch(
        "SELECT n.*, i.number AS invoice_number FROM ledger.credit_notes n "
        "JOIN ledger.invoices i USING (invoice_id) "
        "WHERE ($1::text IS NULL OR n.invoice_id = $1) "
        "AND ($2::text IS NULL OR n.customer_id = $2) "
        "ORDER BY n.issued_at, n.number LIMIT $3",
        invoice_id,
        customer_id,
        limit,
    )
    result = []
    for note in notes:
        lines = await conn.fetch(
            "SELECT * FROM ledger.credit_note_lines WHERE credit_note_id = $1 ORDER BY line_no",
            note["credit_note_id"],
        )
        result.append(
            CreditNote(
                credit_note_id=note["credit_note_id"],
                number=note["number"],
                invoice_id=note["invoice_id"],
                invoice_number=note["invoice_number"],
                customer_id=note["customer_id"],
                currency=note["currency"],
                total=note["total"],
                issued_at=note["issued_at"],
                lines=tuple(
                    Line(
                        kind="credit",
                        requests=line["requests"],
                        amount_exact=line["amount_exact"],
                        amount=line["amount"],
                        reason=line["reason"],
                    )
                    for line in lines
                ),
            )
        )
    return result
