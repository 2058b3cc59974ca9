"""What health probes and metrics read: worker heartbeats, stream backlogs, dead letters.

A worker with its model loaded keeps a heartbeat in Redis: `<prefix>.workers.<consumer>`, its
details with a TTL it refreshes while it runs, listed in the set `<prefix>.workers` so that a
reader never scans the keyspace. A worker that dies stops refreshing, its key expires, and the
next reader drops it from the set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis as RedisClient
from redis.exceptions import RedisError

from tokenmill.settings import Settings
from tokenmill.streams import Streams

# Every member of the set whose heartbeat is still there, in one atomic step, dropping the
# members whose key expired. The details keys are derived from KEYS[1], so this script, like
# the stream names, assumes one Redis rather than a cluster.
_ALIVE_WORKERS_LUA = """
local alive = {}
for _, consumer in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    local details = redis.call('GET', KEYS[1] .. '.' .. consumer)
    if details then
        table.insert(alive, details)
    else
        redis.call('SREM', KEYS[1], consumer)
    end
end
return alive
"""


def workers_key(prefix: str) -> str:
    return f"{prefix}.workers"


def worker_key(prefix: str, consumer: str) -> str:
    return f"{workers_key(prefix)}.{consumer}"


def energy_key(prefix: str, consumer: str) -> str:
    """A worker's energy gauges (JSON, worker/energy.py `gauges`), for the intake's /metrics."""
    return f"{prefix}.energy.{consumer}"


async def beat(redis: RedisClient, settings: Settings, model: str, device: str) -> None:
    """Say, for `worker_heartbeat_ttl_s`, that this worker runs `model` on `device`."""
    details = {
        "consumer": settings.consumer,
        "region": settings.region,
        "model": model,
        "device": device,
        "at": time.time(),
    }
    ttl_ms = int(settings.worker_heartbeat_ttl_s * 1000)
    # One transaction: the set never names a worker whose key was never written.
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(
            worker_key(settings.stream_prefix, settings.consumer), json.dumps(details), px=ttl_ms
        )
        pipe.sadd(workers_key(settings.stream_prefix), settings.consumer)
        await pipe.execute()


async def heartbeat(redis: RedisClient, settings: Settings, model: str, device: str) -> None:
    """Beat every `worker_heartbeat_interval_s` until cancelled, then withdraw at once, so a
    stopping worker is not counted for the rest of its TTL."""
    try:
        while True:
            # A Redis outage is logged by the service's Redis watch; the next beat retries.
            with contextlib.suppress(RedisError):
                await beat(redis, settings, model, device)
            await asyncio.sleep(settings.worker_heartbeat_interval_s)
    finally:
        with contextlib.suppress(RedisError):
            async with redis.pipeline(transaction=True) as pipe:
                pipe.delete(worker_key(settings.stream_prefix, settings.consumer))
                pipe.srem(workers_key(settings.stream_prefix), settings.consumer)
                await pipe.execute()


async def alive_workers(redis: RedisClient, prefix: str) -> list[dict[str, Any]]:
    """The details of every worker whose heartbeat has not expired, in any region."""
    found = await redis.eval(_ALIVE_WORKERS_LUA, 1, workers_key(prefix))
    return sorted((json.loads(details) for details in found), key=lambda w: w["consumer"])


@dataclass(frozen=True)
class GroupBacklog:
    stream: str
    group: str
    pending: int  # Delivered to a consumer, not yet acknowledged.
    lag: int | None  # Not yet delivered; Redis cannot always tell (after an XDEL, say).


@dataclass(frozen=True)
class StreamStats:
    lengths: dict[str, int]
    dead_letters: dict[str, int]
    groups: list[GroupBacklog]


async def stream_stats(redis: RedisClient, streams: Streams, region: str) -> StreamStats:
    """Every stream's length and dead-letter count, and each consumer group's backlog, in one
    round trip."""
    names = streams.all(region)
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.xlen(name)
            pipe.xlen(Streams.dead_letters(name))
            pipe.xinfo_groups(name)
        replies = await pipe.execute(raise_on_error=False)
    lengths, dead_letters, groups = {}, {}, []
    for index, name in enumerate(names):
        length, dead, infos = replies[3 * index : 3 * index + 3]
        lengths[name], dead_letters[name] = length, dead
        # A stream nobody created yet has no groups: XINFO answers an error for it.
        for info in infos if isinstance(infos, list) else []:
            group = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
            groups.append(GroupBacklog(name, group, info["pending"], info.get("lag")))
    return StreamStats(lengths, dead_letters, groups)


@dataclass(frozen=True)
class Check:
    """One dependency's answer to a probe: whether it was good, how long it took, and why not."""

    ok: bool
    ms: float
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"ok": self.ok, "ms": round(self.ms, 1)}
        if self.error is not None:
            body["error"] = self.error
        return body


async def check(probe: Awaitable[object], timeout_s: float) -> Check:
    """Run `probe`; it passes if it answers within `timeout_s` without raising."""
    started_s = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            await probe
    except TimeoutError:
        return Check(False, _ms_since(started_s), f"no answer within {timeout_s:g} s")
    except Exception as exc:  # Whatever the dependency raised is the reason it is not ready.
        return Check(False, _ms_since(started_s), f"{type(exc).__name__}: {exc}")
    return Check(True, _ms_since(started_s))


def _ms_since(started_s: float) -> float:
    return (time.monotonic() - started_s) * 1000
