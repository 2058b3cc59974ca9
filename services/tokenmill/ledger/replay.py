"""`tokenmill audit replay`: rebuild the books from the event log and diff them with the live ones.

The books are a fold over the log: every projection (request_usage, the journal, credits,
period and prepaid positions, invoice drafts) is written by `books.apply_event` and
`books.apply_completions` as each event is logged, and nothing else writes them. A replay runs
the same code (`books.book_logged` and `books.apply_logged`, which those two call after the
log append) over the log's events (`ledger/refold.py`: in log order where it matters, in
lanes of customers, one process each), into a **scratch database**
migrated by the same migrations, so the database's own rules (the double-entry check, the
draft-opening triggers, each credit's period) take part exactly as they do live. A scratch
schema would need every `ledger.` name in our SQL, triggers and functions parameterized; a
scratch database needs none of it, and so it cannot drift from the live code. It is created
per run (`<database>_replay_<id>`) and dropped after, unless `--keep`.

Prices, cost rates and customer plans are not derived from events (operators set them): they
are copied from the live database before the fold. The latency objectives the credits depend on
are in the log (`ledger.slo_policy`, logged by the ledger as it starts); a log from before they
were logged is folded under this replay's settings until the first. Finalized invoices and
credit notes are operator actions too: each is re-issued by the live code
(`invoices.finalize_batch`, `invoices.issue_credit_notes`) at its place in the fold, before the
first event the log recorded after it, in its original year's series, so its number, lines and
totals must come out the same.

The fold always takes the whole log, from its beginning (rating positions and prepaid
balances carry over from earlier months, so a fold cannot start mid-way without a trusted
snapshot) to its end (a credit note on a window's invoice may be caused by a later verdict);
the comparison covers the window `--from`..`--to`. Live usage
is posted in summary per booked batch, and a replay batches differently, so postings are not
compared one by one. What is compared does not depend on batching:

- each request completed in the window: its sub-ledger row (rating, tokens, charge per class,
  cost, margin, plan version);
- each credit caused by an event of the window;
- each account's balance at the start of the window's first day, and its movement on each
  UTC day the window touches (a summary posting covers one day of one batch, so a day's sum per
  account is the same however the requests were batched);
- each finalized invoice and credit note of a period that overlaps the window: number,
  customer, period, currency, totals and every line.

Known limit: a booking that commits while a finalization runs may be billed live on either
side of it (original or supplement); a replay places it by its log time, and reports the
invoices' lines as different if live placed it the other way.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from redis.asyncio import Redis as RedisClient
from redis.exceptions import ResponseError

from tokenmill.batches import _unpack
from tokenmill.db import connect, migrate
from tokenmill.events import new_id, parse_event
from tokenmill.ledger import books, refold
from tokenmill.ledger.commands import Progress
from tokenmill.settings import Settings
from tokenmill.signing import SIGNATURE_HEADER, SigningKeys
from tokenmill.streams import Streams

# Operator-set tables the books are computed from: copied, not rebuilt.
# In an order that copies a referenced table before the tables referring to it.
REFERENCE_TABLES = (
    "price_book",
    "cost_rates",
    "tariff_hours",
    "price_plans",
    "price_bands",
    "customer_plans",
)
STREAM_FETCH_ENTRIES = 10_000
DIFF_CHUNK_ROWS = 50_000
# The ledger's pending entries listed per stream: more than this many in flight at once means
# the ledger is far behind, and a replay should wait for it.
PENDING_LISTED_MAX = 100_000
SOURCES = ("log", "redis")


class ReplayInputError(ValueError):
    """Bad input to `audit replay`: said to the operator (exit status 2), nothing changed."""


@dataclass(frozen=True)
class Window:
    time_from: datetime
    time_to: datetime

    @classmethod
    def parse(cls, time_from: str, time_to: str | None, now: datetime) -> Window:
        start = parse_time("--from", time_from)
        end = parse_time("--to", time_to) if time_to else now
        if end <= start:
            raise ReplayInputError(
                f"--to {end.isoformat()} must be later than --from {start.isoformat()}"
            )
        return cls(start, end)

    @property
    def first_day(self) -> datetime:
        """The start of the window's first UTC day: balances are compared per whole day."""
        utc = self.time_from.astimezone(UTC)
        return datetime(utc.year, utc.month, utc.day, tzinfo=UTC)

    @property
    def last_day_end(self) -> datetime:
        """The end of the last UTC day the window touches."""
        utc = (self.time_to - timedelta(microseconds=1)).astimezone(UTC)
        return datetime(utc.year, utc.month, utc.day, tzinfo=UTC) + timedelta(days=1)


def parse_time(flag: str, text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ReplayInputError(
            f"{flag} {text!r} is not an ISO 8601 date or time (e.g. 2026-11-01 or "
            "2026-11-01T00:00:00Z)"
        ) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


@dataclass
class Report:
    window: Window
    source: str
    scratch: str
    events: Counter = field(default_factory=Counter)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    totals: dict[str, dict[str, str]] = field(default_factory=dict)
    differences: list[str] = field(default_factory=list)
    archive: dict[str, int] = field(default_factory=dict)
    fold_s: float = 0.0
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.differences

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "from": self.window.time_from.isoformat(),
            "to": self.window.time_to.isoformat(),
            "source": self.source,
            "scratch_database": self.scratch,
            "events_replayed": dict(sorted(self.events.items())),
            "counts": self.counts,
            "totals": self.totals,
            "archive": self.archive,
            "differences": self.differences,
            "fold_s": round(self.fold_s, 3),
            "elapsed_s": round(self.elapsed_s, 3),
        }

    def text(self) -> str:
        lines = [
            f"replay {self.window.time_from.isoformat()} .. {self.window.time_to.isoformat()} "
            f"from the {self.source} into {self.scratch} ({self.elapsed_s:.1f} s, of which "
            f"the fold {self.fold_s:.1f} s)",
            "events replayed: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.events.items()))
            + f" (total {sum(self.events.values())})",
        ]
        for what, pair in self.counts.items():
            lines.append(f"{what}: live {pair['live']}, rebuilt {pair['rebuilt']}")
        for key, pair in _customers_summed(self.totals).items():
            lines.append(f"total {key}: live {pair['live']}, rebuilt {pair['rebuilt']}")
        if self.archive:
            lines.append(
                "archive vs streams: " + ", ".join(f"{k} {v}" for k, v in self.archive.items())
            )
        if self.ok:
            lines.append("OK: the rebuilt books equal the live books and the issued invoices")
        else:
            lines.append(f"DIFFERENT: {len(self.differences)} differences")
            lines += [f"  {d}" for d in self.differences]
        return "\n".join(lines)


def _customers_summed(totals: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """The totals with the customers' accounts summed per kind and currency (a month has
    thousands of customers: `--json` lists each)."""
    summed: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    accounts: Counter = Counter()
    for key, pair in totals.items():
        words = key.split(" ")
        if words[0] == "balance" and words[1].startswith("customer:"):
            key = f"balance customers' {words[1].rsplit(':', 1)[1]} {words[2]}"
            accounts[key] += 1
        for side, value in pair.items():
            summed[key][side] += Decimal(value)
    return {
        (f"{key} ({accounts[key]} accounts)" if key in accounts else key): {
            side: str(value) for side, value in pair.items()
        }
        for key, pair in sorted(summed.items())
    }


# --- the scratch database -----------------------------------------------------------------


def scratch_url(database_url: str, name: str) -> str:
    return urlunsplit(urlsplit(database_url)._replace(path=f"/{name}"))


async def create_scratch(live: asyncpg.Connection, database_url: str) -> tuple[str, str]:
    """Create and migrate a scratch database on the live server, and copy the reference
    tables into it; return its name and URL."""
    current = await live.fetchval("SELECT current_database()")
    name = f"{current[:40]}_replay_{new_id().lower()[-10:]}"
    await live.execute(f'CREATE DATABASE "{name}"')
    # A scratch database is dropped if the server crashes mid-replay: no commit waits for the
    # disk.
    await live.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    url = scratch_url(database_url, name)
    await migrate(url, quiet=True)
    scratch = await asyncpg.connect(url)
    try:
        await _unlog_tables(scratch)
        async with scratch.transaction():
            tables = ", ".join(f"ledger.{t}" for t in REFERENCE_TABLES)
            # The migrations seed launch prices; the live tables hold them (or their successors).
            await scratch.execute(f"TRUNCATE {tables}")
            for table in REFERENCE_TABLES:
                buffer = io.BytesIO()
                await live.copy_from_table(table, schema_name="ledger", output=buffer,
                                           format="binary")  # fmt: skip
                buffer.seek(0)
                await scratch.copy_to_table(table, schema_name="ledger", source=buffer,
                                            format="binary")  # fmt: skip
    finally:
        await scratch.close()
    return name, url


async def _unlog_tables(scratch: asyncpg.Connection) -> None:
    """Make the scratch books unlogged: nothing written to them goes through the write-ahead
    log, which at a month's scale cost the server a tenth of the fold's time (its pages are
    written whole again after each checkpoint). They are not crash-safe, and need not be: a
    crash ends the replay, and the next one starts from a new scratch database."""
    tables = {
        r["name"]
        for r in await scratch.fetch(
            "SELECT oid::regclass::text AS name FROM pg_class "
            "WHERE relnamespace = 'ledger'::regnamespace AND relkind = 'r'"
        )
    }
    references = await scratch.fetch(
        "SELECT conrelid::regclass::text AS referring, confrelid::regclass::text AS referred "
        "FROM pg_constraint WHERE contype = 'f' AND conrelid <> confrelid "
        "AND connamespace = 'ledger'::regnamespace"
    )
    # A logged table may not refer to an unlogged one: a table goes after those referring to it.
    while tables:
        referred = {r["referred"] for r in references if r["referring"] in tables}
        ready = tables - referred
        assert ready, f"foreign keys in a cycle: {sorted(tables)}"
        for table in sorted(ready):
            await scratch.execute(f"ALTER TABLE {table} SET UNLOGGED")
        tables -= ready


async def drop_scratch(live: asyncpg.Connection, name: str) -> None:
    await live.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- the diff -----------------------------------------------------------------------------

# The columns of a request's sub-ledger row that a replay compares.
_REQUEST_COLUMNS = """request_id, completion_event_id, customer_id, tier, model, currency,
       plan_id, plan_version, price_version, prompt_tokens, completion_tokens,
       cached_prompt_tokens, charged_input_tokens, charged_cached_input_tokens,
       charged_output_tokens, revenue_input, revenue_cached_input, revenue_output, revenue,
       energy_j, energy_cost, compute_cost, cost, margin, submitted_at, completed_at"""
_IN_WINDOW = "completed_at >= $1 AND completed_at < $2"
# The window's requests after an id (up to another), each as its id and a digest of its
# compared columns: only the rows whose digests differ are read whole.
_REQUEST_DIGESTS = f"""
SELECT request_id, md5(ROW({_REQUEST_COLUMNS})::text)
FROM ledger.request_usage WHERE {_IN_WINDOW}
  AND request_id > $3 AND ($4::text IS NULL OR request_id <= $4)
ORDER BY request_id LIMIT $5
"""
_REQUESTS = f"SELECT {_REQUEST_COLUMNS} FROM ledger.request_usage WHERE request_id = ANY($1)"
_REQUEST_TOTALS = f"""
SELECT currency, count(*), sum(revenue) AS revenue, sum(cost) AS cost
FROM ledger.request_usage WHERE {_IN_WINDOW} GROUP BY currency
"""
# A credit's time is its cause's (an event's occurred_at), which its posting carries: the
# scratch database holds no log to look it up in.
_CREDITS = """
SELECT coalesce(c.request_id, c.event_id) AS request_id, c.reason, c.customer_id, c.amount,
       c.currency, c.period
FROM ledger.credits c JOIN ledger.postings p
  ON p.event_id = c.event_id AND p.kind = 'credit:' || c.reason
WHERE p.effective_at >= $1 AND p.effective_at < $2
"""
_OPENING = """
SELECT l.account_id, l.currency, sum(l.amount) AS amount
FROM ledger.posting_legs l JOIN ledger.postings p USING (posting_id)
WHERE p.effective_at < $1 GROUP BY 1, 2
"""
_DAYS = """
SELECT l.account_id, l.currency, (p.effective_at AT TIME ZONE 'UTC')::date AS day,
       sum(l.amount) AS amount
FROM ledger.posting_legs l JOIN ledger.postings p USING (posting_id)
WHERE p.effective_at >= $1 AND p.effective_at < $2 GROUP BY 1, 2, 3
"""
_INVOICES = """
SELECT i.number, i.customer_id, i.period, i.currency, i.supplement_of IS NOT NULL AS supplement,
       i.included_tokens, i.used_tokens, i.subtotal, i.credits_total, i.total,
       (SELECT coalesce(array_agg(ARRAY[l.line_no::text, l.kind, l.model, l.tier, l.plan_id,
               l.plan_version, l.token_class, l.reason, l.requests::text, l.tokens::text,
               l.charged_tokens::text, l.amount_exact::text, l.amount::text]
               ORDER BY l.line_no), '{}')
        FROM ledger.invoice_lines l WHERE l.invoice_id = i.invoice_id) AS lines
FROM ledger.invoices i
WHERE i.status = 'finalized' AND i.period < $2::date
  AND i.period + interval '1 month' > $1::date
"""
_CREDIT_NOTES = """
SELECT n.number, i.number AS invoice, n.customer_id, n.currency, n.total,
       (SELECT coalesce(array_agg(ARRAY[l.line_no::text, l.reason, l.requests::text,
               l.amount_exact::text, l.amount::text] ORDER BY l.line_no), '{}')
        FROM ledger.credit_note_lines l WHERE l.credit_note_id = n.credit_note_id) AS lines
FROM ledger.credit_notes n JOIN ledger.invoices i USING (invoice_id)
WHERE i.period < $2::date AND i.period + interval '1 month' > $1::date
"""


def _keyed(rows: list[asyncpg.Record], key: Callable[[asyncpg.Record], Any]) -> dict[Any, dict]:
    return {key(r): dict(r) for r in rows}


def _diff(what: str, live: dict[Any, dict], rebuilt: dict[Any, dict], out: list[str]) -> None:
    """Every key on one side only, and every field that differs, as one line each."""
    for key in sorted(live.keys() | rebuilt.keys(), key=str):
        name = key if isinstance(key, str) else " ".join(map(str, key))
        if key not in rebuilt:
            out.append(f"{what} {name}: in the live books, not rebuilt from the log")
        elif key not in live:
            out.append(f"{what} {name}: rebuilt from the log, not in the live books")
        else:
            for column, value in live[key].items():
                if rebuilt[key].get(column) != value:
                    out.append(
                        f"{what} {name}: {column} live {_show(value)}, "
                        f"rebuilt {_show(rebuilt[key].get(column))}"
                    )


def _show(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


async def _balances(conn: asyncpg.Connection, window: Window) -> dict[Any, dict]:
    balances: dict[Any, dict] = {}
    for r in await conn.fetch(_OPENING, window.first_day):
        balances[(r["account_id"], r["currency"], "opening")] = {"amount": r["amount"]}
    for r in await conn.fetch(_DAYS, window.first_day, window.last_day_end):
        balances[(r["account_id"], r["currency"], r["day"].isoformat())] = {"amount": r["amount"]}
    return balances


async def diff(
    live: asyncpg.Connection, scratch: asyncpg.Connection, window: Window, report: Report
) -> None:
    span = (window.time_from, window.time_to)
    day_span = (window.time_from.astimezone(UTC).date(), window.time_to.astimezone(UTC).date())
    totals: dict[str, dict[str, Decimal]] = {"live": defaultdict(Decimal),
                                             "rebuilt": defaultdict(Decimal)}  # fmt: skip
    await _diff_requests(live, scratch, span, report, totals)
    sides = {}
    for side, conn in (("live", live), ("rebuilt", scratch)):
        sides[side] = {
            "credits": _keyed(
                await conn.fetch(_CREDITS, *span), lambda r: (r["request_id"], r["reason"])
            ),
            "balance": await _balances(conn, window),
            "invoice": _keyed(await conn.fetch(_INVOICES, *day_span), lambda r: r["number"]),
            "credit note": _keyed(
                await conn.fetch(_CREDIT_NOTES, *day_span), lambda r: r["number"]
            ),
        }
        _add_totals(sides[side], totals[side])
    for what in ("credits", "balance", "invoice", "credit note"):
        live_rows, rebuilt_rows = sides["live"][what], sides["rebuilt"][what]
        report.counts[what] = {"live": len(live_rows), "rebuilt": len(rebuilt_rows)}
        _diff(what.rstrip("s"), live_rows, rebuilt_rows, report.differences)
    for key in sorted(totals["live"].keys() | totals["rebuilt"].keys()):
        report.totals[key] = {
            "live": str(totals["live"].get(key, 0)),
            "rebuilt": str(totals["rebuilt"].get(key, 0)),
        }


async def _diff_requests(
    live: asyncpg.Connection,
    scratch: asyncpg.Connection,
    span: tuple[datetime, datetime],
    report: Report,
    totals: dict[str, dict[str, Decimal]],
) -> None:
    """Diff the window's sub-ledger rows a range of request ids at a time (a month holds
    millions: both sides whole would not fit in memory) by their digests, reading whole only
    the rows that differ; add up their totals."""
    counts = {"live": 0, "rebuilt": 0}
    for side, conn in (("live", live), ("rebuilt", scratch)):
        for row in await conn.fetch(_REQUEST_TOTALS, *span):
            counts[side] += row["count"]
            totals[side][f"revenue {row['currency']}"] += row["revenue"]
            totals[side][f"cost {row['currency']}"] += row["cost"]
    report.counts["requests"] = counts
    after: str = ""
    while True:
        live_rows = await live.fetch(_REQUEST_DIGESTS, *span, after, None, DIFF_CHUNK_ROWS)
        full = len(live_rows) == DIFF_CHUNK_ROWS
        upto = live_rows[-1][0] if full else None
        rebuilt_rows = await scratch.fetch(_REQUEST_DIGESTS, *span, after, upto, None)
        live_digests, rebuilt_digests = dict(live_rows), dict(rebuilt_rows)
        differ = [
            request_id
            for request_id in live_digests.keys() | rebuilt_digests.keys()
            if live_digests.get(request_id) != rebuilt_digests.get(request_id)
        ]
        if differ:
            keyed = [
                _keyed(await conn.fetch(_REQUESTS, differ), lambda r: r["request_id"])
                for conn in (live, scratch)
            ]
            _diff("request", *keyed, report.differences)
        if upto is None:
            break
        after = upto


def _add_totals(side: dict[str, dict[Any, dict]], totals: dict[str, Decimal]) -> None:
    """Per currency: the credits of the window; per account and currency: its balance at the
    end of the last day the window touches."""
    for row in side["credits"].values():
        totals[f"credits {row['currency']}"] += row["amount"]
    for (account, currency, _), row in side["balance"].items():
        totals[f"balance {account} {currency}"] += row["amount"]


# --- the streams as a source --------------------------------------------------------------


@dataclass
class StreamCopy:
    """What the streams hold, against the log: bodies to replay, events only they hold."""

    bodies: dict[str, str] = field(default_factory=dict)
    only_in_streams: list[books.Logged] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


async def read_streams(
    redis: RedisClient, live: asyncpg.Connection, settings: Settings, report: Report
) -> StreamCopy:
    """Compare each stream's entries with the log, event by event: entries the log lacks
    (not counting those still in flight to the ledger), logged events the stream lacks, and
    payloads that differ. Entries whose signature fails are counted, not compared: the
    ledger dead-letters them."""
    keys = SigningKeys.parse(settings.signing_keys)
    copy = StreamCopy()
    for stream in Streams(settings.stream_prefix).all(settings.region):
        in_flight = await _in_flight(redis, stream)
        seen = {}
        async for entry_id, body, headers in _entries(redis, stream):
            if keys.refusal(body, headers.get(SIGNATURE_HEADER)) is not None:
                copy.counts["refused by signature"] += 1
                continue
            event = parse_event(body)
            seen[event.event_id] = (entry_id, body.decode(), event)
        copy.counts["stream entries"] += len(seen)
        # Streams are trimmed from their head: a logged event the stream lacks is missing if
        # the log holds, before it, an event the stream still has; older ones were trimmed.
        logged = {
            r["event_id"]: r["body"]
            for r in await live.fetch(
                "SELECT event_id, body FROM ledger.events WHERE stream = $1 AND seq >= "
                "(SELECT min(seq) FROM ledger.events WHERE event_id = ANY($2::text[]))",
                stream,
                list(seen),
            )
        }
        for event_id, (entry_id, body, event) in seen.items():
            if event_id not in logged:
                if entry_id in in_flight or _after(entry_id, in_flight.get("last")):
                    copy.counts["in flight to the ledger"] += 1
                    continue
                report.differences.append(
                    f"stream {stream} entry {entry_id}: event {event_id} is in the stream, "
                    "not in the log"
                )
                copy.only_in_streams.append(books.Logged(event, stream, body))
            elif logged[event_id] != body:
                report.differences.append(
                    f"stream {stream} entry {entry_id}: event {event_id} payload differs "
                    "from the log's"
                )
            copy.bodies[event_id] = body
        for event_id in logged.keys() - seen.keys():
            report.differences.append(
                f"log event {event_id} of {stream}: in the log, not in the stream"
            )
            copy.counts["in the log only"] += 1
    copy.only_in_streams.sort(key=lambda x: x.event.occurred_at)
    return copy


async def _in_flight(redis: RedisClient, stream: str) -> dict[str, str]:
    """The ledger group's pending entry ids, and its last-delivered id as "last"."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:  # No such stream: nothing is in flight on it.
        return {}
    found: dict[str, str] = {}
    for group in groups:
        name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
        if name != "ledger":
            continue
        last = group["last-delivered-id"]
        found["last"] = last.decode() if isinstance(last, bytes) else last
        for pending in await redis.xpending_range(stream, "ledger", "-", "+", PENDING_LISTED_MAX):
            message_id = pending["message_id"]
            found[message_id.decode() if isinstance(message_id, bytes) else message_id] = "p"
    return found


def _after(entry_id: str, last: str | None) -> bool:
    """Whether `entry_id` comes after the ledger group's last-delivered id (None: there is
    no ledger group, so nothing is on its way to the log)."""
    if last is None:
        return False
    return tuple(map(int, entry_id.split("-"))) > tuple(map(int, last.split("-")))


async def _entries(redis: RedisClient, stream: str) -> AsyncIterator[tuple[str, bytes, dict]]:
    start = "-"
    while True:
        page = await redis.xrange(stream, min=start, count=STREAM_FETCH_ENTRIES)
        if not page:
            return
        for entry_id, fields in page:
            body, headers = _unpack(fields)
            yield entry_id.decode(), body, headers
        last = page[-1][0].decode()
        ms, n = last.split("-")
        start = f"{ms}-{int(n) + 1}"
        if len(page) < STREAM_FETCH_ENTRIES:
            return


# --- the command --------------------------------------------------------------------------


async def replay(
    settings: Settings,
    window: Window,
    *,
    source: str = "log",
    keep: bool = False,
    progress: Progress | None = None,
    lanes: int | None = None,
) -> Report:
    """Rebuild the books from the log (or the streams' copy of it) in `lanes` processes (one
    more than the cores by default) and diff them."""
    assert source in SOURCES, source
    lanes = lanes or refold.lanes_here()
    started = time.perf_counter()
    live = await connect(settings.database_url)
    report = Report(window, source, "")
    try:
        copy = None
        if source == "redis":
            redis = RedisClient.from_url(settings.redis_url)
            try:
                copy = await read_streams(redis, live, settings, report)
            finally:
                await redis.aclose()
            report.archive = dict(copy.counts)
        name, url = await create_scratch(live, settings.database_url)
        report.scratch = name
        try:
            scratch = await connect(url)
            try:
                bodies, extra = (copy.bodies, copy.only_in_streams) if copy else (None, [])
                fold_started = time.perf_counter()
                slo = books.SloPolicy.from_settings(settings)
                job = refold.LaneJob(settings.database_url, url, slo, lanes, bodies=bodies)
                report.events = await refold.fold(live, scratch, job, extra, progress)
                report.fold_s = time.perf_counter() - fold_started
                await diff(live, scratch, window, report)
            finally:
                await scratch.close()
        finally:
            if not keep:
                await drop_scratch(live, name)
    finally:
        await live.close()
    report.elapsed_s = time.perf_counter() - started
    return report


def add_command(actions: argparse._SubParsersAction) -> None:
    replay_ = actions.add_parser(
        "replay", help="rebuild the books from the event log and diff them with the live ones"
    )
    replay_.add_argument(
        "--from",
        dest="time_from",
        required=True,
        metavar="T1",
        help="start of the window compared (ISO 8601; UTC if no offset)",
    )
    replay_.add_argument(
        "--to",
        dest="time_to",
        default=None,
        metavar="T2",
        help="end of the window, exclusive (default: now)",
    )
    replay_.add_argument(
        "--source",
        choices=SOURCES,
        default="log",
        help="log (default), or redis: the streams' entries where they hold "
        "them, checked against the log",
    )
    replay_.add_argument("--keep", action="store_true", help="keep the scratch database")
    replay_.add_argument(
        "--progress",
        action="store_true",
        help="show progress on stderr even when it is not a terminal",
    )
    replay_.add_argument(
        "--lanes",
        type=int,
        default=None,
        metavar="N",
        help=f"fold in N processes, customers split among them (1 to {refold.LANES_MAX}; "
        "default: one more than the cores)",
    )
    replay_.add_argument("--json", action="store_true", help="machine-readable output")


def window_of(args: argparse.Namespace, now: datetime | None = None) -> Window:
    """The window the arguments name; raises ReplayInputError before anything is touched."""
    return Window.parse(args.time_from, args.time_to, now or datetime.now(UTC))


def lanes_of(args: argparse.Namespace) -> int:
    """The lanes the arguments ask for; raises ReplayInputError before anything is touched."""
    if args.lanes is None:
        return refold.lanes_here()
    if not 1 <= args.lanes <= refold.LANES_MAX:
        raise ReplayInputError(f"--lanes {args.lanes} is not between 1 and {refold.LANES_MAX}")
    return args.lanes


async def command(settings: Settings, args: argparse.Namespace) -> tuple[str, bool]:
    window, lanes = window_of(args), lanes_of(args)
    show = args.progress or sys.stderr.isatty()
    progress = Progress(sys.stderr, "replay") if show else None
    report = await replay(
        settings, window, source=args.source, keep=args.keep, progress=progress, lanes=lanes
    )
    text = json.dumps(report.as_json(), indent=2) if args.json else report.text()
    return text, report.ok
