"""Transactional outbox: events are written with the state change that caused them, then relayed.

A service that changes Postgres and must tell others about it never publishes inside its
transaction. It queues the event in its schema's `outbox` table in the same transaction, and
the relay publishes committed rows to Redis afterwards. So an accepted job is never lost while
Redis is down, and an event is never published for a change that rolled back. The relay may
publish a row twice (a crash between XADD and marking the row); the event id stays the same,
and every consumer deduplicates on it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable

import asyncpg

from tokenmill.db import listening
from tokenmill.events import Event
from tokenmill.outage import OutageBackoff, is_outage, stop_if_cancelled
from tokenmill.settings import Settings
from tokenmill.streams import event_headers

log = logging.getLogger(__name__)

# Publishes a batch of (stream, body, headers) rows, all or raise; returns their entry ids.
PublishBatch = Callable[[list[tuple[str, str, dict[str, str]]]], Awaitable[list[str]]]

RETRY_DELAY_S_MAX = 5.0


def _channel(schema: str) -> str:
    # The same name the outbox_notify trigger (migrations/0001_core.sql) notifies.
    assert re.fullmatch(r"[a-z_]+", schema), schema
    return f"{schema}_outbox"


OUTBOX_COLUMNS = "(event_id, event_type, stream, body, headers)"


def outbox_values(stream: str, event: Event) -> tuple[str, str, str, str, dict[str, str]]:
    """The values of `event`'s outbox row, in OUTBOX_COLUMNS order."""
    return event.event_id, event.type, stream, event.canonical_json(), event_headers(event)


async def enqueue(conn: asyncpg.Connection, schema: str, stream: str, event: Event) -> None:
    """Queue `event` for `stream`; call inside the transaction that made the change."""
    assert conn.is_in_transaction(), "enqueue outside a transaction could publish a rollback"
    await conn.execute(
        f"INSERT INTO {schema}.outbox {OUTBOX_COLUMNS} VALUES ($1, $2, $3, $4, $5)",
        *outbox_values(stream, event),
    )


async def mark_published(
    conn: asyncpg.Connection, schema: str, seqs: list[int], entry_ids: list[str]
) -> None:
    """Record that rows `seqs` were published now as the stream entries `entry_ids`."""
    assert len(seqs) == len(entry_ids), (seqs, entry_ids)
    await conn.execute(
        f"UPDATE {schema}.outbox o SET published_at = now(), entry_id = p.entry_id "
        "FROM unnest($1::bigint[], $2::text[]) AS p(seq, entry_id) WHERE o.seq = p.seq",
        seqs,
        entry_ids,
    )


class OutboxRelay:
    """Publishes committed outbox rows in order, waking on NOTIFY and polling as a fallback."""

    def __init__(self, pool: asyncpg.Pool, schema: str, publish: PublishBatch, settings: Settings):
        self._pool = pool
        self._schema = schema
        self._publish = publish
        self._batch_max = settings.outbox_batch_max
        self._poll_s = settings.outbox_poll_s
        self._wake = asyncio.Event()
        # An outage of Redis or Postgres is logged when it starts and ends, not per retry.
        self._backoff = OutageBackoff(
            f"outbox relay {schema}",
            settings.outage_backoff_s_min,
            RETRY_DELAY_S_MAX,
            settings.outage_log_interval_s,
        )

    async def run(self) -> None:
        async with listening(self._pool, _channel(self._schema), self._on_notify):
            await self._relay_forever()

    async def _relay_forever(self) -> None:
        while True:
            self._wake.clear()
            try:
                published = await self.publish_batch()
            except Exception as exc:  # The rows stay unpublished: retry them later.
                stop_if_cancelled()
                if is_outage(exc):
                    await self._backoff.failed(exc)
                else:
                    log.exception("outbox relay %s failed; retrying", self._schema)
                    await asyncio.sleep(RETRY_DELAY_S_MAX)
                continue
            self._backoff.answered()
            if published < self._batch_max:
                await self._wait()

    async def publish_batch(self) -> int:
        """Publish up to one batch of unpublished rows; return how many were published."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"SELECT seq, stream, body, headers FROM {self._schema}.outbox "
                "WHERE published_at IS NULL ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
                self._batch_max,
            )
            if rows:
                entry_ids = await self._publish(
                    [(r["stream"], r["body"], r["headers"]) for r in rows]
                )
                await mark_published(conn, self._schema, [r["seq"] for r in rows], entry_ids)
        assert len(rows) <= self._batch_max
        return len(rows)

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def _wait(self) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that
        # arrives as the wake-up does, and the relay would outlive its service's shutdown.
        try:
            async with asyncio.timeout(self._poll_s):
                await self._wake.wait()
        except TimeoutError:
            pass
