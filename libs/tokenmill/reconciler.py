"""The reconciler: Postgres, the source of truth, heals events that Redis lost.

Redis fsyncs its append-only file once a second, so a machine crash (not a process crash) can
lose the last second of stream entries while the outbox has already marked their rows
published: an accepted job would never run, a verdict or a booking never arrive. Each outbox
row records the entry id it was published as, and the reconciler republishes a row when both
hold:

- its downstream effect has not happened: an intake job event whose request is still queued
  and of which the ledger's log holds no progress; a quality verdict the ledger has not logged;
  a booking the intake or the ledger has not consumed;
- its entry is no longer in its stream (or the stream is gone).

Both are needed. An entry still in its stream is never republished: a long queue is not a
loss. And an entry that is gone is not necessarily lost: streams will be trimmed below what
every group has acknowledged and the ledger archived, and an entry every group acknowledged has
had its effect recorded in its consumers' inboxes (the ledger's log, the intake's inbox) or
moved the request past `queued`. The event is republished as it was, with the same event id,
so every consumer that did see it deduplicates it.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from redis.asyncio import Redis as RedisClient

from tokenmill.outage import stop_if_cancelled
from tokenmill.outbox import PublishBatch, mark_published
from tokenmill.settings import Settings
from tokenmill.streams import create_groups

log = logging.getLogger(__name__)

_COLUMNS = "o.seq, o.event_id, o.stream, o.body, o.headers, o.entry_id"

# Rows whose downstream effect is missing, by outbox schema. $1: seconds since publishing
# before a row is checked; $2: the cursor (last seq checked); $3: the batch size; $4 (inspector
# and ledger only): how far back rows are checked. A job event has no such bound: its request
# waits, queued, for as long as the intake that would heal it was down.
_CANDIDATES = {
    # The worker keeps no inbox: the effect of a job event is the request leaving `queued`,
    # which the intake learns from JobStarted. The ledger's log is checked too, so a JobStarted
    # the ledger has logged and the intake not yet consumed does not count as missing.
    "intake": f"""
        SELECT {_COLUMNS} FROM intake.requests r
        JOIN intake.outbox o ON o.body::jsonb ->> 'request_id' = r.request_id
            AND o.event_type = 'job.submitted'
        WHERE r.status = 'queued' AND o.entry_id IS NOT NULL AND o.seq > $2
          AND o.published_at < now() - make_interval(secs => $1)
          AND NOT EXISTS (SELECT 1 FROM ledger.events e WHERE e.request_id = r.request_id
                          AND e.event_type IN ('job.started', 'job.completed', 'job.failed'))
        ORDER BY o.seq LIMIT $3""",
    # Verdicts are consumed by the ledger alone.
    "inspector": f"""
        SELECT {_COLUMNS} FROM inspector.outbox o
        WHERE o.entry_id IS NOT NULL AND o.seq > $2
          AND o.published_at < now() - make_interval(secs => $1)
          AND o.published_at > now() - make_interval(secs => $4)
          AND NOT EXISTS (SELECT 1 FROM ledger.events e WHERE e.event_id = o.event_id)
        ORDER BY o.seq LIMIT $3""",
    # Bookings are consumed by the intake and logged by the ledger.
    "ledger": f"""
        SELECT {_COLUMNS} FROM ledger.outbox o
        WHERE o.entry_id IS NOT NULL AND o.seq > $2
          AND o.published_at < now() - make_interval(secs => $1)
          AND o.published_at > now() - make_interval(secs => $4)
          AND NOT (EXISTS (SELECT 1 FROM ledger.events e WHERE e.event_id = o.event_id)
                   AND EXISTS (SELECT 1 FROM intake.inbox i WHERE i.event_id = o.event_id))
        ORDER BY o.seq LIMIT $3""",
}
# One reconciler per schema at a time, however many replicas run: two would republish twice.
_LOCK_KEY = {"intake": 0x746D_7201, "inspector": 0x746D_7202, "ledger": 0x746D_7203}


class Reconciler:
    """Republishes `schema`'s published outbox events whose stream entries Redis lost."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: RedisClient,
        schema: str,
        publish: PublishBatch,
        settings: Settings,
        groups: list[tuple[str, str]],
    ):
        assert schema in _CANDIDATES, f"no reconcile rule for schema {schema!r}"
        self._pool = pool
        self._redis = redis
        self._schema = schema
        self._publish = publish
        self._groups = groups
        self._interval_s = settings.reconcile_interval_s
        self._after_s = settings.reconcile_after_s
        self._window_s = settings.reconcile_window_s
        self._batch_max = settings.reconcile_batch_max
        # Rows are checked in seq order a batch at a time, so a long queue of present entries
        # never hides a lost one behind it; the cursor wraps when a batch comes back short.
        self._cursor = 0

    async def run(self) -> None:
        while True:
            try:
                await self.reconcile_once()
            except Exception as exc:  # Redis or Postgres down: the next round tries again.
                stop_if_cancelled()
                log.warning("reconciler %s: %s", self._schema, exc)
            await asyncio.sleep(self._interval_s)

    async def reconcile_once(self) -> list[str]:
        """Check one batch of rows and republish the lost ones; return their event ids."""
        async with self._pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(
                "SELECT pg_try_advisory_xact_lock($1)", _LOCK_KEY[self._schema]
            ):
                return []
            query = _CANDIDATES[self._schema]
            window = (self._window_s,) if "$4" in query else ()
            rows = await conn.fetch(query, self._after_s, self._cursor, self._batch_max, *window)
            self._cursor = rows[-1]["seq"] if len(rows) == self._batch_max else 0
            lost = await self._lost(rows) if rows else []
            if not lost:
                return []
            entry_ids = await self._publish([(r["stream"], r["body"], r["headers"]) for r in lost])
            await mark_published(conn, self._schema, [r["seq"] for r in lost], entry_ids)
        for row, entry_id in zip(lost, entry_ids, strict=True):
            log.warning(
                "republished %s %s to %s: entry %s was lost, now %s",
                self._schema,
                row["event_id"],
                row["stream"],
                row["entry_id"],
                entry_id,
            )
        return [row["event_id"] for row in lost]

    async def _lost(self, rows: list[asyncpg.Record]) -> list[asyncpg.Record]:
        """The rows whose entries are gone from their streams, looked up in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for row in rows:
                pipe.exists(row["stream"])
                pipe.xrange(row["stream"], row["entry_id"], row["entry_id"], count=1)
            replies = await pipe.execute()
        streams_exist, entries = replies[::2], replies[1::2]
        gone = {
            row["stream"] for row, exists in zip(rows, streams_exist, strict=True) if not exists
        }
        # Redis lost whole streams, their consumer groups with them: recreate the groups first,
        # or the republished entries would reach no consumer.
        await create_groups(self._redis, [(s, g) for s, g in self._groups if s in gone])
        return [row for row, entry in zip(rows, entries, strict=True) if not entry]
