"""The facility power cap and the curtailment level, shared by everyone who sets or obeys them:
the admin API and the CLI set the cap, the controller (telemetry/control.py) decides the level,
intakes and workers follow it.

State, in Redis under the deployment's prefix:

- `<prefix>.power.cap`, a hash without expiry: the cap in force (`cap_w` empty when none), who
  set it and why, and the id of the `PowerCapSet` event that set it. Only `RECORD_CAP_LUA`
  writes it, and only for an event newer than the one recorded (event ids are ULIDs, ordered
  by time), so a late or redelivered message never undoes a newer cap.
- `<prefix>.power.level`, JSON with a TTL of `power_level_ttl_s`: the curtailment level the
  controller decided, rewritten every control interval. A controller that stops refreshing
  it lets the level lapse to 0 (see `LevelFollower` for why that fails open).
- `<prefix>.power.controller`, with a TTL: the telemetry process that leads, so two
  controllers never publish two decisions.

Every cap change and every level change is also an event on the control stream, which the
ledger archives into its log like every other stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from faststream.redis import RedisBroker
from redis.asyncio import Redis as RedisClient
from redis.exceptions import RedisError

from tokenmill.events import PowerCapSet, Tier
from tokenmill.outage import stop_if_cancelled
from tokenmill.service import stop_loops
from tokenmill.settings import Settings
from tokenmill.signing import SigningKeys
from tokenmill.streams import Streams, event_headers, publish

log = logging.getLogger(__name__)

# Shed in this order: the first `level` tiers are shed at curtailment level `level`.
CURTAILMENT_ORDER: tuple[Tier, ...] = ("free", "standard", "premium")
LEVEL_MAX = len(CURTAILMENT_ORDER)
# Watts are kept to the milliwatt: finer is noise, and it keeps the texts short.
WATT_QUANTUM = Decimal("0.001")


def cap_key(prefix: str) -> str:
    return f"{prefix}.power.cap"


def level_key(prefix: str) -> str:
    return f"{prefix}.power.level"


def controller_key(prefix: str) -> str:
    return f"{prefix}.power.controller"


def shed_tiers(level: int) -> tuple[Tier, ...]:
    assert 0 <= level <= LEVEL_MAX, level
    return CURTAILMENT_ORDER[:level]


class CapError(ValueError):
    """A cap that cannot be a facility's power budget; nothing was changed."""


def parse_cap_w(raw: object, cap_w_max: float) -> Decimal:
    """Watts from an operator's text or JSON number: positive, finite, at most `cap_w_max`."""
    if isinstance(raw, bool) or not isinstance(raw, int | float | str | Decimal):
        raise CapError(f"cap_w must be a number of watts, not {raw!r}")
    try:
        watts = Decimal(str(raw).strip())
    except InvalidOperation:
        raise CapError(f"cap_w must be a number of watts, not {raw!r}") from None
    if not watts.is_finite() or watts <= 0:
        raise CapError(f"cap_w must be a positive number of watts, not {raw!r}")
    if watts > Decimal(str(cap_w_max)):
        raise CapError(
            f"cap_w {raw!r} is over {cap_w_max:,.0f} W (power_cap_w_max): no facility draws that"
        )
    quantized = watts.quantize(WATT_QUANTUM)
    if quantized <= 0:
        raise CapError(f"cap_w must be at least {WATT_QUANTUM} W, not {raw!r}")
    return quantized


@dataclass(frozen=True)
class Cap:
    """The cap in force; `cap_w` None when there is none."""

    cap_w: Decimal | None
    source: str = ""
    reason: str = ""
    event_id: str = ""
    set_at: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "cap_w": None if self.cap_w is None else str(self.cap_w),
            "source": self.source or None,
            "reason": self.reason or None,
            "event_id": self.event_id or None,
            "set_at": self.set_at or None,
        }


@dataclass(frozen=True)
class Level:
    """A curtailment decision: how many tiers are shed, and what it was based on."""

    level: int = 0
    measured_w: Decimal | None = None
    cap_w: Decimal | None = None
    reason: str = "no decision in force (no power controller running, or its level lapsed)"
    # When the level last changed, and when it was last confirmed (Unix seconds, the
    # controller's clock): the controller's dwell time counts from `changed_at`.
    changed_at: float = 0.0
    decided_at: float = 0.0

    @property
    def shed_tiers(self) -> tuple[Tier, ...]:
        return shed_tiers(self.level)

    def as_json(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "shed_tiers": list(self.shed_tiers),
            "measured_w": None if self.measured_w is None else str(self.measured_w),
            "cap_w": None if self.cap_w is None else str(self.cap_w),
            "reason": self.reason,
            "changed_at": self.changed_at,
            "decided_at": self.decided_at,
        }

    @classmethod
    def from_json(cls, raw: str | bytes) -> Level:
        data = json.loads(raw)
        return cls(
            level=int(data["level"]),
            measured_w=_decimal_or_none(data.get("measured_w")),
            cap_w=_decimal_or_none(data.get("cap_w")),
            reason=str(data.get("reason", "")),
            changed_at=float(data.get("changed_at", 0.0)),
            decided_at=float(data.get("decided_at", 0.0)),
        )


NO_CURTAILMENT = Level()


def _decimal_or_none(value: object) -> Decimal | None:
    return None if value in (None, "") else Decimal(str(value))


# KEYS[1] the cap hash; ARGV event id, cap_w ("" clears), source, reason, set_at. Records the
# event only if it is newer than the one recorded; returns 1 if it did.
RECORD_CAP_LUA = """
local current = redis.call('HGET', KEYS[1], 'event_id')
if current and current >= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'event_id', ARGV[1], 'cap_w', ARGV[2], 'source', ARGV[3],
           'reason', ARGV[4], 'set_at', ARGV[5])
return 1
"""


def _record_args(event: PowerCapSet) -> list[str]:
    cap_w = "" if event.cap_w is None else str(event.cap_w)
    return [event.event_id, cap_w, event.source, event.reason, event.occurred_at.isoformat()]


async def set_cap(
    redis: RedisClient,
    broker: RedisBroker,
    streams: Streams,
    keys: SigningKeys,
    event: PowerCapSet,
) -> None:
    """Put the cap change on the control stream and in force, in one MULTI: the log never
    misses a cap that was in force. Whatever the log holds, the cap in force is its newest
    `power.cap_set` by event id (a grid signal older than this one is logged but not applied)."""
    async with redis.pipeline(transaction=True) as pipe:
        await publish(
            broker, streams.control, event.canonical_json(), event_headers(event), keys, pipe
        )
        pipe.eval(RECORD_CAP_LUA, 1, cap_key(streams.prefix), *_record_args(event))
        await pipe.execute()


async def record_cap(redis: RedisClient, prefix: str, event: PowerCapSet) -> bool:
    """Put a cap change read from the control stream (a grid signal) in force, unless a newer
    one is; True if it changed the cap."""
    return bool(await redis.eval(RECORD_CAP_LUA, 1, cap_key(prefix), *_record_args(event)))


async def read_cap(redis: RedisClient, prefix: str) -> Cap:
    fields = {k.decode(): v.decode() for k, v in (await redis.hgetall(cap_key(prefix))).items()}
    return Cap(
        cap_w=_decimal_or_none(fields.get("cap_w")),
        source=fields.get("source", ""),
        reason=fields.get("reason", ""),
        event_id=fields.get("event_id", ""),
        set_at=fields.get("set_at", ""),
    )


async def read_level(redis: RedisClient, prefix: str) -> Level:
    """The level in force: none when the controller never decided one or stopped refreshing."""
    raw = await redis.get(level_key(prefix))
    return NO_CURTAILMENT if raw is None else Level.from_json(raw)


async def status(redis: RedisClient, prefix: str) -> dict[str, Any]:
    """The cap and the curtailment level, as `GET /admin/v1/power/cap` and the CLI show it."""
    cap, level = await read_cap(redis, prefix), await read_level(redis, prefix)
    return {"object": "power_status", "cap": cap.as_json(), "curtailment": level.as_json()}


def status_text(found: dict[str, Any]) -> str:
    cap, level = found["cap"], found["curtailment"]
    if cap["cap_w"] is None:
        lines = ["power cap: none"]
    else:
        lines = [f"power cap: {cap['cap_w']} W (set by {cap['source']} at {cap['set_at']})"]
        if cap["reason"]:
            lines.append(f"  reason: {cap['reason']}")
    measured = "unknown" if level["measured_w"] is None else f"{level['measured_w']} W"
    shed = ", ".join(level["shed_tiers"]) or "none"
    lines.append(f"measured power: {measured}")
    lines.append(f"curtailment level: {level['level']} (shed: {shed}): {level['reason']}")
    return "\n".join(lines)


def cap_event(cap_w: Decimal | None, source: str, reason: str, region: str) -> PowerCapSet:
    return PowerCapSet(
        producer=source,
        customer_id="",
        request_id="",
        region=region,
        cap_w=cap_w,
        source=source,
        reason=reason,
    )


class LevelFollower:
    """The curtailment level as an intake or a worker sees it: re-read every
    `power_level_poll_s`, so a decision reaches every process within that (plus one read).

    While Redis cannot be read the last level read stays in force, until `power_level_ttl_s`
    after it was read; past that, and when the controller has stopped refreshing the level,
    there is no curtailment: the cap fails open. A curtailment nobody confirms would shed
    free and standard customers for as long as the controller is down, with no one to lift
    it; the power it protects is also guarded by the devices' own limits (RAPL, NVML power
    limits), and while Redis is down no job reaches a worker anyway.
    """

    def __init__(
        self,
        redis: RedisClient,
        settings: Settings,
        on_change: Callable[[Level], None] | None = None,
    ) -> None:
        self._redis = redis
        self._settings = settings
        self._on_change = on_change
        self._level = NO_CURTAILMENT
        self._read_s = -math.inf

    def current(self) -> Level:
        if time.monotonic() - self._read_s > self._settings.power_level_ttl_s:
            return NO_CURTAILMENT
        return self._level

    async def refresh(self) -> None:
        level = await read_level(self._redis, self._settings.stream_prefix)
        before = self.current()
        self._level, self._read_s = level, time.monotonic()
        if level.level != before.level:
            log.info("curtailment level %d -> %d: %s", before.level, level.level, level.reason)
            if self._on_change is not None:
                self._on_change(level)

    async def run(self) -> None:
        """Follow the level until cancelled (a service's background loop)."""
        while True:
            # A cancellation redis-py swallowed mid-command must still end the loop.
            stop_if_cancelled()
            try:
                await self.refresh()
            except RedisError as exc:
                stop_if_cancelled()  # redis-py turns a cancellation mid-command into an error.
                # The Redis watch of the service logs the outage.
                log.debug("curtailment level not read (%s); keeping %d", exc, self._level.level)
                self._lapse_if_stale()
            except (ValueError, KeyError) as exc:
                # Not the controller's JSON: treated as unreadable, so it lapses like one.
                log.warning("curtailment level unreadable: %r", exc)
                self._lapse_if_stale()
            await asyncio.sleep(self._settings.power_level_poll_s)

    def _lapse_if_stale(self) -> None:
        if self._level.level and self.current() is NO_CURTAILMENT:
            log.warning("curtailment level unconfirmed for %.0fs: lifted (fails open)",
                        self._settings.power_level_ttl_s)  # fmt: skip
            self._level = NO_CURTAILMENT
            if self._on_change is not None:
                self._on_change(NO_CURTAILMENT)

    @contextlib.asynccontextmanager
    async def following(self) -> AsyncIterator[LevelFollower]:
        task = asyncio.create_task(self.run(), name="power-level-follower")
        try:
            yield self
        finally:
            await stop_loops([task])
