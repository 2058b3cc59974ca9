"""The power controller: compares the facility's measured power with its cap and moves the
curtailment level (tokenmill.powercap), shedding tiers in order: free, then standard, then
premium.

Every `power_control_interval_s` the leading controller reads the power samples that arrived
on the power stream in the last `power_cap_window_s` (by their stream ids, Redis's clock, so
hosts' clocks do not matter), takes each meter's mean power over them (its joules over its
windows' seconds) and sums the meters: the facility's smoothed power. `decide` then moves the
level at most one step: up while the power is over the cap, down once it is under
`power_cap_release_share` of it (the hysteresis band keeps it from flapping at the edge). It
sheds no sooner than `power_cap_dwell_s` after the last step, since shedding a tier shows in
the smoothed power only after the work already running has finished and the window has moved
past it; and it gives a tier back no sooner than `power_cap_release_dwell_s` after it: a tier
given back can push the power over the cap again (on a CPU the engine draws nearly as much for
a few requests as for many), and a slow return makes that cycle rare instead of constant.

A change of level is a `CurtailmentChanged` event on the control stream (the ledger logs it);
the level itself is rewritten every interval, with a TTL, where intakes and workers read it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from faststream.redis import BinaryMessageFormatV1
from pydantic import ValidationError
from redis.asyncio import Redis as RedisClient
from redis.exceptions import RedisError

from tokenmill import powercap, service
from tokenmill.events import CurtailmentChanged, Event, PowerCapSet, PowerSample, parse_event
from tokenmill.outage import stop_if_cancelled
from tokenmill.powercap import LEVEL_MAX, Level
from tokenmill.settings import Settings
from tokenmill.signing import SIGNATURE_HEADER, SigningKeys
from tokenmill.streams import Delivery, event_headers, publish

log = logging.getLogger(__name__)

DATA_FIELD = b"__data__"

# Takes the controller's lease (or renews it when it holds it already); 1 if it leads.
# KEYS[1] the lease; ARGV consumer, lease ms.
LEAD_LUA = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


@dataclass(frozen=True)
class Policy:
    release_share: Decimal
    dwell_s: float
    release_dwell_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        share = Decimal(str(settings.power_cap_release_share))
        assert 0 < share <= 1, "power_cap_release_share is a share of the cap"
        return cls(share, settings.power_cap_dwell_s, settings.power_cap_release_dwell_s)


def facility_power_w(samples: Iterable[PowerSample]) -> Decimal | None:
    """Each meter's mean power over its samples (its joules over its windows' seconds), summed
    over meters; None when no meter reported. A meter is named by its region, host, device and
    meter: two hosts' "cuda:0" are two meters. (Samples from telemetry older than the host
    field share the empty host, so two such hosts must not name their devices alike.)"""
    energy_j: dict[tuple[str, str, str, str], Decimal] = defaultdict(Decimal)
    seconds: dict[tuple[str, str, str, str], Decimal] = defaultdict(Decimal)
    for sample in samples:
        source = (sample.region, sample.host, sample.device, sample.meter)
        window_s = Decimal(str((sample.window_end - sample.window_start).total_seconds()))
        if window_s <= 0:
            continue
        energy_j[source] += sample.energy_j
        seconds[source] += window_s
    if not seconds:
        return None
    total_w = sum(energy_j[source] / seconds[source] for source in seconds)
    return Decimal(total_w).quantize(powercap.WATT_QUANTUM)


def decide(
    current: Level,
    measured_w: Decimal | None,
    cap_w: Decimal | None,
    now_s: float,
    policy: Policy,
) -> Level:
    """The next level: at most one step from `current`, and none within the dwell times."""

    def to(level: int, reason: str) -> Level:
        changed_at = now_s if level != current.level else current.changed_at
        return Level(level, measured_w, cap_w, reason, changed_at, now_s)

    if cap_w is None:
        return to(0, "no power cap")
    if measured_w is None:
        # Nothing to compare: a cap that cannot be measured is not enforced (fails open).
        return to(0, "no power samples in the window: the cap cannot be enforced")
    since_s = now_s - current.changed_at
    release_w = (cap_w * policy.release_share).quantize(powercap.WATT_QUANTUM)
    if measured_w > cap_w:
        if current.level == LEVEL_MAX:
            return to(current.level, f"{measured_w} W over the cap of {cap_w} W, every tier shed")
        if since_s < policy.dwell_s:
            return to(current.level, f"{measured_w} W over the cap of {cap_w} W; letting the "
                      "last step show before the next")  # fmt: skip
        return to(current.level + 1, f"{measured_w} W over the cap of {cap_w} W")
    if measured_w < release_w and current.level > 0:
        if since_s < policy.release_dwell_s:
            return to(current.level, f"{measured_w} W under {release_w} W; letting the last "
                      "step show before the next")  # fmt: skip
        return to(current.level - 1, f"{measured_w} W under {release_w} W "
                  f"({policy.release_share} of the cap of {cap_w} W)")  # fmt: skip
    return to(current.level, f"{measured_w} W against a cap of {cap_w} W")


async def recent_samples(
    redis: RedisClient, stream: str, window_s: float, count_max: int, keys: SigningKeys
) -> list[PowerSample]:
    """The power samples that arrived in the last `window_s` (Redis's clock), newest first;
    entries that are unsigned, forged or not samples are left out: a forged reading must not
    shed anyone's traffic."""
    seconds, micros = await redis.time()
    since_ms = int(seconds * 1000 + micros // 1000 - window_s * 1000)
    entries = await redis.xrevrange(stream, max="+", min=str(max(since_ms, 0)), count=count_max)
    samples = []
    for _, fields in entries:
        event = _verified(fields, keys)
        if isinstance(event, PowerSample):
            samples.append(event)
    return samples


def _verified(fields: dict[bytes, bytes], keys: SigningKeys) -> Event | None:
    data = fields.get(DATA_FIELD)
    if data is None:
        return None
    body, headers = BinaryMessageFormatV1.parse(data)
    if keys.refusal(body, headers.get(SIGNATURE_HEADER)) is not None:
        return None
    try:
        return parse_event(body)
    except (ValidationError, ValueError):
        return None


class Controller:
    def __init__(self, rt: service.Runtime) -> None:
        self.rt = rt
        self.settings = rt.settings
        self.policy = Policy.from_settings(rt.settings)
        self.prefix = rt.settings.stream_prefix

    async def leads(self) -> bool:
        lease_ms = int(self.settings.power_control_interval_s * 3000)
        key = powercap.controller_key(self.prefix)
        return bool(await self.rt.redis.eval(LEAD_LUA, 1, key, self.settings.consumer, lease_ms))

    async def control_once(self, now_s: float) -> Level:
        """Decide the level for now, and publish it; returns the decision."""
        redis, settings = self.rt.redis, self.settings
        cap = await powercap.read_cap(redis, self.prefix)
        current = await powercap.read_level(redis, self.prefix)
        samples = await recent_samples(
            redis,
            self.rt.streams.power,
            settings.power_cap_window_s,
            settings.power_cap_samples_max,
            self.rt.signing_keys,
        )
        decided = decide(current, facility_power_w(samples), cap.cap_w, now_s, self.policy)
        ttl_ms = int(settings.power_level_ttl_s * 1000)
        async with redis.pipeline(transaction=True) as pipe:
            if decided.level != current.level:
                await self._publish_change(current, decided, pipe)
            pipe.set(powercap.level_key(self.prefix), _json(decided), px=ttl_ms)
            await pipe.execute()
        return decided

    async def _publish_change(self, current: Level, decided: Level, pipe) -> None:
        log.info("curtailment level %d -> %d: %s", current.level, decided.level, decided.reason)
        event = CurtailmentChanged(
            producer="telemetry",
            customer_id="",
            request_id="",
            region=self.settings.region,
            level=decided.level,
            previous_level=current.level,
            shed_tiers=decided.shed_tiers,
            measured_w=decided.measured_w,
            cap_w=decided.cap_w,
            reason=decided.reason,
        )
        body, headers = event.canonical_json(), event_headers(event)
        await publish(
            self.rt.broker, self.rt.streams.control, body, headers, self.rt.signing_keys, pipe
        )

    async def run(self) -> None:
        """Control until cancelled; an interval whose Redis calls fail is skipped (the level
        in Redis lapses by itself if this goes on past power_level_ttl_s)."""
        while True:
            await asyncio.sleep(self.settings.power_control_interval_s)
            # A cancellation redis-py swallowed mid-command must still end the loop.
            stop_if_cancelled()
            try:
                if await self.leads():
                    # Unix seconds: decisions are shown to operators and compared across a
                    # change of leader.
                    await self.control_once(time.time())
            except RedisError as exc:
                stop_if_cancelled()  # redis-py turns a cancellation mid-command into an error.
                log.warning("power control skipped this interval: %s", exc)
            except Exception:
                stop_if_cancelled()
                # A bug must not end the loop silently; the level lapses meanwhile (fails open).
                log.exception("power control failed this interval")


def _json(level: Level) -> str:
    return json.dumps(level.as_json(), sort_keys=True)


async def on_control(rt: service.Runtime, event: Event, _: Delivery) -> None:
    """A cap change on the control stream (a grid signal, or one the admin API or CLI put in
    force already: then it changes nothing) is put in force if it is the newest."""
    if isinstance(event, PowerCapSet) and await powercap.record_cap(
        rt.redis, rt.settings.stream_prefix, event
    ):
        log.info("power cap %s W set by %s", event.cap_w, event.source)
