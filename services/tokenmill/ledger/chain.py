"""The hash chain over the ledger's event log and its signed checkpoints (verify.py checks them).

Sealing rule (migrations/0010_audit_chain.sql says the same): every event is queued for sealing
by a trigger in the transaction that logs it; one sealer at a time takes queued events in seq
order and appends them to ledger.event_chain at gapless positions with
hash = sha256(previous hash || body), the previous hash of position 1 being 32 zero bytes. The
chain's order is seal order: an event whose transaction committed late is sealed late, never
skipped, and never sealed twice (event_seq is UNIQUE).

A checkpoint is the operator's Ed25519 signature over (position, head hash, time). Verifying
recomputes every hash from the bodies as stored and checks every checkpoint against the hashes
it walked, so a body changed, a row deleted or two rows swapped is found at its position, and a
chain rewritten after such a change no longer matches the checkpoints signed before it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tokenmill import datadir
from tokenmill.outage import stop_if_cancelled
from tokenmill.settings import Settings

log = logging.getLogger(__name__)

GENESIS_HASH = bytes(32)
KEY_FILE_NAME = "audit.key"
# One sealer at a time across every ledger process: two would fork the chain.
_SEAL_LOCK_KEY = 0x746D_6175


class AuditKeyError(ValueError):
    """The audit key file is missing or does not hold a 32-byte hex seed."""


def link(prev_hash: bytes, body: bytes) -> bytes:
    return hashlib.sha256(prev_hash + body).digest()


# --- keys ----------------------------------------------------------------------------------


def audit_key_path(settings: Settings) -> Path:
    return Path(settings.audit_key_file or Path(settings.data_dir) / KEY_FILE_NAME)


def new_seed_hex() -> str:
    seed = Ed25519PrivateKey.generate().private_bytes_raw()
    return seed.hex()


def with_audit_key(settings: Settings) -> Settings:
    """`settings` naming an audit key file: the configured one, or else the data dir's,
    created (owner-only) the first time, so `up`'s checkpoints keep one key across restarts."""
    path = audit_key_path(settings)
    if not settings.audit_key_file:
        datadir.secret(path, new_seed_hex)
    load_private_key(path)  # A damaged key file is refused here, not by the ledger later.
    return dataclasses.replace(settings, audit_key_file=str(path))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        seed = bytes.fromhex(path.read_text().strip())
    except FileNotFoundError as exc:
        raise AuditKeyError(f"no audit key file at {path}") from exc
    except ValueError as exc:
        raise AuditKeyError(f"audit key file {path} does not hold a hex seed") from exc
    if len(seed) != 32:
        raise AuditKeyError(f"audit key file {path} holds {len(seed)} bytes, not 32")
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_key_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


# --- sealing -------------------------------------------------------------------------------


async def seal_batch(conn: asyncpg.Connection, batch_max: int) -> int:
    """Seal up to `batch_max` queued events in one transaction; return how many."""
    assert batch_max > 0
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SEAL_LOCK_KEY)
        head = await conn.fetchrow(
            "SELECT position, hash FROM ledger.event_chain ORDER BY position DESC LIMIT 1"
        )
        position, prev_hash = (head["position"], head["hash"]) if head else (0, GENESIS_HASH)
        taken = await conn.fetch(
            "DELETE FROM ledger.unsealed WHERE seq IN "
            "(SELECT seq FROM ledger.unsealed ORDER BY seq LIMIT $1) RETURNING seq",
            batch_max,
        )
        # The seqs as an array value, not a join: the planner then looks each one up by its
        # index instead of hashing the whole log once a batch.
        rows = await conn.fetch(
            "SELECT seq, body FROM ledger.events WHERE seq = ANY($1::bigint[]) ORDER BY seq",
            [row["seq"] for row in taken],
        )
        records = []
        for seq, body in rows:
            position += 1
            prev_hash = link(prev_hash, body.encode())
            records.append((position, seq, prev_hash))
        if records:
            await conn.copy_records_to_table(
                "event_chain",
                schema_name="ledger",
                columns=["position", "event_seq", "hash"],
                records=records,
            )
    assert len(records) <= batch_max
    return len(records)


async def seal(pool: asyncpg.Pool, batch_max: int, batches_max: int = 1_000_000) -> int:
    """Seal queued events a batch per transaction until none are left; return how many."""
    sealed = 0
    async with pool.acquire() as conn:
        for _ in range(batches_max):
            count = await seal_batch(conn, batch_max)
            sealed += count
            if count < batch_max:
                break
    return sealed


# --- checkpoints ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    position: int
    head_hash: bytes
    signed_at: datetime
    public_key: bytes
    signature: bytes

    def message(self) -> bytes:
        return checkpoint_message(self.position, self.head_hash, self.signed_at)

    def signature_valid(self) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(
                self.signature, self.message()
            )
        except InvalidSignature:
            return False
        return True

    def as_json(self) -> dict[str, object]:
        """What gets published: everything needed to check it against a chain, offline."""
        return {
            "position": self.position,
            "head_hash": self.head_hash.hex(),
            "signed_at": iso(self.signed_at),
            "public_key": self.public_key.hex(),
            "signature": self.signature.hex(),
        }


def checkpoint_message(position: int, head_hash: bytes, signed_at: datetime) -> bytes:
    """The signed bytes: canonical JSON (sorted keys, no spaces) of the three facts."""
    facts = {"head_hash": head_hash.hex(), "position": position, "signed_at": iso(signed_at)}
    return json.dumps(facts, sort_keys=True, separators=(",", ":")).encode()


def iso(at: datetime) -> str:
    # Microseconds, UTC, "Z": the exact text a verifier rebuilds from the stored timestamp.
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def write_checkpoint(conn: asyncpg.Connection, key: Ed25519PrivateKey) -> Checkpoint | None:
    """Sign and store the chain's current head; None while the chain is empty."""
    head = await conn.fetchrow(
        "SELECT position, hash FROM ledger.event_chain ORDER BY position DESC LIMIT 1"
    )
    if head is None:
        return None
    # Postgres keeps microseconds, as datetime does: the time reads back exactly as signed.
    signed_at = datetime.now(UTC)
    message = checkpoint_message(head["position"], head["hash"], signed_at)
    checkpoint = Checkpoint(
        head["position"], head["hash"], signed_at, public_key_bytes(key), key.sign(message)
    )
    await conn.execute(
        "INSERT INTO ledger.checkpoints (position, head_hash, signed_at, public_key, signature) "
        "VALUES ($1, $2, $3, $4, $5)",
        checkpoint.position,
        checkpoint.head_hash,
        checkpoint.signed_at,
        checkpoint.public_key,
        checkpoint.signature,
    )
    assert checkpoint.signature_valid()
    return checkpoint


async def checkpoints(
    conn: asyncpg.Connection, position_from: int = 1, position_to: int | None = None
) -> list[Checkpoint]:
    rows = await conn.fetch(
        "SELECT position, head_hash, signed_at, public_key, signature FROM ledger.checkpoints "
        "WHERE position >= $1 AND ($2::bigint IS NULL OR position <= $2) "
        "ORDER BY position, checkpoint_id",
        position_from,
        position_to,
    )
    return [Checkpoint(*row) for row in rows]


# --- the ledger's loop ---------------------------------------------------------------------


async def run_sealer(pool: asyncpg.Pool, settings: Settings) -> None:
    """Seal what was logged every interval, and sign a checkpoint when one is due."""
    key = _ledger_key(settings)
    last_checkpoint_s = 0.0
    loop = asyncio.get_running_loop()
    while True:
        try:
            await seal(pool, settings.audit_seal_batch_max)
            if key is not None and loop.time() - last_checkpoint_s >= (
                settings.audit_checkpoint_interval_s
            ):
                async with pool.acquire() as conn:
                    await _checkpoint_if_moved(conn, key)
                last_checkpoint_s = loop.time()
        except Exception as exc:  # Postgres down: the queue keeps, the next round seals it.
            stop_if_cancelled()
            log.warning("audit sealer: %s", exc)
        await asyncio.sleep(settings.audit_seal_interval_s)


def _ledger_key(settings: Settings) -> Ed25519PrivateKey | None:
    try:
        return load_private_key(audit_key_path(settings))
    except AuditKeyError as exc:
        log.warning("audit checkpoints are not signed by the ledger: %s", exc)
        return None


async def _checkpoint_if_moved(conn: asyncpg.Connection, key: Ed25519PrivateKey) -> None:
    latest = await conn.fetchval("SELECT max(position) FROM ledger.checkpoints")
    head = await conn.fetchval("SELECT max(position) FROM ledger.event_chain")
    if head is not None and head != latest:
        await write_checkpoint(conn, key)
