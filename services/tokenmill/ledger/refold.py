"""The fold of `tokenmill audit replay`: the log's events applied to scratch books by the live
books code, split by customer over processes.

Only the events that change the books are read (`APPLIED_TYPES`); the rest (a job submitted
or started, a booking announced) are counted on the server. They are applied in segments
(`Segment`): completions in log order, the other events as sets around them.

The books of different customers are independent (each has its own periods, wallets, plans
and credits; the journal accounts they share are only added to), so the log's customers are
split into lanes by a hash of their id, and each lane folds its customers' events in a
process of its own, on a connection of its own: rating is Python work, and one process would
leave every core but one to the database alone. Live documents (a batch of finalized
invoices, a credit-note sweep) are numbered across customers, so they split the log into
stages: every lane folds the log up to the document's place, then the document is re-issued
once, by this process, and the lanes go on. The ledger's SLO policy (`ledger.slo_policy`)
applies to every customer, so every lane reads each one and books the completions logged after
it under it.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from itertools import groupby
from typing import TYPE_CHECKING

import asyncpg

from tokenmill.db import connect
from tokenmill.events import (
    Event,
    JobCompleted,
    JobFailed,
    PrepaidCreditAdded,
    QualityVerdict,
    SloPolicySet,
    parse_event,
)
from tokenmill.ledger import books, invoices
from tokenmill.ledger.billing import Period

if TYPE_CHECKING:  # Not imported at run time: it brings the PDF renderer, a lane needs none.
    from tokenmill.ledger.commands import Progress

# The kinds of event that change the books, and the ledger's SLO policy, which changes how
# later completions are booked; every other kind is only counted.
SLO_POLICY = "ledger.slo_policy"
APPLIED_TYPES = sorted({"job.completed", SLO_POLICY, *books.APPLIED_TYPES})
# Events of a lane read from the log per round trip.
LOG_CHUNK_ROWS = 20_000
# Completions booked per call; larger than the live consumer's batches because nothing waits
# on them (a summary posting is split at its own limit).
BATCH_MAX = 5_000
# Events applied at once (one transaction), at most.
SEGMENT_EVENTS_MAX = 20_000
# Lanes (processes) a fold runs at most; by default it runs one more than the cores.
LANES_MAX = 8
DOCUMENT_BATCH = 100
# The cyclic garbage collector's thresholds while a lane folds (the defaults are 700, 10, 10).
FOLD_GC_THRESHOLDS = (50_000, 20, 100)
# How often the progress bar is brought up to date while the lanes fold.
PROGRESS_EVERY_S = 0.5

# A lane's events of a stage, a chunk at a time: those that change the books, of the
# customers whose id hashes to the lane, and every SLO policy (it applies to every customer).
_LANE_EVENTS = (
    "SELECT seq, event_id, body FROM ledger.events WHERE seq > $1 AND seq <= $2 "
    "AND event_type = ANY($3::text[]) AND (event_type = $7 "
    "OR mod(hashtext(customer_id)::bigint + 2147483648, $4) = $5) ORDER BY seq LIMIT $6"
)
# The first event that changes the books recorded after a document, from a seq on: the
# document is re-issued before it, as it was issued live before it was logged.
_FIRST_AFTER = (
    "SELECT min(seq) FROM ledger.events WHERE seq > $1 AND seq <= $2 AND recorded_at > $3 "
    "AND event_type = ANY($4::text[])"
)


@dataclass(frozen=True)
class Document:
    """A live invoice finalization or credit-note issue, to re-do at its place in the fold."""

    at: datetime
    number: str
    kind: str  # "invoice" | "credit_note"
    customer_id: str
    period: Period | None
    currency: str


async def documents(live: asyncpg.Connection) -> list[Document]:
    rows = await live.fetch(
        "SELECT finalized_at AS at, number, 'invoice' AS kind, customer_id, period, currency "
        "FROM ledger.invoices WHERE status = 'finalized' UNION ALL "
        "SELECT issued_at, number, 'credit_note', customer_id, NULL, currency "
        "FROM ledger.credit_notes ORDER BY at, number"
    )
    return [
        Document(
            r["at"],
            r["number"],
            r["kind"],
            r["customer_id"],
            Period(r["period"]) if r["period"] else None,
            r["currency"],
        )  # fmt: skip
        for r in rows
    ]


def document_groups(docs: list[Document]) -> list[list[Document]]:
    """The documents in runs that one live transaction issued (one time, kind and period)."""
    return [list(run) for _, run in groupby(docs, key=lambda d: (d.at, d.kind, d.period))]


@dataclass
class Segment:
    """Logged events to apply at once, in an order that gives the books applying them one by
    one in log order would, with as few statements as can.

    Completions keep their log order: it rates them and decides what prepaid credit each
    draws. Every other event that changes the books commutes with the completions of other
    requests, so it is applied before them, in one set (`books.apply_logged`), except a
    verdict on a completion earlier in the segment, which is applied after them: before its
    completion is booked a defective verdict makes the booking credit the whole charge,
    after it the verdict credits what is left after any latency credit, and the credits must
    come out as they did live. A prepaid top-up changes what its customer's later completions
    draw, so one that comes after the segment's first completion starts a new segment."""

    before: list[Event] = field(default_factory=list)
    completions: list[JobCompleted] = field(default_factory=list)
    after: list[Event] = field(default_factory=list)
    _completed: set[str] = field(default_factory=set)

    @property
    def events(self) -> int:
        return len(self.before) + len(self.completions) + len(self.after)

    def takes(self, event: Event) -> bool:
        """Whether `event` can join this segment, keeping the order that matters."""
        if self.events >= SEGMENT_EVENTS_MAX:
            return False
        return not (isinstance(event, PrepaidCreditAdded) and self._completed)

    def add(self, event: Event) -> None:
        assert self.takes(event), event
        if isinstance(event, JobCompleted):
            self.completions.append(event)
            self._completed.add(event.event_id)
        elif isinstance(event, QualityVerdict) and event.completion_event_id in self._completed:
            self.after.append(event)
        else:
            self.before.append(event)


class Fold:
    """Applies logged events and live documents to the scratch books through the live code,
    on one connection."""

    def __init__(self, scratch: asyncpg.Connection, slo: books.SloPolicy) -> None:
        self.scratch, self.slo = scratch, slo
        self.segment = Segment()
        self._applying: asyncio.Task | None = None

    async def event(self, event: Event) -> None:
        """Apply a logged event that changes the books, with the segment it joins; an SLO
        policy applies to the completions logged after it."""
        if isinstance(event, SloPolicySet):
            await self.flush()
            self.slo = books.SloPolicy.logged(event)
            return
        if not self.segment.takes(event):
            await self.flush()
        self.segment.add(event)

    async def flush(self) -> None:
        """Start applying the segment, once the one before it is applied: the lane reads and
        parses the next segment meanwhile."""
        await self.settle()
        segment, self.segment = self.segment, Segment()
        if segment.events:
            self._applying = asyncio.create_task(self._apply(segment, self.slo))

    async def settle(self) -> None:
        """Wait until every segment started is applied."""
        if self._applying is not None:
            applying, self._applying = self._applying, None
            await applying

    async def drain(self) -> None:
        """Apply every event so far: the books are then those of the log up to here."""
        await self.flush()
        await self.settle()

    def abandon(self) -> None:
        """Stop applying (the fold failed; its scratch books are dropped)."""
        if self._applying is not None:
            self._applying.cancel()

    async def _apply(self, segment: Segment, slo: books.SloPolicy) -> None:
        conn = self.scratch
        async with conn.transaction():
            await books.apply_logged(conn, segment.before)
            for first in range(0, len(segment.completions), BATCH_MAX):
                batch = segment.completions[first : first + BATCH_MAX]
                await books.book_logged(conn, batch, None, slo)
            await books.apply_logged(conn, segment.after)

    async def unlogged(self, extra: list[books.Logged]) -> None:
        """Log and apply events the log lacks (the streams hold them) through the live
        consumers' entry points, one at a time in their order."""
        await self.drain()
        for logged in extra:
            async with self.scratch.transaction():
                if isinstance(logged.event, JobCompleted | JobFailed):
                    await books.apply_completions(self.scratch, [logged], None, self.slo)
                else:
                    await books.apply_event(self.scratch, logged)

    async def documents(self, docs: list[Document]) -> None:
        """Re-issue `docs` (one live transaction's: one time, kind and period) with the live
        code; a document that comes out differently (or not at all) is found by the diff."""
        await self.drain()
        first = docs[0]
        year = first.at.astimezone(UTC).year
        if first.kind == "credit_note":
            # One customer at a time, in the live numbers' order: within one sweep the live
            # code orders notes by invoice id, which a replay cannot reproduce.
            for doc in docs:
                await invoices.issue_credit_notes(
                    self.scratch, DOCUMENT_BATCH, doc.customer_id, year
                )
            return
        assert first.period is not None
        await invoices.open_drafts_for_unbilled(self.scratch, first.period)
        drafts = await self.scratch.fetch(
            "SELECT d.invoice_id FROM ledger.invoices d JOIN unnest($2::text[], $3::text[]) "
            "AS k(customer_id, currency) USING (customer_id, currency) "
            "WHERE d.period = $1 AND d.status = 'draft'",
            first.period.start,
            [d.customer_id for d in docs],
            [d.currency for d in docs],
        )
        if drafts:
            # One batch, as live: its numbers follow the same order (customer, currency).
            ids = [r["invoice_id"] for r in drafts]
            await invoices.finalize_batch(self.scratch, first.period, ids, year)


# --- the lanes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LaneJob:
    """What one lane folds in one stage: its customers' events with seqs in (after, upto]."""

    live_url: str
    scratch_url: str
    # The SLO policy in force at `after`: the last one logged by then, or else the replay's.
    slo: books.SloPolicy
    lanes: int
    lane: int = 0
    after: int = 0
    upto: int = 0
    # Event id → text to fold instead of the log's (`--source redis`); None: the log's.
    bodies: dict[str, str] | None = None


# Events folded by every lane so far, shared with the process that shows the progress.
_folded: multiprocessing.sharedctypes.Synchronized | None = None  # type: ignore[name-defined]


def _share_progress(folded: multiprocessing.sharedctypes.Synchronized) -> None:  # type: ignore[name-defined]
    global _folded
    _folded = folded


def fold_lane(job: LaneJob) -> None:
    """Fold one lane's share of a stage (in a lane process)."""
    return asyncio.run(_fold_lane(job))


async def _fold_lane(job: LaneJob) -> None:
    live, scratch = await connect(job.live_url), await connect(job.scratch_url)
    fold = Fold(scratch, job.slo)
    try:
        with _collecting_rarely():
            try:
                async for bodies in _lane_bodies(live, job):
                    folded = 0
                    for body in bodies:
                        event = parse_event(body)
                        await fold.event(event)
                        # Every lane reads each policy: it is counted as folded once.
                        folded += job.lane == 0 or not isinstance(event, SloPolicySet)
                    if _folded is not None:
                        with _folded.get_lock():
                            _folded.value += folded
                await fold.drain()
            finally:
                fold.abandon()
    finally:
        await live.close()
        await scratch.close()


async def _lane_bodies(live: asyncpg.Connection, job: LaneJob) -> AsyncIterator[list[str]]:
    """The texts of the lane's events of the stage, in log order, a chunk at a time."""
    after = job.after
    while True:
        rows = await live.fetch(
            _LANE_EVENTS, after, job.upto, APPLIED_TYPES, job.lanes, job.lane, LOG_CHUNK_ROWS,
            SLO_POLICY,
        )  # fmt: skip
        if not rows:
            return
        after = rows[-1]["seq"]
        if job.bodies is None:
            yield [r["body"] for r in rows]
        else:
            yield [job.bodies.get(r["event_id"], r["body"]) for r in rows]


@contextmanager
def _collecting_rarely() -> Iterator[None]:
    """Collect cyclic garbage rarely, and never walk the objects that were alive before.

    A fold allocates millions of short-lived objects (events, bookings, rows) and makes no
    cycles of its own, so frequent collections only walk the same live objects again and
    again: a fold's CPU time was 20 to 35 % lower this way in A/B runs of `bench.replay`."""
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*FOLD_GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


# --- the whole fold -----------------------------------------------------------------------


async def fold(
    live: asyncpg.Connection,
    scratch: asyncpg.Connection,
    job: LaneJob,
    extra: list[books.Logged],
    progress: Progress | None,
) -> Counter:
    """Fold the log as it is now (then `extra`, events only the streams hold) into the
    scratch books, re-issuing each live document at its place; return the events replayed,
    by type."""
    end = await live.fetchval("SELECT coalesce(max(seq), 0) FROM ledger.events")
    replayed = Counter(
        {
            r[0]: r[1]
            for r in await live.fetch(
                "SELECT event_type, count(*) FROM ledger.events WHERE seq <= $1 "
                "GROUP BY event_type",
                end,
            )
        }
    )
    if progress is not None:
        progress.start(sum(replayed[t] for t in APPLIED_TYPES) + len(extra))
    here = Fold(scratch, await books.slo_policy_at(live, end) or job.slo)
    stages, after_log = await _stages(live, await documents(live), end)
    spawn = multiprocessing.get_context("spawn")  # Not fork: this process has connections.
    folded = spawn.Value("q", 0)
    with _lane_processes(job.lanes, spawn, folded) as pool:
        after = 0
        for upto, group in stages:
            slo = await books.slo_policy_at(live, after) or job.slo
            stage = replace(job, after=after, upto=upto, slo=slo)
            await _fold_stage(pool, stage, folded, progress)
            if group:
                await here.documents(group)
            after = upto
    await here.unlogged(extra)
    for group in after_log:
        await here.documents(group)
    replayed.update(logged.event.type for logged in extra)
    if progress is not None and extra:
        progress.advance(len(extra))
    return replayed


async def _stages(
    live: asyncpg.Connection, docs: list[Document], end: int
) -> tuple[list[tuple[int, list[Document]]], list[list[Document]]]:
    """The stages of the fold: (last seq, the documents issued after it) in log order, the
    last stage ending at `end` with none; and the documents issued after every event."""
    stages: list[tuple[int, list[Document]]] = []
    groups = document_groups(docs)
    upto = 0
    while groups:
        first_after = await live.fetchval(_FIRST_AFTER, upto, end, groups[0][0].at, APPLIED_TYPES)
        if first_after is None:
            break
        upto = first_after - 1
        stages.append((upto, groups.pop(0)))
    stages.append((end, []))
    return stages, groups


@contextmanager
def _lane_processes(
    lanes: int,
    context: multiprocessing.context.SpawnContext,
    folded: multiprocessing.sharedctypes.Synchronized,  # type: ignore[name-defined]
) -> Iterator[ProcessPoolExecutor | None]:
    """A process per lane, or None for one lane: it then runs here (a process would only add
    its start, a second or so of imports)."""
    if lanes == 1:
        _share_progress(folded)
        yield None
        return
    with ProcessPoolExecutor(
        lanes, mp_context=context, initializer=_share_progress, initargs=(folded,)
    ) as pool:
        yield pool


async def _fold_stage(
    pool: ProcessPoolExecutor | None,
    job: LaneJob,
    folded: multiprocessing.sharedctypes.Synchronized,  # type: ignore[name-defined]
    progress: Progress | None,
) -> None:
    """Run every lane over the stage and wait for all of them, showing their progress."""
    if job.upto <= job.after:
        return
    if pool is None:
        lanes = [asyncio.ensure_future(_fold_lane(job))]
    else:
        loop = asyncio.get_running_loop()
        lanes = [
            loop.run_in_executor(pool, fold_lane, replace(job, lane=lane))
            for lane in range(job.lanes)
        ]
    pending = set(lanes)
    while pending:
        _, pending = await asyncio.wait(pending, timeout=PROGRESS_EVERY_S)
        if progress is not None:
            progress.advance(folded.value - progress.done)
    for lane in lanes:
        lane.result()  # A lane's failure is the fold's.


def lanes_here() -> int:
    """The lanes to fold in on this machine: one more than its cores, at most LANES_MAX.

    A lane waits for the database about half its time. With the database on the same 2 cores,
    2, 3 and 4 lanes folded a month of 1,000,000 requests at 69,836, 68,754 and 65,575
    events/s: the cores are full from two lanes on, and a lane more costs little. With the
    database on a machine of its own, the lane more keeps a core busy while another waits."""
    return max(1, min(LANES_MAX, (os.cpu_count() or 1) + 1))
