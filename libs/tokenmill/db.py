"""Postgres access: the connection pool, the migration runner and the consumer inbox."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from tokenmill.events import Event
from tokenmill.settings import Settings

log = logging.getLogger(__name__)


def find_migrations_dir(package_dir: Path) -> Path:
    """Where the migrations are, for the `tokenmill` package installed in `package_dir`.

    A wheel (and so the container) carries them inside the package, as tokenmill/migrations
    (pyproject's force-include); an editable install reads the repository's top-level
    migrations/, the single source, two levels above libs/tokenmill.
    """
    for candidate in (package_dir / "migrations", package_dir.parents[1] / "migrations"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no migrations/ inside or beside the package at {package_dir}")


MIGRATIONS_DIR = find_migrations_dir(Path(__file__).resolve().parent)
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Any fixed number works: it only has to be the same in every process that migrates.
_MIGRATION_LOCK_KEY = 0x746D_6D69


async def _init_connection(conn: asyncpg.Connection) -> None:
    for json_type in ("json", "jsonb"):
        await conn.set_type_codec(
            json_type, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def create_pool(settings: Settings) -> asyncpg.Pool:
    assert settings.database_url, "database_url must be resolved before connecting"
    return await asyncpg.create_pool(
        settings.database_url,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        init=_init_connection,
    )


async def connect(database_url: str) -> asyncpg.Connection:
    """One connection that reads and writes JSON as the pool's do: for CLI commands that
    queue outbox events (whose headers are jsonb)."""
    conn = await asyncpg.connect(database_url)
    await _init_connection(conn)
    return conn


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        assert match, f"migration file {path.name} must be named NNNN_snake_name.sql"
        migrations.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in migrations]
    assert len(versions) == len(set(versions)), f"duplicate migration versions: {versions}"
    return migrations


async def migrate(
    database_url: str, directory: Path = MIGRATIONS_DIR, *, quiet: bool = False
) -> list[str]:
    """Apply every migration not yet applied, each in its own transaction; return their names.
    Each is logged at INFO, or at DEBUG when `quiet` (a replay's scratch database).

    An advisory lock serialises concurrent runners, so five services starting at once apply
    each migration exactly once. An applied migration whose file changed is refused: the
    database would no longer match what the files say it is.
    """
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_KEY)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS public.tokenmill_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   checksum   text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        applied = {
            r["version"]: r["checksum"]
            for r in await conn.fetch("SELECT version, checksum FROM public.tokenmill_migrations")
        }
        done = []
        for migration in load_migrations(directory):
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise RuntimeError(
                        f"migration {migration.version}_{migration.name} was changed after it "
                        "was applied; add a new migration instead of editing an old one"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO public.tokenmill_migrations (version, name, checksum) "
                    "VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            done.append(f"{migration.version:04d}_{migration.name}")
            log.log(
                logging.DEBUG if quiet else logging.INFO,
                "applied migration %04d_%s", migration.version, migration.name,
            )  # fmt: skip
        return done
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def listening(
    pool: asyncpg.Pool, channel: str, callback: Callable[..., None]
) -> AsyncIterator[None]:
    """Keep one pooled connection LISTENing on `channel` while the block runs.

    The connection goes back to the pool however the block ends, cancellation during the
    LISTEN itself included; a connection that never comes back makes pool.close() wait forever.
    """
    async with pool.acquire() as conn:
        await conn.add_listener(channel, callback)
        try:
            yield
        finally:
            # The database may have gone away first; then the listener is gone with it.
            with contextlib.suppress(asyncpg.InterfaceError, OSError):
                await conn.remove_listener(channel, callback)


async def first_delivery(conn: asyncpg.Connection, schema: str, event: Event, stream: str) -> bool:
    """Record that `schema`'s consumer has handled `event`; False if it already had.

    Call it inside the transaction that applies the event: the duplicate check and the write
    commit together or not at all, so a redelivery can never apply an event twice and a crash
    can never mark an event handled that was not.
    """
    assert re.fullmatch(r"[a-z_]+", schema), schema
    inserted = await conn.fetchval(
        f"INSERT INTO {schema}.inbox (event_id, event_type, stream) VALUES ($1, $2, $3) "
        "ON CONFLICT (event_id) DO NOTHING RETURNING true",
        event.event_id,
        event.type,
        stream,
    )
    return bool(inserted)
