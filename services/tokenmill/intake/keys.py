"""API keys: shown once at creation, stored only as a SHA-256 digest, bound to one customer."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import datetime

import asyncpg

from tokenmill.events import TIERS, new_id
from tokenmill.outage import OutageBackoff
from tokenmill.settings import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "tm_"
KEY_RANDOM_BYTES = 32
# What `issue_key` makes: the prefix and the random bytes in URL-safe base64 without padding.
# Anything else is refused without asking Postgres.
_KEY_SHAPE = re.compile(KEY_PREFIX + r"[A-Za-z0-9_-]{43}")
# Where migration 0004's triggers announce a change to a key or to a customer.
KEYS_CHANNEL = "intake_keys"


@dataclass(frozen=True)
class Customer:
    customer_id: str
    name: str
    tier: str
    region: str
    # A suspended customer's keys are refused (403) on every route, within the revocation time.
    suspended: bool = False


def digest(api_key: str) -> bytes:
    # Keys carry 256 random bits, so a plain fast hash is as strong as a slow one here.
    return hashlib.sha256(api_key.encode()).digest()


async def create_customer(conn: asyncpg.Connection, name: str, tier: str, region: str) -> Customer:
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {', '.join(TIERS)}, not {tier!r}")
    customer = Customer(f"cus_{new_id()}", name, tier, region)
    # Every customer has an admission balance (migration 0008) from its first moment: the
    # admission statement updates that row, it never creates it.
    await conn.execute(
        "WITH customer AS (INSERT INTO intake.customers (customer_id, name, tier, region) "
        "VALUES ($1, $2, $3, $4) RETURNING customer_id) "
        "INSERT INTO intake.admission_balances (customer_id) SELECT customer_id FROM customer",
        customer.customer_id,
        name,
        tier,
        region,
    )
    return customer


async def issue_key(conn: asyncpg.Connection, customer_id: str) -> str:
    """Create a key for the customer and return it; this is the only time it is readable."""
    api_key = KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)
    await conn.execute(
        "INSERT INTO intake.api_keys (key_id, key_sha256, key_prefix, customer_id) "
        "VALUES ($1, $2, $3, $4)",
        f"key_{new_id()}",
        digest(api_key),
        api_key[:10],
        customer_id,
    )
    return api_key


# `keys list` shows at most this many keys; narrow it with a prefix or a customer.
KEYS_LISTED_MAX = 1000
_KEY_COLUMNS = (
    "k.key_id, k.key_prefix, k.customer_id, c.name AS customer_name, k.created_at, k.revoked_at "
    "FROM intake.api_keys k JOIN intake.customers c USING (customer_id)"
)
# A key named by its id, by the whole key, or by the start of it (at least the stored prefix's
# length matches the stored prefix; less matches every key whose prefix starts so).
_KEY_NAMED = (
    "(k.key_id = $1 OR k.key_sha256 = $2 "
    "OR starts_with(k.key_prefix, $1) OR starts_with($1, k.key_prefix))"
)


@dataclass(frozen=True)
class KeyRecord:
    """What an operator may know of a key: never the key itself, which only its holder has."""

    key_id: str
    key_prefix: str
    customer_id: str
    customer_name: str
    created_at: datetime
    revoked_at: datetime | None


async def list_keys(
    conn: asyncpg.Connection, prefix: str = "", customer_id: str | None = None
) -> list[KeyRecord]:
    """Keys whose prefix starts with `prefix`, of one customer or all, oldest first."""
    _check_text(prefix, "prefix")
    rows = await conn.fetch(
        f"SELECT {_KEY_COLUMNS} WHERE starts_with(k.key_prefix, $1) "
        "AND ($2::text IS NULL OR k.customer_id = $2) ORDER BY k.created_at, k.key_id LIMIT $3",
        prefix,
        customer_id,
        KEYS_LISTED_MAX,
    )
    return [KeyRecord(**dict(row)) for row in rows]


async def revoke_key(conn: asyncpg.Connection, named: str) -> tuple[KeyRecord, bool]:
    """Revoke the one key `named` (its id, the whole key, or a prefix only it has); return it
    and whether it was revoked just now (False: it already was). Every intake refuses it within
    `key_revocation_s_max` (migration 0004's trigger tells them)."""
    _check_text(named, "key")
    if not named.strip():
        raise LookupError("name the key to revoke: its id (key_...), its prefix, or the key")
    async with conn.transaction():
        rows = await conn.fetch(
            f"SELECT {_KEY_COLUMNS} WHERE {_KEY_NAMED} ORDER BY k.key_id FOR UPDATE OF k",
            named,
            digest(named),
        )
        if not rows:
            raise LookupError(
                f"no key matches {named!r}; name it by its id (key_...), prefix (tm_...) or key"
            )
        if len(rows) > 1:
            found = ", ".join(f"{r['key_id']} ({r['key_prefix']})" for r in rows[:10])
            raise LookupError(f"{len(rows)} keys match {named!r}: {found}; give the key id")
        key = KeyRecord(**dict(rows[0]))
        if key.revoked_at is not None:
            return key, False
        revoked_at = await conn.fetchval(
            "UPDATE intake.api_keys SET revoked_at = now() WHERE key_id = $1 RETURNING revoked_at",
            key.key_id,
        )
    return replace(key, revoked_at=revoked_at), True


def _check_text(value: str, what: str) -> None:
    # Postgres text cannot hold NUL; say so instead of failing inside the driver.
    if "\x00" in value:
        raise LookupError(f"the {what} must not contain a NUL character")


async def _lookup(pool: asyncpg.Pool, key_sha256: bytes) -> Customer | None:
    row = await pool.fetchrow(
        "SELECT c.customer_id, c.name, c.tier, c.region, c.suspended_at IS NOT NULL AS suspended "
        "FROM intake.api_keys k "
        "JOIN intake.customers c USING (customer_id) "
        "WHERE k.key_sha256 = $1 AND k.revoked_at IS NULL",
        key_sha256,
    )
    return Customer(**dict(row)) if row else None


class KeyCache:
    """Remembers keys so that a busy client costs no lookup per request, and forgets a key
    within `key_revocation_s_max` of its revocation on every intake process.

    Each process LISTENs on its own connection for the changes migration 0004 announces and
    drops what they touch. A cached key is trusted for `key_revocation_s_max` after whichever
    is later: the lookup that found it, or the start of the listener's last answered round trip
    (every notification committed before that round trip had arrived by its answer, so a key
    still cached was not revoked before it). While the listener is down nothing confirms, and
    the cache falls back to that short TTL on its own.

    Unknown keys are remembered as unknown for `key_unknown_ttl_s`, so a client repeating a bad
    key costs one lookup per that; a new key's own notification ends that at once.
    """

    def __init__(self, pool: asyncpg.Pool, settings: Settings):
        self._pool = pool
        self._settings = settings
        self._known: dict[bytes, tuple[float, Customer]] = {}
        self._unknown: dict[bytes, float] = {}
        # Bumped by every notification: a lookup that overlapped one does not cache its answer,
        # which may predate the change.
        self._changes = 0
        self._confirmed_s = float("-inf")
        self.listener_up = False

    async def customer(self, api_key: str) -> Customer | None:
        if not _KEY_SHAPE.fullmatch(api_key):
            return None
        key_sha256 = digest(api_key)
        now_s = time.monotonic()
        cached = self._known.get(key_sha256)
        if cached is not None and now_s - max(cached[0], self._confirmed_s) < self._trust_s:
            return cached[1]
        unknown_s = self._unknown.get(key_sha256)
        if unknown_s is not None and now_s - unknown_s < self._settings.key_unknown_ttl_s:
            return None
        changes = self._changes
        found = await _lookup(self._pool, key_sha256)
        if changes == self._changes:
            # Stamped with when the lookup began: the row it read is at least that fresh.
            if found is None:
                _remember(self._unknown, key_sha256, now_s, self._size_max)
            else:
                _remember(self._known, key_sha256, (now_s, found), self._size_max)
        return found

    @property
    def _trust_s(self) -> float:
        return self._settings.key_revocation_s_max

    @property
    def _size_max(self) -> int:
        return self._settings.key_cache_size_max

    @contextlib.asynccontextmanager
    async def listening(self) -> AsyncIterator[None]:
        """Follow key changes while the block runs, reconnecting when the connection is lost."""
        task = asyncio.create_task(self._listen_forever(), name="intake-key-listener")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _listen_forever(self) -> None:
        settings = self._settings
        backoff = OutageBackoff(
            "intake key listener",
            settings.outage_backoff_s_min,
            settings.key_revocation_s_max,
            settings.outage_log_interval_s,
        )
        while True:
            try:
                conn = await asyncpg.connect(
                    settings.database_url, timeout=settings.key_revocation_s_max
                )
            except Exception as exc:  # Whatever keeps Postgres from answering a connect.
                await backoff.failed(exc)
                continue
            try:
                await self._follow(conn, backoff)
            except Exception as exc:  # The connection failed or stopped answering in time.
                await backoff.failed(exc)
            finally:
                self.listener_up = False
                conn.terminate()

    async def _follow(self, conn: asyncpg.Connection, backoff: OutageBackoff) -> None:
        """Listen on `conn` and confirm it answers, until it does not."""
        interval_s = self._trust_s / 2
        await conn.add_listener(KEYS_CHANNEL, self._on_notify)
        # Changes made while no one listened were missed: start from nothing.
        self._forget_all()
        self.listener_up = True
        backoff.answered()
        while True:
            asked_s = time.monotonic()
            # asyncio.timeout, not wait_for, which on Python 3.11 can swallow the cancellation
            # that stops this loop.
            async with asyncio.timeout(interval_s):
                await conn.fetchval("SELECT 1")
            self._confirmed_s = asked_s
            await asyncio.sleep(interval_s)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._changes += 1
        kind, _, value = payload.partition(":")
        if kind == "key":
            key_sha256 = bytes.fromhex(value)
            self._known.pop(key_sha256, None)
            self._unknown.pop(key_sha256, None)
            return
        # A change to a customer (a suspension lifted, say) can make a refused key valid too.
        self._unknown.clear()
        for key in [k for k, (_, found) in self._known.items() if found.customer_id == value]:
            del self._known[key]

    def _forget_all(self) -> None:
        self._changes += 1
        self._known.clear()
        self._unknown.clear()


def _remember(cache: dict, key: bytes, value: object, size_max: int) -> None:
    """Insert `key` as the newest entry, evicting the oldest ones beyond `size_max`."""
    cache.pop(key, None)
    while len(cache) >= size_max:
        del cache[next(iter(cache))]
    cache[key] = value
