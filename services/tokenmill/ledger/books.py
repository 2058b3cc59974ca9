"""The ledger's writes: every event into the append-only log, and each request's books.

A completion is booked once, in the transaction that logs it (the log's ON CONFLICT is the
duplicate check): its rating under the plan in force when it was submitted goes into
ledger.request_usage (the sub-ledger), its revenue and cost into the journal's summary
posting for its batch (which request_usage names), and the credits it earns (a defective
verdict recorded before it, a missed latency objective) into ledger.credits with their
postings. Completions are booked in batches (`book_completions`): one transaction, a few
set-based statements, whatever the batch's size.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import NamedTuple

import asyncpg
from pydantic import TypeAdapter

from tokenmill import tracing
from tokenmill.events import (
    EnergyInterval,
    Event,
    JobCompleted,
    PowerSample,
    PrepaidCreditAdded,
    QualityVerdict,
    SloPolicySet,
    UsageBooked,
    canonical_json,
    new_id,
    parse_event,
    utc_now,
)
from tokenmill.ledger import journal
from tokenmill.ledger.journal import Posting
from tokenmill.ledger.plans import versions_in_force
from tokenmill.ledger.pricing import (
    CostRates,
    Usage,
    carbon_g,
    compute_cost,
    device_class,
    joules_cost,
)
from tokenmill.ledger.pricing import energy_cost as energy_cost_of
from tokenmill.ledger.rating import (
    TOKEN_CLASSES,
    PeriodPosition,
    PlanVersion,
    RequestCharge,
    TokenCounts,
    rate_request,
)
from tokenmill.money import quantize_amount
from tokenmill.outbox import OUTBOX_COLUMNS
from tokenmill.settings import Settings

SCHEMA = "ledger"
# How pydantic writes a time in an event's JSON.
_DATETIME = TypeAdapter(datetime)


@dataclass(frozen=True)
class SloPolicy:
    """Per tier: the time-to-first-token objective (ms; 0 = none) and the share of the charge
    credited when a completion misses it."""

    ttft_ms_max: dict[str, float]
    credit_share: dict[str, Decimal]

    @classmethod
    def from_settings(cls, settings: Settings) -> SloPolicy:
        tiers = ("premium", "standard")
        policy = cls(
            {t: getattr(settings, f"slo_ttft_ms_{t}") for t in tiers},
            {t: Decimal(getattr(settings, f"slo_ttft_credit_share_{t}")) for t in tiers},
        )
        assert all(0 <= share <= 1 for share in policy.credit_share.values()), policy
        return policy

    @classmethod
    def logged(cls, event: SloPolicySet) -> SloPolicy:
        return cls(dict(event.ttft_ms_max), dict(event.credit_share))

    def event(self, region: str) -> SloPolicySet:
        return SloPolicySet(
            producer="ledger", customer_id="", request_id="", region=region,
            ttft_ms_max=self.ttft_ms_max, credit_share=self.credit_share,
        )  # fmt: skip

    def ttft_credit(self, event: JobCompleted, charge: Decimal) -> Decimal:
        """What a completion is credited for a missed TTFT objective (0 if none was missed)."""
        objective = self.ttft_ms_max.get(event.tier, 0)
        if objective <= 0 or event.ttft_ms <= objective or charge <= 0:
            return Decimal(0)
        return quantize_amount(charge * self.credit_share[event.tier])


NO_SLO = SloPolicy({}, {})


async def log_slo_policy(
    conn: asyncpg.Connection, policy: SloPolicy, stream: str, region: str
) -> bool:
    """Log `policy` as the one this ledger process books under from now on, unless it is the
    policy last logged; True if it was logged. Called as the ledger starts, before it books:
    a replay credits each completion under the policy logged before it."""
    async with conn.transaction():
        # Two ledgers starting at once log one policy, not two.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('ledger.slo_policy', 0))")
        last = await slo_policy_at(conn, None)
        if last == policy:
            return False
        return await append_event(conn, policy.event(region), stream)


async def slo_policy_at(conn: asyncpg.Connection, seq: int | None) -> SloPolicy | None:
    """The SLO policy last logged at or before `seq` (None: the whole log); None if none was."""
    body = await conn.fetchval(
        "SELECT body FROM ledger.events WHERE event_type = 'ledger.slo_policy' "
        "AND seq <= coalesce($1, seq) ORDER BY seq DESC LIMIT 1",
        seq,
    )
    return None if body is None else SloPolicy.logged(parse_event(body))  # type: ignore[arg-type]


class Logged(NamedTuple):
    """An event as the ledger received it: from `stream`, with the exact text its producer
    signed. The log keeps that text, fields this version does not know included; None means
    the event's canonical JSON, the same text for the platform's own producers."""

    event: Event
    stream: str
    body: str | None = None

    def text(self) -> str:
        return self.event.canonical_json() if self.body is None else self.body


async def append_event(conn: asyncpg.Connection, event: Event, stream: str) -> bool:
    """Append `event` to the log; False if it is already there (a redelivery)."""
    return bool(await append_events(conn, [Logged(event, stream)]))


async def append_events(conn: asyncpg.Connection, logged: Sequence[Logged]) -> set[str]:
    """Append each event to the log in one statement; return the ids that were new."""
    if not logged:
        return set()
    rows = await conn.fetch(
        "INSERT INTO ledger.events (event_id, event_type, stream, customer_id, request_id, "
        "occurred_at, body) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], "
        "$4::text[], $5::text[], $6::timestamptz[], $7::text[]) "
        "ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
        [x.event.event_id for x in logged],
        [x.event.type for x in logged],
        [x.stream for x in logged],
        [x.event.customer_id for x in logged],
        [x.event.request_id for x in logged],
        [x.event.occurred_at for x in logged],
        [x.text() for x in logged],
    )
    return {r["event_id"] for r in rows}


async def lock_customers(conn: asyncpg.Connection, customer_ids: Iterable[str]) -> None:
    """Serialize this transaction's books of these customers with any other's.

    A verdict and its completion can be applied at once by two transactions; each would miss
    the other's uncommitted row and the credit would never be given. Both take this lock
    first, so the second sees the first's commit. Taken in sorted order: no deadlocks.
    """
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('ledger.customer:' || c, 0)) "
        "FROM unnest($1::text[]) AS c ORDER BY c",
        sorted(set(customer_ids)),
    )


class CostRateBook:
    """Every version of the cost rates and their time-of-use hours (a handful of rows), read
    once per batch."""

    def __init__(self, rows: list[asyncpg.Record], hours: list[asyncpg.Record] = ()) -> None:
        self._rows = sorted(rows, key=lambda r: r["effective_from"], reverse=True)
        self._hours: dict[tuple[str, datetime], list[asyncpg.Record]] = defaultdict(list)
        for h in hours:
            self._hours[(h["device_class"], h["effective_from"])].append(h)

    @classmethod
    async def read(cls, conn: asyncpg.Connection) -> CostRateBook:
        return cls(
            await conn.fetch("SELECT * FROM ledger.cost_rates"),
            await conn.fetch("SELECT * FROM ledger.tariff_hours"),
        )

    def at(self, device: str, at: datetime) -> CostRates:
        """The rates in force for `device` at `at`, with the energy price of its hour (UTC)."""
        wanted = device_class(device)
        for r in self._rows:
            if r["device_class"] == wanted and r["effective_from"] <= at:
                rates = CostRates(**{f: r[f] for f in CostRates.__dataclass_fields__})
                hour = at.astimezone(UTC).hour
                for h in self._hours.get((wanted, r["effective_from"]), ()):
                    if h["hour_from"] <= hour < h["hour_to"]:
                        return replace(rates, energy_price_per_kwh=h["energy_price_per_kwh"])
                return rates
        raise LookupError(f"no cost rates for {device!r} at {at.isoformat()}")


async def rates_at(conn: asyncpg.Connection, device: str, at: datetime) -> CostRates:
    return (await CostRateBook.read(conn)).at(device, at)


def period_of(at: datetime) -> date:
    """The billing period (calendar month, UTC) a request submitted at `at` belongs to."""
    utc = at.astimezone(UTC)
    return date(utc.year, utc.month, 1)


def token_counts(event: JobCompleted) -> TokenCounts:
    if not 0 <= event.cached_prompt_tokens <= event.prompt_tokens:
        raise ValueError(
            f"cached_prompt_tokens {event.cached_prompt_tokens} not within prompt_tokens "
            f"{event.prompt_tokens}"
        )
    return TokenCounts(
        input=event.prompt_tokens - event.cached_prompt_tokens,
        cached_input=event.cached_prompt_tokens,
        output=event.completion_tokens,
    )


@dataclass
class Booking:
    """One completion's books, before they are written."""

    event: JobCompleted
    plan: PlanVersion
    rates: CostRates
    charge: RequestCharge
    energy_cost: Decimal
    compute_cost: Decimal
    prepaid_drawn: Decimal

    @property
    def revenue(self) -> Decimal:
        return self.charge.total

    @property
    def cost(self) -> Decimal:
        return self.energy_cost + self.compute_cost

    @property
    def price_version(self) -> str:
        return f"plan {self.plan.plan_id} {self.plan.version}; rates {self.rates.version}"

    def usage_row(self, posting_id: int | None) -> tuple:
        e, c = self.event, self.charge
        return (
            e.request_id, e.event_id, e.customer_id, e.tier, e.region, e.model, e.device,
            e.prompt_tokens, e.completion_tokens, e.cached_prompt_tokens, e.energy.energy_j,
            e.energy.meter, e.energy.estimated, e.compute_s, self.energy_cost,
            self.compute_cost, self.cost, self.revenue, self.revenue - self.cost,
            self.plan.currency, self.price_version, e.submitted_at, e.occurred_at,
            self.plan.plan_id, self.plan.version, c.charged.input, c.charged.cached_input,
            c.charged.output, c.amounts["input"], c.amounts["cached_input"], c.amounts["output"],
            posting_id, self.rates.energy_price_per_kwh, self.rates.pue,
            carbon_g(e.energy.energy_j, self.rates),
        )  # fmt: skip

    def booked_fields(self, event_id: str, occurred_at: datetime | str) -> dict[str, object]:
        """The fields of this booking's UsageBooked event (the time as given)."""
        e = self.event
        return {
            **e.envelope_for("ledger"),
            "type": "usage.booked",
            "event_id": event_id,
            "schema_version": 1,
            "occurred_at": occurred_at,
            "tier": e.tier,
            "prompt_tokens": e.prompt_tokens,
            "completion_tokens": e.completion_tokens,
            "energy_j": e.energy.energy_j,
            "cost": self.cost,
            "revenue": self.revenue,
            "currency": self.plan.currency,
            "price_version": self.price_version,
            "completion_event_id": e.event_id,
        }

    def booked_event(self, event_id: str, occurred_at: datetime) -> UsageBooked:
        return UsageBooked(**self.booked_fields(event_id, occurred_at))

    def booked_json(self, event_id: str, occurred_at_json: str) -> str:
        """`booked_event(...).canonical_json()` without building the model, in half the time:
        decimals are their str() in JSON and the time comes serialized (the same for the whole
        batch). tests/integration/test_journal.py holds the two texts equal."""
        fields = self.booked_fields(event_id, occurred_at_json).items()
        return canonical_json({k: str(v) if isinstance(v, Decimal) else v for k, v in fields})


USAGE_COLUMNS = [
    "request_id", "completion_event_id", "customer_id", "tier", "region", "model", "device",
    "prompt_tokens", "completion_tokens", "cached_prompt_tokens", "energy_j", "meter",
    "energy_estimated", "compute_s", "energy_cost", "compute_cost", "cost", "revenue", "margin",
    "currency", "price_version", "submitted_at", "completed_at", "plan_id", "plan_version",
    "charged_input_tokens", "charged_cached_input_tokens", "charged_output_tokens",
    "revenue_input", "revenue_cached_input", "revenue_output", "posting_id",
    "energy_price_per_kwh", "pue", "carbon_g",
]  # fmt: skip

# A summary posting has at most two customer legs per request (prepaid, receivable) and a few
# dozen others (revenue per tier and token class, cost); this many requests keep it in bounds.
REQUESTS_PER_POSTING = (journal.LEGS_MAX - 96) // 2


def usage_postings(bookings: list[Booking]) -> list[tuple[Posting, list[Booking]]]:
    """The summary postings of `bookings`, each with the bookings it covers.

    One per currency and day of completion (so balances as of a day's end are exact), split
    to keep its legs in bounds. Each posts, per account, the sum of its requests' amounts:
    the customers' prepaid draws and receivables against revenue by tier and token class, and
    the cost of making them against what the factory owes for it. The request_usage rows keep
    each request's share and name the posting."""
    groups: dict[tuple[str, date], list[Booking]] = defaultdict(list)
    for b in bookings:
        groups[(b.plan.currency, b.event.occurred_at.astimezone(UTC).date())].append(b)
    postings = []
    for (currency, _), group in groups.items():
        for first in range(0, len(group), REQUESTS_PER_POSTING):
            covered = group[first : first + REQUESTS_PER_POSTING]
            posting = _usage_posting(currency, covered)
            if posting is not None:
                postings.append((posting, covered))
    return postings


def _usage_posting(currency: str, covered: list[Booking]) -> Posting | None:
    sums: dict[str, Decimal] = defaultdict(Decimal)
    for b in covered:
        e = b.event
        sums[journal.prepaid(e.customer_id)] += b.prepaid_drawn
        sums[journal.receivable(e.customer_id)] += b.revenue - b.prepaid_drawn
        for c in TOKEN_CLASSES:
            sums[f"revenue:{e.tier}:{c}"] -= b.charge.amounts[c]
        sums["expense:energy"] += b.energy_cost
        sums["accrued:energy"] -= b.energy_cost
        sums["expense:compute"] += b.compute_cost
        sums["accrued:compute"] -= b.compute_cost
    legs = journal.legs(currency, *sums.items())
    if not legs:
        return None
    first = covered[0].event
    return Posting(
        # Named by the first completion it covers: a completion is booked once, so no other
        # usage posting can take that name.
        event_id=first.event_id,
        kind="usage",
        description=f"usage of {len(covered)} requests from completion {first.event_id}",
        effective_at=max(b.event.occurred_at for b in covered),
        legs=legs,
    )


@dataclass(frozen=True)
class Credit:
    """A credit to give: `amount` of a request's charge back to its customer, for `reason`."""

    customer_id: str
    request_id: str
    reason: str
    amount: Decimal
    currency: str
    event_id: str
    effective_at: datetime

    def posting(self) -> Posting:
        return Posting(
            event_id=self.event_id,
            kind=f"credit:{self.reason}",
            description=f"credit ({self.reason}) for request {self.request_id}",
            effective_at=self.effective_at,
            legs=journal.legs(
                self.currency,
                (f"credits:{self.reason}", self.amount),
                (journal.receivable(self.customer_id), -self.amount),
            ),
            customer_id=self.customer_id,
            request_id=self.request_id,
        )


async def give_credits(conn: asyncpg.Connection, credits: list[Credit]) -> int:
    """Insert `credits` and post each one that is new; a (request, reason) credited before is
    skipped, so a credit is given once whatever order or how often its events come."""
    # The first of each (request, reason): within one statement a later duplicate would be
    # skipped by the insert but still posted.
    firsts: dict[tuple[str, str], Credit] = {}
    for c in credits:
        if c.amount > 0:
            firsts.setdefault((c.request_id, c.reason), c)
    credits = list(firsts.values())
    if not credits:
        return 0
    rows = await conn.fetch(
        "INSERT INTO ledger.credits (credit_id, customer_id, request_id, reason, amount, "
        "currency, event_id) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], "
        "$4::text[], $5::numeric[], $6::text[], $7::text[]) "
        "ON CONFLICT (request_id, reason) DO NOTHING RETURNING request_id, reason",
        [new_id() for _ in credits],
        [c.customer_id for c in credits],
        [c.request_id for c in credits],
        [c.reason for c in credits],
        [c.amount for c in credits],
        [c.currency for c in credits],
        [c.event_id for c in credits],
    )
    given = {(r["request_id"], r["reason"]) for r in rows}
    await journal.write(conn, [c.posting() for c in credits if (c.request_id, c.reason) in given])
    return len(given)


async def book_completions(
    conn: asyncpg.Connection,
    completions: Sequence[Logged],
    booked_stream: str | None,
    slo: SloPolicy = NO_SLO,
) -> list[Booking]:
    """Log and book each completion once, in the caller's transaction.

    Only the first completion of a request the ledger sees is billed: a worker that died
    after publishing but before acknowledging runs the job again and publishes a second
    completion with a new event id. That first completion is the request's canonical one:
    UsageBooked names it, the intake shows its output, and only its verdict counts.
    """
    logged = await _append_new(conn, completions)
    return await book_logged(conn, logged, booked_stream, slo)  # type: ignore[arg-type]


async def book_logged(
    conn: asyncpg.Connection,
    completions: Sequence[JobCompleted],
    booked_stream: str | None,
    slo: SloPolicy = NO_SLO,
) -> list[Booking]:
    """Book completions the log has just taken, in log order, in the caller's transaction:
    the first of each request not booked before. Each booking's UsageBooked goes to the
    outbox for `booked_stream`; a replay passes None (the log it reads holds them already)."""
    fresh: dict[str, JobCompleted] = {}
    for event in completions:
        assert isinstance(event, JobCompleted), event
        if event.request_id not in fresh:
            fresh[event.request_id] = event
    if not fresh:
        return []
    await lock_customers(conn, (e.customer_id for e in fresh.values()))
    already = await conn.fetch(
        "SELECT request_id FROM ledger.request_usage WHERE request_id = ANY($1::text[])",
        list(fresh),
    )
    for row in already:
        del fresh[row["request_id"]]
    events = list(fresh.values())
    if not events:
        return []
    bookings = await _rate(conn, events)
    await _write_bookings(conn, bookings, booked_stream)
    await give_credits(conn, await _credits_at_booking(conn, bookings, slo))
    return bookings


async def _rate(conn: asyncpg.Connection, events: list[JobCompleted]) -> list[Booking]:
    """Rate `events` in order against their periods' positions, and draw prepaid credit."""
    plans = await versions_in_force(conn, [(e.customer_id, e.tier, e.submitted_at) for e in events])
    rate_book = await CostRateBook.read(conn)
    positions = await _lock_positions(
        conn, {(e.customer_id, period_of(e.submitted_at)) for e in events}
    )
    prepaid = await _lock_prepaid(
        conn, {(e.customer_id, p.currency) for e, p in zip(events, plans, strict=True)}
    )
    bookings = []
    for event, plan in zip(events, plans, strict=True):
        rates = rate_book.at(event.device, event.submitted_at)
        if rates.currency != plan.currency:
            raise ValueError(f"plan in {plan.currency} but cost rates in {rates.currency}")
        period = (event.customer_id, period_of(event.submitted_at))
        charge = rate_request(plan, positions[period], token_counts(event))
        positions[period] = charge.after
        wallet = (event.customer_id, plan.currency)
        drawn = min(prepaid.get(wallet, Decimal(0)), max(charge.total, Decimal(0)))
        if wallet in prepaid:
            prepaid[wallet] -= drawn
        usage = Usage(
            event.prompt_tokens, event.completion_tokens, event.energy.energy_j, event.compute_s
        )
        bookings.append(
            Booking(
                event,
                plan,
                rates,
                charge,
                energy_cost_of(usage, rates),
                compute_cost(usage, rates),
                drawn,
            )  # fmt: skip
        )
    await _save_positions(conn, positions)
    await _save_prepaid(conn, prepaid)
    return bookings


async def _lock_positions(
    conn: asyncpg.Connection, periods: set[tuple[str, date]]
) -> dict[tuple[str, date], PeriodPosition]:
    ordered = sorted(periods)
    customers, starts = [p[0] for p in ordered], [p[1] for p in ordered]
    await conn.execute(
        "INSERT INTO ledger.period_usage (customer_id, period_start) "
        "SELECT * FROM unnest($1::text[], $2::date[]) ON CONFLICT DO NOTHING",
        customers,
        starts,
    )
    rows = await conn.fetch(
        "SELECT u.* FROM ledger.period_usage u JOIN unnest($1::text[], $2::date[]) "
        "AS k(customer_id, period_start) USING (customer_id, period_start) "
        "ORDER BY u.customer_id, u.period_start FOR UPDATE OF u",
        customers,
        starts,
    )
    return {
        (r["customer_id"], r["period_start"]): PeriodPosition(
            r["tokens"],
            TokenCounts(
                r["charged_input_tokens"],
                r["charged_cached_input_tokens"],
                r["charged_output_tokens"],
            ),
        )
        for r in rows
    }


async def _save_positions(
    conn: asyncpg.Connection, positions: dict[tuple[str, date], PeriodPosition]
) -> None:
    items = sorted(positions.items())
    await conn.execute(
        "UPDATE ledger.period_usage u SET tokens = k.tokens, charged_input_tokens = k.ci, "
        "charged_cached_input_tokens = k.cc, charged_output_tokens = k.co "
        "FROM unnest($1::text[], $2::date[], $3::bigint[], $4::bigint[], $5::bigint[], "
        "$6::bigint[]) AS k(customer_id, period_start, tokens, ci, cc, co) "
        "WHERE u.customer_id = k.customer_id AND u.period_start = k.period_start",
        [k[0] for k, _ in items],
        [k[1] for k, _ in items],
        [p.tokens for _, p in items],
        [p.charged.input for _, p in items],
        [p.charged.cached_input for _, p in items],
        [p.charged.output for _, p in items],
    )


async def _lock_prepaid(
    conn: asyncpg.Connection, wallets: set[tuple[str, str]]
) -> dict[tuple[str, str], Decimal]:
    ordered = sorted(wallets)
    rows = await conn.fetch(
        "SELECT p.customer_id, p.currency, p.available FROM ledger.prepaid_positions p "
        "JOIN unnest($1::text[], $2::text[]) AS k(customer_id, currency) "
        "USING (customer_id, currency) ORDER BY p.customer_id, p.currency FOR UPDATE OF p",
        [w[0] for w in ordered],
        [w[1] for w in ordered],
    )
    return {(r["customer_id"], r["currency"]): r["available"] for r in rows}


async def _save_prepaid(conn: asyncpg.Connection, wallets: dict[tuple[str, str], Decimal]) -> None:
    if not wallets:
        return
    items = sorted(wallets.items())
    await conn.execute(
        "UPDATE ledger.prepaid_positions p SET available = k.available "
        "FROM unnest($1::text[], $2::text[], $3::numeric[]) AS k(customer_id, currency, available) "
        "WHERE p.customer_id = k.customer_id AND p.currency = k.currency",
        [k[0] for k, _ in items],
        [k[1] for k, _ in items],
        [v for _, v in items],
    )


async def _write_bookings(
    conn: asyncpg.Connection, bookings: list[Booking], booked_stream: str | None
) -> None:
    postings = usage_postings(bookings)
    posting_ids = await journal.write(conn, [p for p, _ in postings])
    posting_of = {
        b.event.event_id: posting_id
        for (_, covered), posting_id in zip(postings, posting_ids, strict=True)
        for b in covered
    }
    await conn.copy_records_to_table(
        "request_usage",
        schema_name="ledger",
        columns=USAGE_COLUMNS,
        records=[b.usage_row(posting_of.get(b.event.event_id)) for b in bookings],
    )
    if booked_stream is not None:
        await _queue_booked(conn, bookings, booked_stream)


async def _queue_booked(conn: asyncpg.Connection, bookings: list[Booking], stream: str) -> None:
    """Queue each booking's UsageBooked in the outbox in one statement, the events serialized
    directly, all of a batch occurring at the same instant, in the same trace."""
    now = utc_now()
    now_json = _DATETIME.dump_python(now, mode="json")
    trace = tracing.inject()
    rows = []
    for b in bookings:
        event_id = new_id()
        headers = {"event_id": event_id, "event_type": "usage.booked", **trace}
        rows.append((event_id, "usage.booked", stream, b.booked_json(event_id, now_json), headers))
    await conn.execute(
        f"INSERT INTO ledger.outbox {OUTBOX_COLUMNS} SELECT * FROM unnest($1::text[], "
        "$2::text[], $3::text[], $4::text[], $5::jsonb[])",
        *(list(column) for column in zip(*rows, strict=True)),
    )


async def _credits_at_booking(
    conn: asyncpg.Connection, bookings: list[Booking], slo: SloPolicy
) -> list[Credit]:
    """Credits a completion earns as it is booked: a defective verdict on it that arrived
    first, and a missed latency objective. Together never more than the charge."""
    defective = {
        r["completion_event_id"]
        for r in await conn.fetch(
            "SELECT completion_event_id FROM ledger.quality WHERE verdict = 'defective' "
            "AND completion_event_id = ANY($1::text[])",
            [b.event.event_id for b in bookings],
        )
    }
    return [
        _credit(b.event, "defective", b.revenue, b.plan.currency, b.event.event_id)
        if b.event.event_id in defective
        else _credit(b.event, "slo_ttft", slo.ttft_credit(b.event, b.revenue), b.plan.currency,
                     b.event.event_id)
        for b in bookings
    ]  # fmt: skip


def _credit(
    event: Event, reason: str, amount: Decimal, currency: str, cause_event_id: str
) -> Credit:
    return Credit(
        event.customer_id, event.request_id, reason, amount, currency, cause_event_id,
        event.occurred_at,
    )  # fmt: skip


async def apply_event(conn: asyncpg.Connection, logged: Logged) -> bool:
    """`apply_events` for one event: False if the log already had it."""
    return bool(await apply_events(conn, [logged]))


async def apply_events(conn: asyncpg.Connection, logged: Sequence[Logged]) -> set[str]:
    """Log a batch of events of any stream but the completions' and apply the new ones to the
    books, in the caller's transaction; return their ids. An event the log already had (a
    redelivery) changes nothing. The ledger's consumers and `tokenmill audit replay` both
    come here."""
    fresh = await _append_new(conn, logged)
    await apply_logged(conn, fresh)
    return {event.event_id for event in fresh}


async def _append_new(conn: asyncpg.Connection, logged: Sequence[Logged]) -> list[Event]:
    """Append `logged` to the log; return the events it did not have, each once, in order.

    An event published twice (a relay that crashed after publishing) can come twice in one
    batch: the log takes it once, and so must the books."""
    assert conn.is_in_transaction(), "the log append and the books commit together"
    new_ids = await append_events(conn, logged)
    fresh = {x.event.event_id: x.event for x in logged if x.event.event_id in new_ids}
    return list(fresh.values())


# The kinds of event, besides completions, that change the books; the log keeps every other
# kind and nothing more is done with it.
APPLIED_TYPES = frozenset(
    {"quality.verdict", "power.sample", "credit.prepaid_added", "energy.interval"}
)


async def apply_logged(conn: asyncpg.Connection, events: Sequence[Event]) -> None:
    """Apply events the log has just taken, none of them a completion, to the books.

    Each kind changes books of its own (verdicts: quality and their credits; power samples;
    prepaid top-ups: the wallets; energy intervals: the overhead accounts), and two events of a
    kind commute (verdicts on one completion: the first is kept and the credit is given once
    whichever gives it), so the events are applied kind by kind, verdicts, samples and energy
    intervals each as one set. Completions are the exception (their order rates them), which
    the callers keep: `refold.Segment` says how a replay places these around a batch of
    them."""
    by_type: dict[type, list[Event]] = defaultdict(list)
    for event in events:
        by_type[type(event)].append(event)
    await record_verdicts(conn, by_type.pop(QualityVerdict, []))  # type: ignore[arg-type]
    await record_power(conn, by_type.pop(PowerSample, []))  # type: ignore[arg-type]
    for event in by_type.pop(PrepaidCreditAdded, []):
        await record_prepaid(conn, event)  # type: ignore[arg-type]
    await record_energy(conn, by_type.pop(EnergyInterval, []))  # type: ignore[arg-type]


async def apply_completions(
    conn: asyncpg.Connection, logged: Sequence[Logged], booked_stream: str | None, slo: SloPolicy
) -> list[Booking]:
    """Log a batch of the completions stream and book its completions, in the caller's
    transaction. Failed jobs and other events of that stream are only logged."""
    completions = [x for x in logged if isinstance(x.event, JobCompleted)]
    await append_events(conn, [x for x in logged if not isinstance(x.event, JobCompleted)])
    return await book_completions(conn, completions, booked_stream, slo)


async def record_verdicts(conn: asyncpg.Connection, verdicts: Sequence[QualityVerdict]) -> None:
    """Keep each verdict on its completion, the first one where several judge it; the
    request's is its booked completion's (the ledger.request_quality view). A defective
    verdict on a booked completion credits what is left of that request's charge, once."""
    if not verdicts:
        return
    await lock_customers(conn, (v.customer_id for v in verdicts))
    await conn.execute(
        "INSERT INTO ledger.quality (completion_event_id, request_id, verdict, signals, event_id) "
        "SELECT c, r, v, s::jsonb, e FROM unnest($1::text[], $2::text[], $3::text[], "
        "$4::text[], $5::text[]) AS k(c, r, v, s, e) ON CONFLICT (completion_event_id) DO NOTHING",
        [v.completion_event_id for v in verdicts],
        [v.request_id for v in verdicts],
        [v.verdict for v in verdicts],
        # As JSON text: a list of lists would be taken for a two-dimensional array.
        [json.dumps([s.model_dump(mode="json") for s in v.signals]) for v in verdicts],
        [v.event_id for v in verdicts],
    )
    defective = [v for v in verdicts if v.verdict == "defective"]
    if not defective:
        return
    booked = {
        r["completion_event_id"]: r
        for r in await conn.fetch(
            "SELECT u.completion_event_id, u.currency, "
            "u.revenue - coalesce((SELECT sum(c.amount) FROM ledger.credits c "
            "WHERE c.request_id = u.request_id), 0) AS left FROM ledger.request_usage u "
            "WHERE u.completion_event_id = ANY($1::text[])",
            [v.completion_event_id for v in defective],
        )
    }
    await give_credits(
        conn,
        [
            _credit(v, "defective", row["left"], row["currency"], v.event_id)
            for v in defective
            if (row := booked.get(v.completion_event_id)) is not None
        ],
    )


async def record_prepaid(conn: asyncpg.Connection, event: PrepaidCreditAdded) -> None:
    """Post a prepaid top-up (cash in, held for the customer) and make it drawable."""
    await lock_customers(conn, [event.customer_id])
    await conn.execute(
        "INSERT INTO ledger.prepaid_positions (customer_id, currency, available) "
        "VALUES ($1, $2, $3) ON CONFLICT (customer_id, currency) "
        "DO UPDATE SET available = ledger.prepaid_positions.available + excluded.available",
        event.customer_id,
        event.currency,
        event.amount,
    )
    posting = Posting(
        event_id=event.event_id,
        kind="prepaid",
        description=f"prepaid credit added {event.reference}".strip()[:500],
        effective_at=event.occurred_at,
        legs=journal.legs(
            event.currency,
            ("cash", event.amount),
            (journal.prepaid(event.customer_id), -event.amount),
        ),
        customer_id=event.customer_id,
    )
    await journal.write(conn, [posting])


async def record_power(conn: asyncpg.Connection, samples: Sequence[PowerSample]) -> None:
    if not samples:
        return
    await conn.execute(
        "INSERT INTO ledger.power_samples (event_id, meter, device, estimated, window_start, "
        "window_end, energy_j, power_w, power_w_max) SELECT * FROM unnest($1::text[], "
        "$2::text[], $3::text[], $4::boolean[], $5::timestamptz[], $6::timestamptz[], "
        "$7::numeric[], $8::numeric[], $9::numeric[]) ON CONFLICT (event_id) DO NOTHING",
        [s.event_id for s in samples],
        [s.meter for s in samples],
        [s.device for s in samples],
        [s.estimated for s in samples],
        [s.window_start for s in samples],
        [s.window_end for s in samples],
        [s.energy_j for s in samples],
        [s.power_w for s in samples],
        [s.power_w_max for s in samples],
    )


# The factory-overhead accounts: energy no request pays for (idle, unbilled), and the facility's
# PUE overhead on it. Requests carry the PUE of their own joules in their energy cost.
OVERHEAD_ENERGY = "expense:factory_overhead:energy"
OVERHEAD_PUE = "expense:factory_overhead:pue"


async def record_energy(conn: asyncpg.Connection, intervals: Sequence[EnergyInterval]) -> None:
    """Book workers' energy intervals: their idle and unbilled joules, at the rates in force
    when each began, to the factory-overhead accounts, so that with the requests' energy cost
    the books hold metered J x PUE x tariff. Once per event id."""
    for event in intervals:
        if event.metered_j != event.attributed_j + event.idle_j:
            raise ValueError(
                f"energy interval {event.event_id}: metered_j {event.metered_j} is not "
                f"attributed_j {event.attributed_j} + idle_j {event.idle_j}"
            )
    if not intervals:
        return
    rate_book = await CostRateBook.read(conn)
    rows, postings = [], []
    for event in intervals:
        rates = rate_book.at(event.device, event.interval_start)
        overhead_j = event.idle_j + event.unbilled_j
        energy = joules_cost(overhead_j, replace(rates, pue=Decimal(1)))
        pue = joules_cost(overhead_j, rates) - energy
        if energy + pue > 0:
            postings.append(_overhead_posting(event, rates.currency, energy, pue))
        rows.append((
            event.event_id, event.worker, event.region, event.meter, event.device,
            event.estimated, event.interval_start, event.interval_end, event.metered_j,
            event.attributed_j, event.idle_j, event.unbilled_j, event.tokens, event.steps,
            rates.version, rates.energy_price_per_kwh, rates.pue, energy + pue,
            carbon_g(overhead_j, rates), rates.currency,
        ))  # fmt: skip
    posting_ids = await journal.write(conn, postings)
    posting_of = {p.event_id: pid for p, pid in zip(postings, posting_ids, strict=True)}
    await conn.executemany(
        "INSERT INTO ledger.energy_intervals (event_id, worker, region, meter, device, "
        "estimated, interval_start, interval_end, metered_j, attributed_j, idle_j, unbilled_j, "
        "tokens, steps, rates_version, energy_price_per_kwh, pue, overhead_cost, carbon_g, "
        "currency, posting_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, "
        "$14, $15, $16, $17, $18, $19, $20, $21) ON CONFLICT (event_id) DO NOTHING",
        [(*row, posting_of.get(row[0])) for row in rows],
    )


def _overhead_posting(
    event: EnergyInterval, currency: str, energy: Decimal, pue: Decimal
) -> Posting:
    return Posting(
        event_id=event.event_id,
        kind="energy_overhead",
        description=f"idle and unbilled energy of {event.worker} on {event.device}",
        effective_at=event.interval_end,
        legs=journal.legs(
            currency,
            (OVERHEAD_ENERGY, energy),
            (OVERHEAD_PUE, pue),
            ("accrued:energy", -(energy + pue)),
        ),
    )
