"""Batched consumption: one stream for one group, many entries per handler call.

The delivery model is streams.consume's: new entries are read with XREADGROUP and entries left
idle by a dead consumer are taken over with XAUTOCLAIM; every entry's signature is verified
and its event parsed before the handler sees it (a bad one goes to the dead letters with its
reason); an entry is acknowledged only after the handler committed; one delivered more than
`max_deliveries` times is dead-lettered. What differs is that the handler gets up to `count`
entries at once, so a consumer can apply them in one transaction. When a batch fails, its
entries are retried one at a time: one poison entry then fails alone and is dead-lettered
after its own deliveries, never its neighbours.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from faststream.redis import BinaryMessageFormatV1
from pydantic import ValidationError
from redis.asyncio import Redis as RedisClient
from redis.exceptions import RedisError

from tokenmill.events import Event, parse_event
from tokenmill.outage import OutageBackoff, is_outage, stop_if_cancelled
from tokenmill.settings import Settings
from tokenmill.signing import SIGNATURE_HEADER, SigningKeys
from tokenmill.streams import POLL_INTERVAL_MS, Delivery

log = logging.getLogger(__name__)

DATA_FIELD = b"__data__"


@dataclass(frozen=True)
class Entry:
    event: Event
    delivery: Delivery
    body: bytes  # Exactly as signed: what an append-only log should keep.


BatchHandler = Callable[[list[Entry]], Awaitable[None]]


async def consume_batches(
    redis: RedisClient,
    settings: Settings,
    stream: str,
    group: str,
    handler: BatchHandler,
    count: int,
) -> None:
    """Feed `handler` batches of up to `count` entries of `stream` for `group` until cancelled."""
    assert count >= 1, count
    consumer = Consumer(redis, settings, stream, group, handler, count)
    claim_every_s = max(POLL_INTERVAL_MS, settings.claim_idle_ms // 4) / 1000
    loop = asyncio.get_running_loop()
    next_claim = loop.time()
    while True:
        # A cancellation that a handler's client turned into an error and waited out as an
        # outage leaves the task cancelling; without this check the loop would read on.
        stop_if_cancelled()
        try:
            if loop.time() >= next_claim:
                await consumer.claim()
                next_claim = loop.time() + claim_every_s
            await consumer.read()
        except RedisError as exc:
            stop_if_cancelled()
            await consumer.backoff.failed(exc)
        except Exception:
            stop_if_cancelled()
            # A bug outside the handler (which has its own fallback) must not end the loop:
            # nothing was acknowledged, so every entry comes back through the claimer.
            log.exception("batch consumer %s on %s", group, stream)
            await asyncio.sleep(POLL_INTERVAL_MS / 1000)


class Consumer:
    def __init__(
        self,
        redis: RedisClient,
        settings: Settings,
        stream: str,
        group: str,
        handler: BatchHandler,
        count: int,
    ) -> None:
        self.redis, self.settings, self.stream, self.group = redis, settings, stream, group
        self.handler, self.count = handler, count
        self.keys = SigningKeys.parse(settings.signing_keys)
        self.backoff = OutageBackoff.configured(f"{group} on {stream}", settings)
        self.claim_cursor = "0-0"

    async def read(self) -> None:
        replies = await self.redis.xreadgroup(
            self.group,
            self.settings.consumer,
            {self.stream: ">"},
            count=self.count,
            block=POLL_INTERVAL_MS,
        )
        for _, entries in replies or []:
            await self.handle(entries)

    async def claim(self) -> None:
        """Take over entries idle past claim_idle_ms; dead-letter those delivered too often."""
        cursor, entries, *_ = await self.redis.xautoclaim(
            self.stream,
            self.group,
            self.settings.consumer,
            min_idle_time=self.settings.claim_idle_ms,
            start_id=self.claim_cursor,
            count=self.count,
        )
        self.claim_cursor = cursor.decode() if isinstance(cursor, bytes) else cursor
        if not entries:
            return
        counts = await self._delivery_counts([_text(entry_id) for entry_id, _ in entries])
        keep = []
        for entry_id, fields in entries:
            deliveries = counts.get(_text(entry_id), 1)
            if deliveries > self.settings.max_deliveries:
                reason = f"delivered {deliveries} times (limit {self.settings.max_deliveries})"
                body, headers = _unpack(fields)
                await self._delivery(entry_id).dead_letter(reason, body, headers)
            else:
                keep.append((entry_id, fields))
        await self.handle(keep)

    async def _delivery_counts(self, entry_ids: list[str]) -> dict[str, int]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                pipe.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
            replies = await pipe.execute()
        # An entry acknowledged meanwhile is no longer pending: counted as a first delivery,
        # which the idempotent handler sees again harmlessly.
        return {_text(p["message_id"]): int(p["times_delivered"]) for r in replies for p in r}

    def _delivery(self, entry_id: bytes | str) -> Delivery:
        return Delivery(
            self.stream, self.group, self.settings.consumer, _text(entry_id), self.redis
        )

    async def handle(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        batch = [
            entry
            for entry_id, fields in entries
            if (entry := await self._verified(entry_id, fields))
        ]
        if not batch:
            return
        try:
            await self.handler(batch)
        except Exception as exc:
            if is_outage(exc):
                await self._outage(batch, exc)
                return
            log.warning(
                "batch of %d on %s failed (%s); one at a time", len(batch), self.stream, exc
            )
            await self._one_by_one(batch)
            return
        self.backoff.answered()
        await self.redis.xack(self.stream, self.group, *(e.delivery.entry_id for e in batch))

    async def _one_by_one(self, batch: list[Entry]) -> None:
        for entry in batch:
            try:
                await self.handler([entry])
            except Exception as exc:
                if is_outage(exc):
                    await self._outage([entry], exc)
                    continue
                # Left pending: the claimer retries it, counting towards max_deliveries.
                log.exception("%s failed on %s %s", self.group, self.stream, entry.event.event_id)
                continue
            self.backoff.answered()
            await entry.delivery.ack()

    async def _outage(self, batch: list[Entry], exc: BaseException) -> None:
        # An outage of our storage is no fault of the entries: their deliveries are not counted.
        for entry in batch:
            try:
                await entry.delivery.uncount()
            except RedisError:
                break
        await self.backoff.failed(exc)

    async def _verified(self, entry_id: bytes, fields: dict[bytes, bytes]) -> Entry | None:
        body, headers = _unpack(fields)
        delivery = self._delivery(entry_id)
        refusal = self.keys.refusal(body, headers.get(SIGNATURE_HEADER))
        if refusal is not None:
            await delivery.dead_letter(refusal, body, headers)
            return None
        try:
            event = parse_event(body)
        except (ValidationError, ValueError) as exc:
            await delivery.dead_letter(f"malformed event: {exc}", body, headers)
            return None
        return Entry(event, delivery, body)


def _unpack(fields: dict[bytes, bytes]) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a stream entry as FastStream's publisher wrote it."""
    data = fields.get(DATA_FIELD, b"")
    body, headers = BinaryMessageFormatV1.parse(data)
    return body, {str(k): str(v) for k, v in headers.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
