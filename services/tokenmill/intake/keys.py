"""API keys: shown once at creation, stored only as a SHA-256 digest, bound to one customer."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

import asyncpg

from tokenmill.events import TIERS, new_id

KEY_PREFIX = "tm_"


@dataclass(frozen=True)
class Customer:
    customer_id: str
    name: str
    tier: str
    region: str


def digest(api_key: str) -> bytes:
    # Keys carry 256 random bits, so a plain fast hash is as strong as a slow one here.
    return hashlib.sha256(api_key.encode()).digest()


async def create_customer(conn: asyncpg.Connection, name: str, tier: str, region: str) -> Customer:
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {', '.join(TIERS)}, not {tier!r}")
    customer = Customer(f"cus_{new_id()}", name, tier, region)
    await conn.execute(
        "INSERT INTO intake.customers (customer_id, name, tier, region) VALUES ($1, $2, $3, $4)",
        customer.customer_id,
        name,
        tier,
        region,
    )
    return customer


async def issue_key(conn: asyncpg.Connection, customer_id: str) -> str:
    """Create a key for the customer and return it; this is the only time it is readable."""
    api_key = KEY_PREFIX + secrets.token_urlsafe(32)
    await conn.execute(
        "INSERT INTO intake.api_keys (key_id, key_sha256, key_prefix, customer_id) "
        "VALUES ($1, $2, $3, $4)",
        f"key_{new_id()}",
        digest(api_key),
        api_key[:10],
        customer_id,
    )
    return api_key


async def _lookup(pool: asyncpg.Pool, key_sha256: bytes) -> Customer | None:
    row = await pool.fetchrow(
        "SELECT c.customer_id, c.name, c.tier, c.region FROM intake.api_keys k "
        "JOIN intake.customers c USING (customer_id) "
        "WHERE k.key_sha256 = $1 AND k.revoked_at IS NULL",
        key_sha256,
    )
    return Customer(**dict(row)) if row else None


class KeyCache:
    """Remembers valid keys for `ttl_s`, so a busy client costs one lookup per TTL rather than
    one per request. A revoked key keeps working for at most `ttl_s`. Unknown keys are not
    remembered: a key created a moment ago must work at once.
    """

    def __init__(self, pool: asyncpg.Pool, ttl_s: float = 5.0, size_max: int = 10_000):
        self._pool = pool
        self._ttl_s = ttl_s
        self._size_max = size_max
        self._known: dict[bytes, tuple[float, Customer]] = {}

    async def customer(self, api_key: str) -> Customer | None:
        if not api_key.startswith(KEY_PREFIX):
            return None
        key_sha256 = digest(api_key)
        now_s = time.monotonic()
        cached = self._known.get(key_sha256)
        if cached is not None and now_s - cached[0] < self._ttl_s:
            return cached[1]
        found = await _lookup(self._pool, key_sha256)
        if found is not None:
            if len(self._known) >= self._size_max:
                self._known.clear()  # Bounded: start over rather than grow without limit.
            self._known[key_sha256] = (now_s, found)
        return found
