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
    credit_notes: tuple[CreditNote, ...] = field(default=())


@dataclass(frozen=True)
class IssueResult:
    finalized: list[str]
    already_final: int
    credit_notes: list[str]
    # Finalized invoices of the period whose usage grew after they were finalized (requests
    # booked past the grace): those tokens are on no invoice, and the operator must know.
    unbilled: list[str]


_USAGE = """
SELECT u.customer_id, u.currency, u.model, u.tier,
       coalesce(u.plan_id, 'tier:' || u.tier) AS plan_id,
       coalesce(u.plan_version, u.price_version) AS plan_version,
       count(*) AS requests,
       sum(u.prompt_tokens - u.cached_prompt_tokens) AS input_tokens,
       sum(u.cached_prompt_tokens) AS cached_input_tokens,
       sum(u.completion_tokens) AS output_tokens,
       sum(u.charged_input_tokens) AS charged_input_tokens,
       sum(u.charged_cached_input_tokens) AS charged_cached_input_tokens,
       sum(u.charged_output_tokens) AS charged_output_tokens,
       sum(u.revenue_input) AS revenue_input,
       sum(u.revenue_cached_input) AS revenue_cached_input,
       sum(u.revenue_output) AS revenue_output
FROM unnest($3::text[]) AS batch (customer_id)
JOIN ledger.request_usage u ON u.customer_id = batch.customer_id
WHERE u.submitted_at >= $1 AND u.submitted_at < $2
  -- Batches are runs of customers in id order: this range lets the customer index find a
  -- batch's rows without reading the whole period for each batch.
  AND u.customer_id BETWEEN $4 AND $5
GROUP BY 1, 2, 3, 4, 5, 6
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


async def _drafts_figures(
    conn: asyncpg.Connection, period: Period, customers: Sequence[str]
) -> tuple[dict[tuple[str, str], Figures], dict[tuple[str, str], list[str]]]:
    """Per (customer, currency): the figures of its draft for `period` as the books stand now,
    and the ids of the credits those figures show."""
    assert customers, "a batch names its customers"
    bounds = (period.start_at, period.end_at, list(customers), min(customers), max(customers))
    usage: dict[tuple[str, str], list[UsageGroup]] = defaultdict(list)
    for row in await conn.fetch(_USAGE, *bounds):
        usage[(row["customer_id"], row["currency"])].append(_usage_group(row))
    quota = await _quotas(conn, {(g.plan_id, g.plan_version) for gs in usage.values() for g in gs})
    included = {
        key: max(quota.get((g.plan_id, g.plan_version), 0) for g in groups)
        for key, groups in usage.items()
    }
    credits: dict[tuple[str, str], list[CreditGroup]] = defaultdict(list)
    credit_ids: dict[tuple[str, str], list[str]] = defaultdict(list)
    for row in await conn.fetch(_PENDING_CREDITS, period.start, list(customers)):
        key = (row["customer_id"], row["currency"])
        credits[key].append(CreditGroup(row["reason"], row["requests"], row["amount"]))
        credit_ids[key].extend(row["credit_ids"])
    keys = set(usage) | set(credits)
    result = {key: figures(usage[key], credits[key], included.get(key, 0)) for key in keys}
    return result, credit_ids


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
    conn: asyncpg.Connection, period: Period, invoice_ids: Sequence[str]
) -> list[str]:
    """Finalize those of `invoice_ids` (drafts of `period`) still drafts; return their numbers."""
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
        found, credit_ids = await _drafts_figures(
            conn, period, sorted({d["customer_id"] for d in drafts})
        )
        drafts = sorted(drafts, key=lambda d: (d["customer_id"], d["currency"]))
        year = await conn.fetchval("SELECT extract(year FROM now() AT TIME ZONE 'UTC')::int")
        series = f"{INVOICE_SERIES}-{year}"
        numbers = await take_numbers(conn, series, len(drafts))
        lines, applied, updates = [], [], []
        for draft, number in zip(drafts, numbers, strict=True):
            key = (draft["customer_id"], draft["currency"])
            fig = found.get(key) or figures([], [], 0)
            invoice_id = draft["invoice_id"]
            lines += [_line_record(invoice_id, n, line) for n, line in enumerate(fig.lines, 1)]
            applied += [(credit_id, invoice_id) for credit_id in credit_ids.get(key, [])]
            updates.append(
                (
                    invoice_id,
                    document_number(INVOICE_SERIES, year, number),
                    fig.included_tokens,
                    fig.used_tokens,
                    fig.subtotal,
                    fig.credits_total,
                    fig.total,
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
            "finalized_at = now() WHERE invoice_id = $1",
            updates,
        )
        return [update[1] for update in updates]


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
    Safe to re-run after a crash: only drafts are finalized, and a batch that did not commit
    took no number."""
    check_period_over(period, now, grace_s)
    assert batch_size >= 1, batch_size
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
    unbilled = await usage_after_finalizing(conn, period, customer_id)
    return IssueResult(finalized, len(rows) - len(drafts), notes, unbilled)


async def usage_after_finalizing(
    conn: asyncpg.Connection, period: Period, customer_id: str | None = None
) -> list[str]:
    """The numbers of `period`'s finalized invoices whose customer has booked more tokens in
    the period than the invoice shows."""
    # Two plain queries compared here: joined in SQL, the planner may re-run the period's
    # aggregate once per invoice.
    used = {
        (row["customer_id"], row["currency"]): row["used_tokens"]
        for row in await conn.fetch(
            "SELECT customer_id, currency, sum(prompt_tokens + completion_tokens) AS used_tokens "
            "FROM ledger.request_usage WHERE submitted_at >= $1 AND submitted_at < $2 "
            "AND ($3::text IS NULL OR customer_id = $3) GROUP BY customer_id, currency",
            period.start_at,
            period.end_at,
            customer_id,
        )
    }
    finalized = await conn.fetch(
        "SELECT number, customer_id, currency, used_tokens FROM ledger.invoices "
        "WHERE period = $1 AND status = 'finalized' AND ($2::text IS NULL OR customer_id = $2) "
        "ORDER BY number",
        period.start,
        customer_id,
    )
    return [
        row["number"]
        for row in finalized
        if used.get((row["customer_id"], row["currency"]), 0) != row["used_tokens"]
    ]


# Credits no document shows yet whose period's invoice is final, for the first $1 invoices
# (of customer $2 only, when given).
_LATE_CREDITS = """
WITH late AS (
    SELECT i.invoice_id, i.customer_id, i.currency, c.credit_id, c.reason, c.amount
    FROM ledger.credits c
    JOIN ledger.invoices i ON i.customer_id = c.customer_id AND i.period = c.period
                          AND i.currency = c.currency AND i.status = 'finalized'
    WHERE ($2::text IS NULL OR c.customer_id = $2)
      AND NOT EXISTS (SELECT 1 FROM ledger.credit_applications a
                      WHERE a.credit_id = c.credit_id))
SELECT * FROM late
WHERE invoice_id IN (SELECT DISTINCT invoice_id FROM late ORDER BY invoice_id LIMIT $1)
ORDER BY invoice_id, credit_id
"""


async def issue_credit_notes(
    conn: asyncpg.Connection, batch_size: int, customer_id: str | None = None
) -> list[str]:
    """Put every credit of a finalized invoice (of `customer_id` only, when given) that no
    document shows yet on a credit note for that invoice, `batch_size` invoices per
    transaction; return the notes' numbers."""
    numbers: list[str] = []
    while True:
        issued = await _credit_notes_batch(conn, batch_size, customer_id)
        if not issued:
            return numbers
        numbers += issued


async def _credit_notes_batch(
    conn: asyncpg.Connection, batch_size: int, customer_id: str | None
) -> list[str]:
    async with conn.transaction():
        year = await conn.fetchval("SELECT extract(year FROM now() AT TIME ZONE 'UTC')::int")
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


_INVOICE_COLUMNS = (
    "invoice_id, customer_id, period, currency, status, number, created_at, finalized_at, "
    "included_tokens, used_tokens"
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
        f"SELECT {_INVOICE_COLUMNS} FROM ledger.invoices "
        "WHERE ($1::date IS NULL OR period = $1) AND ($2::text IS NULL OR customer_id = $2) "
        "ORDER BY period DESC, customer_id, currency LIMIT $3",
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
        f"SELECT {_INVOICE_COLUMNS} FROM ledger.invoices WHERE (invoice_id = $1 OR number = $1) "
        "AND ($2::text IS NULL OR customer_id = $2)",
        ref,
        customer_id,
    )
    return None if row is None else await _invoice(conn, row, with_notes=True)


async def _invoice(conn, row: asyncpg.Record, *, with_notes: bool) -> Invoice:
    period = Period(row["period"])
    if row["status"] == "draft":
        found, _ = await _drafts_figures(conn, period, [row["customer_id"]])
        fig = found.get((row["customer_id"], row["currency"])) or figures([], [], 0)
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
