"""Stream names, consumer-group bootstrap, publishing, and at-least-once consumption.

Delivery model: every consumer group reads new entries with XREADGROUP and, beside that
reader, runs a claimer (XAUTOCLAIM) that takes over entries left pending by a consumer that
died. An entry is acknowledged only after its handler committed; an entry delivered more than
`max_deliveries` times, or one that does not parse as an event, is moved to the stream's
dead-letter stream with its reason and acknowledged, so one bad entry never blocks a group.

Every entry is signed where it is published (`publish`) and verified before its handler runs;
an unsigned or badly signed entry goes to the dead letters with the reason, so the books only
ever contain events a holder of the deployment's signing key published.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from faststream import AckPolicy
from faststream.redis import Redis, RedisBroker, RedisStreamMessage, StreamSub
from pydantic import ValidationError
from redis.asyncio import Redis as RedisClient
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, ResponseError

from tokenmill import tracing
from tokenmill.events import Event, parse_event
from tokenmill.outage import OutageBackoff, is_outage
from tokenmill.settings import Settings
from tokenmill.signing import SIGNATURE_HEADER, SigningKeys

log = logging.getLogger(__name__)

# How long a reader blocks in XREADGROUP, and how long a claimer sleeps after a scan that
# found nothing idle. Short enough for sub-second hand-offs between services.
POLL_INTERVAL_MS = 100

# Gives back the delivery an outage cost: only while this consumer still owns the entry, and in
# one step, so a claimer taking the entry meanwhile keeps both the entry and its own count.
# XCLAIM with JUSTID does not count a delivery itself; RETRYCOUNT sets the counter.
UNCOUNT_DELIVERY_LUA = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #pending == 0 or pending[1][2] ~= ARGV[2] then return -1 end
local count = math.max(tonumber(pending[1][4]) - 1, 0)
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'RETRYCOUNT', count, 'JUSTID')
return count
"""


@dataclass(frozen=True)
class Streams:
    """Every stream name, derived from one prefix so deployments and test runs never mix."""

    prefix: str

    def jobs(self, region: str) -> str:
        return f"{self.prefix}.jobs.{region}"

    @property
    def progress(self) -> str:
        return f"{self.prefix}.progress"

    @property
    def completions(self) -> str:
        return f"{self.prefix}.completions"

    @property
    def quality(self) -> str:
        return f"{self.prefix}.quality"

    @property
    def power(self) -> str:
        return f"{self.prefix}.power"

    @property
    def booked(self) -> str:
        return f"{self.prefix}.booked"

    @property
    def billing(self) -> str:
        """Money events an operator causes (prepaid credit top-ups): not tied to a request."""
        return f"{self.prefix}.billing"

    @property
    def control(self) -> str:
        """Power control: cap changes (operator or grid signal) and curtailment decisions."""
        return f"{self.prefix}.control"

    @property
    def ledger(self) -> str:
        """Not a Redis stream: the name the ledger logs its own events under (its SLO policy)."""
        return f"{self.prefix}.ledger"

    @staticmethod
    def dead_letters(stream: str) -> str:
        return f"{stream}.dlq"

    def all(self, region: str) -> list[str]:
        return [
            self.jobs(region),
            self.progress,
            self.completions,
            self.quality,
            self.power,
            self.booked,
            self.billing,
            self.control,
        ]

    def groups(self, region: str) -> list[tuple[str, str]]:
        """Every (stream, consumer group) pair of the platform, for bootstrap.

        The ledger reads every stream: its event log is the whole history, the source an
        audit replays.
        """
        return [
            (self.jobs(region), "worker"),
            (self.progress, "intake"),
            (self.completions, "intake"),
            (self.completions, "inspector"),
            (self.booked, "intake"),
            # The power controller applies cap changes a grid signal publishes here.
            (self.control, "telemetry"),
        ] + [(stream, "ledger") for stream in self.all(region)]


async def create_groups(redis: RedisClient, pairs: list[tuple[str, str]]) -> None:
    """Create each consumer group at the start of its stream, before any consumer runs.

    A group created at "0" sees every entry already in the stream, so nothing published
    before the first consumer started is skipped (FastStream would create it at "$").
    """
    for stream, group in pairs:
        try:
            await redis.xgroup_create(stream, group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


async def prune_consumers(
    redis: RedisClient, pairs: list[tuple[str, str]], idle_ms_min: int
) -> int:
    """Delete consumers that hold no pending entries and were idle at least `idle_ms_min`.

    Every process names its consumer after host and pid, so restarts leave names behind.
    Only empty ones are deleted: nothing pending is ever dropped, and a live consumer that
    happens to be removed is recreated by its next read. Returns how many were deleted.
    """
    deleted = 0
    for stream, group in pairs:
        for consumer in await redis.xinfo_consumers(stream, group):
            if consumer["pending"] == 0 and consumer["idle"] >= idle_ms_min:
                await redis.xgroup_delconsumer(stream, group, consumer["name"])
                deleted += 1
    return deleted


async def publish(
    broker: RedisBroker,
    stream: str,
    body: str,
    headers: dict[str, str],
    keys: SigningKeys,
    pipeline: Pipeline | None = None,
) -> None:
    """Publish `body` signed with the deployment's signing key: every producer comes here."""
    signed = {**headers, SIGNATURE_HEADER: keys.sign(body.encode())}
    # No MAXLEN here: Redis is transport, not the record, and trimming by length could drop
    # entries some group has not acknowledged yet.
    await broker.publish(body, stream=stream, headers=signed, pipeline=pipeline)


async def publish_event(broker: RedisBroker, stream: str, event: Event, keys: SigningKeys) -> None:
    await publish(broker, stream, event.canonical_json(), event_headers(event), keys)


def event_headers(event: Event) -> dict[str, str]:
    return {"event_id": event.event_id, "event_type": event.type, **tracing.inject()}


# KEYS[1] stream; ARGV group, consumer, entry id. Returns 1 if renewed, 0 if the entry is not
# pending for this consumer (claimed by another, or acknowledged).
_RENEW_IF_OWNER = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #pending == 0 or pending[1][2] ~= ARGV[2] then
    return 0
end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""


@dataclass(frozen=True)
class Delivery:
    """One delivery of one stream entry to one consumer of a group."""

    stream: str
    group: str
    consumer: str
    entry_id: str
    redis: RedisClient

    async def keep_alive(self) -> bool:
        """Renew this consumer's lease on the entry; False if it is no longer the owner.

        XCLAIM with JUSTID and a zero idle threshold resets the entry's idle time without
        counting a new delivery, so claimers leave a long-running job alone. Alone it would
        also take the entry back from a consumer that claimed it meanwhile, and two workers
        would run one job; the script checks the owner and renews in one atomic step.
        """
        renewed = await self.redis.eval(
            _RENEW_IF_OWNER, 1, self.stream, self.group, self.consumer, self.entry_id
        )
        return bool(renewed)

    async def uncount(self) -> int:
        """Take back this delivery from the entry's delivery count, if this consumer still owns
        the entry; return the count now, or -1 if it is no longer ours.

        This also resets the entry's idle time, so claimers retry it only after
        `claim_idle_ms`, which paces an outage's retries too.
        """
        keys_and_args = (self.stream, self.group, self.consumer, self.entry_id)
        return int(await self.redis.eval(UNCOUNT_DELIVERY_LUA, 1, *keys_and_args))

    async def ack(self) -> None:
        await self.redis.xack(self.stream, self.group, self.entry_id)

    async def dead_letter(self, reason: str, raw: bytes, headers: dict[str, str]) -> None:
        """Move the entry to the dead-letter stream and acknowledge it, atomically.

        Its headers go with it: a replay needs the signature to tell a genuine event from a
        forged one, and the trace context to join the request's trace.
        """
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(
                Streams.dead_letters(self.stream),
                {
                    "stream": self.stream,
                    "group": self.group,
                    "entry_id": self.entry_id,
                    "reason": reason[:2000],
                    "failed_at": datetime.now(UTC).isoformat(),
                    "data": raw,
                    "headers": json.dumps(headers, sort_keys=True),
                },
            )
            pipe.xack(self.stream, self.group, self.entry_id)
            await pipe.execute()
        log.error("dead-lettered %s %s for %s: %s", self.stream, self.entry_id, self.group, reason)


EventHandler = Callable[[Event, Delivery], Awaitable[None]]
# Told about an entry given up on, before it moves to the dead letters: (raw entry, reason).
GiveUpHandler = Callable[[bytes, str], Awaitable[None]]


def consume(
    broker: RedisBroker,
    settings: Settings,
    stream: str,
    group: str,
    handler: EventHandler,
    *,
    max_records: int | None = None,
    on_give_up: GiveUpHandler | None = None,
    max_workers: int = 1,
) -> None:
    """Subscribe `handler` to `stream` for `group`: a reader for new entries and a claimer.

    `on_give_up` runs before an entry that failed `max_deliveries` times is dead-lettered, so
    the service can tell others (a worker fails the job). If it raises, the entry stays
    pending and the next claim tries again.

    `max_workers` handlers of new entries may run at once (the batching worker's capacity);
    while all are busy the reader stops reading, so entries wait in the stream. Claimed
    entries are rare (a consumer died) and are handled one at a time.
    """
    records = max_records or settings.read_batch_max
    keys = SigningKeys.parse(settings.signing_keys)
    backoff = OutageBackoff.configured(f"{group} on {stream}", settings)

    async def deliver(msg: RedisStreamMessage, delivery: Delivery) -> None:
        await _deliver(msg, delivery, handler, keys, backoff)

    async def on_new(msg: RedisStreamMessage, redis: Redis) -> None:
        await deliver(msg, _delivery(msg, redis))

    async def on_claimed(msg: RedisStreamMessage, redis: Redis) -> None:
        delivery = _delivery(msg, redis)
        deliveries = await _delivery_count(delivery)
        if deliveries > settings.max_deliveries:
            reason = f"delivered {deliveries} times (limit {settings.max_deliveries})"
            if on_give_up is not None:
                await on_give_up(_raw(msg), reason)
            await delivery.dead_letter(reason, _raw(msg), msg.headers)
            return
        await deliver(msg, delivery)

    def _delivery(msg: RedisStreamMessage, redis: RedisClient) -> Delivery:
        entry_id = msg.raw_message["message_ids"][0]
        entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        return Delivery(stream, group, settings.consumer, entry_id, redis)

    reader = StreamSub(
        stream,
        group=group,
        consumer=settings.consumer,
        max_records=records,
        polling_interval=POLL_INTERVAL_MS,
    )
    claimer = StreamSub(
        stream,
        group=group,
        consumer=settings.consumer,
        min_idle_time=settings.claim_idle_ms,
        polling_interval=max(POLL_INTERVAL_MS, settings.claim_idle_ms // 4),
    )
    concurrency = {"max_workers": max_workers} if max_workers > 1 else {}
    broker.subscriber(stream=reader, ack_policy=AckPolicy.MANUAL, **concurrency)(on_new)
    broker.subscriber(stream=claimer, ack_policy=AckPolicy.MANUAL)(on_claimed)


async def _deliver(
    msg: RedisStreamMessage,
    delivery: Delivery,
    handler: EventHandler,
    keys: SigningKeys,
    backoff: OutageBackoff,
) -> None:
    refusal = keys.refusal(_raw(msg), msg.headers.get(SIGNATURE_HEADER))
    if refusal is not None:
        await delivery.dead_letter(refusal, _raw(msg), msg.headers)
        return
    try:
        event = parse_event(msg.body)
    except (ValidationError, ValueError) as exc:
        await delivery.dead_letter(f"malformed event: {exc}", _raw(msg), msg.headers)
        return
    try:
        with tracing.consumer_span(f"{delivery.group} {event.type}", msg.headers):
            await handler(event, delivery)
    except Exception as exc:
        # Left unacknowledged on purpose: the entry stays pending and a claimer retries it
        # after `claim_idle_ms`. A failure of the handler itself counts towards
        # `max_deliveries`; an outage of our storage does not, since every entry would fail.
        if is_outage(exc):
            await _uncount(delivery)
            await backoff.failed(exc)
            return
        backoff.answered()
        log.exception("handler %s failed on %s %s", delivery.group, delivery.stream, event.event_id)
        return
    backoff.answered()
    await delivery.ack()


async def _uncount(delivery: Delivery) -> None:
    try:
        await delivery.uncount()
    except RedisError:
        # Redis itself is down: this delivery stays counted. The subscriber loops wait for
        # Redis anyway, so few deliveries can be lost this way.
        pass


async def _delivery_count(delivery: Delivery) -> int:
    pending = await delivery.redis.xpending_range(
        delivery.stream, delivery.group, min=delivery.entry_id, max=delivery.entry_id, count=1
    )
    # An entry acknowledged meanwhile is no longer pending; treat it as a first delivery and
    # let the idempotent handler see it again harmlessly.
    return int(pending[0]["times_delivered"]) if pending else 1


def _raw(msg: RedisStreamMessage) -> bytes:
    body = msg.body
    return body if isinstance(body, bytes) else str(body).encode()
