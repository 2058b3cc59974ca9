"""Retention: trim the Redis streams and prune the outbox and inbox tables, never losing work.

Redis is transport, not the record, but a stream entry is the only copy of an event until its
consumers have handled it. So a stream is trimmed (XTRIM MINID) only below the lowest entry
that every one of its consumer groups still needs:

- a group needs its lowest pending entry (delivered, not acknowledged: a claimer retries it)
  and every entry after its last-delivered id (not read yet);
- the ledger's group must be among them: the ledger acknowledges an entry only after the
  transaction that logged it committed, so below its floor every entry is archived in
  ledger.events. A stream without a ledger group, or without any group, is never trimmed.

Each stream also keeps at least its newest `entries` entries and everything younger than
`seconds` (Settings.stream_keep_entries_min / stream_keep_s, per stream in stream_keep), so an
operator can still read recent traffic. Plain MAXLEN trimming would drop pending entries.

Outbox rows are deleted once published and older than the keep window, which is never shorter
than the reconciler's (it may republish a row within reconcile_window_s of publishing), and an
intake job event never while its request is queued (the reconciler heals those for as long).
An inbox row (the consumer's record of an event id it applied) is deleted once it is older than
the keep window and older than the first entry left in its stream: an event can only come back
as a stream entry still there, or republished by the reconciler within its window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg
from redis.asyncio import Redis as RedisClient

from tokenmill.outage import stop_if_cancelled
from tokenmill.settings import Settings
from tokenmill.streams import Streams

log = logging.getLogger(__name__)

ARCHIVE_GROUP = "ledger"
SCHEMAS = ("intake", "inspector", "ledger")
# Only one pruner at a time: two would only race to delete the same rows.
_LOCK_KEY = 0x746D_7274
_STREAM_KEEP = re.compile(r"^([a-z0-9._-]+)=(\d+):(\d+(?:\.\d+)?)$")


class RetentionConfigError(ValueError):
    """Settings.stream_keep is malformed."""


@dataclass(frozen=True)
class Keep:
    entries: int
    seconds: float


@dataclass
class StreamTrim:
    """What trimming one stream did (or, on a dry run, would do), and why it stopped there."""

    stream: str
    length: int
    floor_id: str | None  # Entries below this id go; None: nothing may go.
    reason: str
    trimmed: int = 0


def keep_by_stream(settings: Settings, streams: list[str]) -> dict[str, Keep]:
    """Each stream's retention: the default, or its override in `stream_keep`."""
    default = Keep(settings.stream_keep_entries_min, settings.stream_keep_s)
    overrides: dict[str, Keep] = {}
    for item in filter(None, (part.strip() for part in settings.stream_keep.split(","))):
        match = _STREAM_KEEP.match(item)
        if match is None:
            raise RetentionConfigError(
                f"stream_keep item {item!r} is not NAME=ENTRIES:SECONDS, e.g. booked=1000:86400"
            )
        overrides[f"{settings.stream_prefix}.{match[1]}"] = Keep(int(match[2]), float(match[3]))
    unknown = set(overrides) - set(streams)
    if unknown:
        raise RetentionConfigError(f"stream_keep names unknown streams: {sorted(unknown)}")
    return {stream: overrides.get(stream, default) for stream in streams}


def _next_id(entry_id: str) -> str:
    milliseconds, _, sequence = entry_id.partition("-")
    return f"{milliseconds}-{int(sequence or 0) + 1}"


def _id_key(entry_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = entry_id.partition("-")
    return int(milliseconds), int(sequence or 0)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def acknowledged_floor(redis: RedisClient, stream: str) -> tuple[str | None, str]:
    """The lowest entry id some group still needs (None: keep everything), and why."""
    groups = await redis.xinfo_groups(stream)
    names = [_text(group["name"]) for group in groups]
    if ARCHIVE_GROUP not in names:
        return None, f"no {ARCHIVE_GROUP} group: nothing is archived"
    floors = []
    for group in groups:
        name = _text(group["name"])
        summary = await redis.xpending(stream, name)
        if summary["pending"]:
            floors.append((_text(summary["min"]), f"{name} has {summary['pending']} pending"))
        else:
            last = _text(group["last-delivered-id"])
            floors.append((_next_id(last), f"{name} has read up to {last}"))
    return min(floors, key=lambda floor: _id_key(floor[0]))


async def plan_trim(redis: RedisClient, stream: str, keep: Keep, now_ms: int) -> StreamTrim:
    length = await redis.xlen(stream)
    floor_id, reason = await acknowledged_floor(redis, stream)
    if floor_id is None or length <= keep.entries:
        return StreamTrim(stream, length, None, reason if floor_id is None else "keep entries")
    limits = [(floor_id, reason), (f"{now_ms - int(keep.seconds * 1000)}-0", "keep seconds")]
    if keep.entries:
        newest = await redis.xrevrange(stream, count=keep.entries)
        limits.append((_text(newest[-1][0]), f"keep {keep.entries} entries"))
    floor_id, reason = min(limits, key=lambda limit: _id_key(limit[0]))
    return StreamTrim(stream, length, floor_id, reason)


async def trim_streams(
    redis: RedisClient, settings: Settings, *, dry_run: bool = False
) -> list[StreamTrim]:
    """Trim every stream of the platform below what may go; on a dry run, count it only."""
    streams = Streams(settings.stream_prefix).all(settings.region)
    keeps = keep_by_stream(settings, streams)
    now_ms = int(time.time() * 1000)
    results = []
    for stream in streams:
        if not await redis.exists(stream):
            continue
        plan = await plan_trim(redis, stream, keeps[stream], now_ms)
        if plan.floor_id is not None:
            if dry_run:
                # Bounded: a dry run on a huge backlog counts up to the batch limit.
                below = await redis.xrange(
                    stream, "-", f"({plan.floor_id}", count=settings.retention_batch_max
                )
                plan.trimmed = len(below)
            else:
                plan.trimmed = await redis.xtrim(stream, minid=plan.floor_id, approximate=False)
        assert plan.trimmed <= plan.length
        results.append(plan)
    return results


# Published outbox rows past the window, by schema; $1: keep seconds, $2: batch size.
_OUTBOX_PRUNE = """
    DELETE FROM {schema}.outbox WHERE seq IN (
        SELECT o.seq FROM {schema}.outbox o
        WHERE o.published_at IS NOT NULL AND o.published_at < now() - make_interval(secs => $1)
          {extra}
        ORDER BY o.published_at LIMIT $2)"""
_OUTBOX_EXTRA = {
    "intake": """AND NOT (o.event_type = 'job.submitted' AND EXISTS (
            SELECT 1 FROM intake.requests r
            WHERE r.request_id = o.body::jsonb ->> 'request_id' AND r.status = 'queued'))""",
    "inspector": "",
    "ledger": "",
}
_INBOX_PRUNE = """
    DELETE FROM {schema}.inbox WHERE event_id IN (
        SELECT event_id FROM {schema}.inbox
        WHERE stream = $1 AND received_at < to_timestamp($2) LIMIT $3)"""


@dataclass
class Pruned:
    schema: str
    outbox_rows: int
    inbox_rows: int


async def prune_tables(
    pool: asyncpg.Pool, redis: RedisClient, settings: Settings, *, dry_run: bool = False
) -> list[Pruned]:
    """Delete up to a batch of prunable outbox and inbox rows per schema; a dry run counts
    them and rolls back."""
    oldest_s = await _oldest_entries_s(redis, settings)
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            # Another pruner holds the lock: it is doing this round's work.
            locked = await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK_KEY)
            results = await _prune(conn, settings, oldest_s) if locked else []
        except BaseException:
            await transaction.rollback()
            raise
        await (transaction.rollback() if dry_run else transaction.commit())
    return results


async def _prune(
    conn: asyncpg.Connection, settings: Settings, oldest_s: dict[str, float]
) -> list[Pruned]:
    outbox_keep_s = max(settings.outbox_keep_s, settings.reconcile_window_s)
    inbox_keep_s = max(settings.inbox_keep_s, settings.reconcile_window_s)
    results = []
    for schema in SCHEMAS:
        outbox = await conn.fetch(
            _OUTBOX_PRUNE.format(schema=schema, extra=_OUTBOX_EXTRA[schema]) + " RETURNING 1",
            outbox_keep_s,
            settings.retention_batch_max,
        )
        inbox = 0
        for stream, oldest in oldest_s.items():
            rows = await conn.fetch(
                _INBOX_PRUNE.format(schema=schema) + " RETURNING 1",
                stream,
                min(time.time() - inbox_keep_s, oldest),
                settings.retention_batch_max,
            )
            inbox += len(rows)
        results.append(Pruned(schema, len(outbox), inbox))
    return results


async def _oldest_entries_s(redis: RedisClient, settings: Settings) -> dict[str, float]:
    """Per stream, the time (Unix s) of its first entry left: inbox rows of events received
    before it cannot come back from the stream. A stream that is gone or empty gives now."""
    oldest = {}
    for stream in Streams(settings.stream_prefix).all(settings.region):
        first = await redis.xrange(stream, count=1)
        oldest[stream] = _id_key(_text(first[0][0]))[0] / 1000 if first else time.time()
    return oldest


async def apply(
    pool: asyncpg.Pool, redis: RedisClient, settings: Settings, *, dry_run: bool
) -> dict[str, object]:
    """One retention round: the streams first, then the tables that depend on them."""
    trims = await trim_streams(redis, settings, dry_run=dry_run)
    pruned = await prune_tables(pool, redis, settings, dry_run=dry_run)
    return {
        "dry_run": dry_run,
        "streams": [asdict(trim) for trim in trims],
        "tables": [asdict(prune) for prune in pruned],
    }


async def run(pool: asyncpg.Pool, redis: RedisClient, settings: Settings) -> None:
    """The ledger's retention loop: one round every `retention_interval_s`."""
    while True:
        try:
            result = await apply(pool, redis, settings, dry_run=False)
            trimmed = sum(trim["trimmed"] for trim in result["streams"])
            if trimmed:
                log.info("retention: trimmed %d stream entries", trimmed)
        except Exception as exc:  # Redis or Postgres down: the next round tries again.
            stop_if_cancelled()
            log.warning("retention: %s", exc)
        await asyncio.sleep(settings.retention_interval_s)


def add_commands(commands: argparse._SubParsersAction) -> None:
    """`tokenmill streams trim [--dry-run] [--json]`."""
    streams = commands.add_parser("streams", help="stream retention")
    actions = streams.add_subparsers(dest="streams_command", required=True)
    trim = actions.add_parser(
        "trim", help="trim streams below what every group acknowledged and the ledger archived"
    )
    trim.add_argument("--dry-run", action="store_true", help="count what would go, change nothing")
    trim.add_argument("--json", action="store_true", help="machine-readable output")


async def command(settings: Settings, args: argparse.Namespace) -> str:
    assert args.streams_command == "trim"
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    redis = RedisClient.from_url(settings.redis_url)
    try:
        result = await apply(pool, redis, settings, dry_run=args.dry_run)
    finally:
        await redis.aclose()
        await pool.close()
    return json.dumps(result, indent=2) if args.json else _text_report(result)


def _text_report(result: dict[str, Any]) -> str:
    verb = "would trim" if result["dry_run"] else "trimmed"
    lines = []
    for trim in result["streams"]:
        below = f"below {trim['floor_id']}" if trim["floor_id"] else "nothing"
        lines.append(
            f"{trim['stream']}: {verb} {trim['trimmed']} of {trim['length']} entries "
            f"({below}; limit: {trim['reason']})"
        )
    verb = "would prune" if result["dry_run"] else "pruned"
    for table in result["tables"]:
        lines.append(
            f"{table['schema']}: {verb} {table['outbox_rows']} outbox rows, "
            f"{table['inbox_rows']} inbox rows"
        )
    return "\n".join(lines) or "no streams yet"
