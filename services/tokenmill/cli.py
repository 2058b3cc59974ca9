"""The `tokenmill` command: run the whole factory, one service, migrations, or manage keys."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
from redis.asyncio import Redis as RedisClient
from redis.exceptions import RedisError

from tokenmill import deadletters, service
from tokenmill.db import migrate
from tokenmill.embedded import EmbeddedInfra
from tokenmill.settings import Settings
from tokenmill.signing import SigningKeyError, SigningKeys, with_local_key
from tokenmill.streams import Streams, create_groups

log = logging.getLogger("tokenmill")

SERVICES = ("ledger", "inspector", "telemetry", "worker", "intake")
# A service that keeps crashing is not restarted forever: past this many restarts in a
# minute, `up` stops everything and says which one failed.
RESTARTS_PER_MINUTE_MAX = 5
READY_WAIT_S_MAX = 600.0


@contextlib.contextmanager
def infrastructure(settings: Settings) -> Iterator[Settings]:
    """Yield settings with real URLs: the configured servers, and embedded ones for the rest."""
    infra = EmbeddedInfra(Path(settings.data_dir))
    try:
        yield dataclasses.replace(
            settings,
            database_url=settings.database_url or infra.start_postgres(),
            redis_url=settings.redis_url or infra.start_redis(),
        )
    finally:
        infra.stop()


async def bootstrap(settings: Settings) -> list[str]:
    """Apply migrations and create every consumer group; safe to run any number of times."""
    applied = await migrate(settings.database_url)
    redis = RedisClient.from_url(settings.redis_url)
    try:
        await create_groups(redis, Streams(settings.stream_prefix).groups(settings.region))
    finally:
        await redis.aclose()
    return applied


async def create_key(settings: Settings, name: str, tier: str, region: str) -> tuple[str, str]:
    """Create a customer and its first API key; return (customer id, key)."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with conn.transaction():
            return await _customer_with_key(conn, name, tier, region)
    finally:
        await conn.close()


async def default_customer_key(settings: Settings) -> str | None:
    """On a database with no customers yet, create a default one and return its key."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with conn.transaction():
            if await conn.fetchval("SELECT exists(SELECT 1 FROM intake.customers)"):
                return None
            _, key = await _customer_with_key(conn, "default", "standard", settings.region)
            return key
    finally:
        await conn.close()


async def _customer_with_key(
    conn: asyncpg.Connection, name: str, tier: str, region: str
) -> tuple[str, str]:
    from tokenmill.intake.keys import create_customer, issue_key

    customer = await create_customer(conn, name, tier, region)
    return customer.customer_id, await issue_key(conn, customer.customer_id)


async def prepare(settings: Settings) -> str | None:
    """Bootstrap the servers for `up`; return the first API key if one was just made."""
    await bootstrap(settings)
    return await default_customer_key(settings)


def spawn(name: str, settings: Settings) -> subprocess.Popen:
    env = {**os.environ, **settings.to_env()}
    # A session of its own: Ctrl-C reaches only `up`, which then stops every service in turn,
    # instead of every process receiving it at once in whatever state it is in.
    return subprocess.Popen(
        [sys.executable, "-m", "tokenmill.cli", "serve", name], env=env, start_new_session=True
    )


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def supervise(settings: Settings, first_key: str | None) -> None:
    """Run every service as its own process until Ctrl-C or SIGTERM; restart one that dies."""
    # Explicit handlers: SIGTERM (docker stop, systemd) must stop the services as Ctrl-C does,
    # and a parent that started us in the background may have left SIGINT ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    children = {name: spawn(name, settings) for name in SERVICES}
    restarts: list[float] = []
    try:
        wait_until_ready(settings, children)
        print_banner(settings, first_key)
        while True:
            time.sleep(1)
            for name, child in children.items():
                if child.poll() is None:
                    continue
                restarts = [t for t in restarts if time.monotonic() - t < 60] + [time.monotonic()]
                if len(restarts) > RESTARTS_PER_MINUTE_MAX:
                    raise SystemExit(f"{name} keeps exiting (code {child.returncode}); stopping")
                log.warning("%s exited with code %s; restarting it", name, child.returncode)
                children[name] = spawn(name, settings)
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave services running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_all(children)


def wait_until_ready(settings: Settings, children: dict[str, subprocess.Popen]) -> None:
    url = f"http://{settings.http_host}:{settings.http_port}/healthz"
    deadline = time.monotonic() + READY_WAIT_S_MAX
    while time.monotonic() < deadline:
        for name, child in children.items():
            if child.poll() is not None:
                raise SystemExit(f"{name} exited during start-up (code {child.returncode})")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.5)
    raise SystemExit(f"intake did not answer {url} within {READY_WAIT_S_MAX:.0f}s")


def stop_all(children: dict[str, subprocess.Popen]) -> None:
    for child in children.values():
        if child.poll() is None:
            child.terminate()
    for name, child in children.items():
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in 15s; killing it", name)
            child.kill()


def print_banner(settings: Settings, first_key: str | None) -> None:
    base = f"http://{settings.http_host}:{settings.http_port}"
    key = first_key or "<your key: tokenmill keys create --name NAME --tier standard>"
    print(
        f"\ntokenmill is running: {base}  (Ctrl-C stops it)\n"
        + "the worker may still be loading the model; jobs queue until it is ready\n"
        + (f"first API key (shown once, keep it): {first_key}\n" if first_key else "")
        + f"\n  curl -s {base}/v1/jobs -H 'Authorization: Bearer {key}' \\\n"
        + "       -H 'Content-Type: application/json' \\\n"
        + '       -d \'{"prompt": "Name three colours.", "max_tokens": 32}\'\n',
        flush=True,
    )


def cmd_up(settings: Settings, _: argparse.Namespace) -> None:
    settings = with_local_key(settings)
    with infrastructure(settings) as resolved:
        supervise(resolved, asyncio.run(prepare(resolved)))


def cmd_serve(settings: Settings, args: argparse.Namespace) -> None:
    if not (settings.database_url and settings.redis_url):
        raise SystemExit(
            "serve needs TOKENMILL_DATABASE_URL and TOKENMILL_REDIS_URL "
            "(`tokenmill up` sets them for the services it starts)"
        )
    try:
        SigningKeys.parse(settings.signing_keys)
    except SigningKeyError as exc:
        raise SystemExit(
            f"serve: {exc}; set TOKENMILL_SIGNING_KEYS (`tokenmill up` sets it for its services)"
        ) from exc
    if args.service == "intake":
        from tokenmill.intake.main import serve as serve_intake

        asyncio.run(serve_intake(settings))
        return
    module = __import__(f"tokenmill.{args.service}.main", fromlist=["wire"])
    needs_db = args.service not in ("worker", "telemetry")
    asyncio.run(service.serve(args.service, settings, module.wire, needs_db=needs_db))


def cmd_migrate(settings: Settings, _: argparse.Namespace) -> None:
    with infrastructure(settings) as resolved:
        applied = asyncio.run(bootstrap(resolved))
        print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))


def cmd_keys_create(settings: Settings, args: argparse.Namespace) -> None:
    with infrastructure(settings) as resolved:
        asyncio.run(bootstrap(resolved))
        customer_id, key = asyncio.run(
            create_key(resolved, args.name, args.tier, args.region or resolved.region)
        )
        print(f"customer {customer_id} ({args.tier}, {args.region or resolved.region})")
        print(f"API key (shown once): {key}")


def cmd_dlq(settings: Settings, args: argparse.Namespace) -> None:
    with infrastructure(with_local_key(settings)) as resolved:
        try:
            output, done = asyncio.run(deadletters.command(resolved, args))
        except LookupError as exc:
            raise SystemExit(f"tokenmill dlq: {exc}") from exc
    print(output)
    if not done:
        raise SystemExit(1)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="tokenmill", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="run the whole platform (embedded servers by default)")
    serve = commands.add_parser("serve", help="run one service in this process")
    serve.add_argument("service", choices=SERVICES)
    commands.add_parser("migrate", help="apply migrations and create consumer groups")
    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="create a customer and its first API key")
    create.add_argument("--name", required=True)
    create.add_argument("--tier", choices=("free", "standard", "premium"), default="standard")
    create.add_argument("--region", default=None)
    deadletters.add_commands(commands)
    return root


def main(argv: list[str] | None = None) -> None:
    service.configure_logging()
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    args = parser().parse_args(argv)
    handlers = {
        "up": cmd_up,
        "serve": cmd_serve,
        "migrate": cmd_migrate,
        "keys": cmd_keys_create,
        "dlq": cmd_dlq,
    }
    try:
        handlers[args.command](Settings.from_env(), args)
    except (OSError, asyncpg.PostgresError, RedisError, SigningKeyError) as exc:
        # A server that is down or misnamed is an operator's problem, not a crash to debug.
        raise SystemExit(f"tokenmill {args.command}: {type(exc).__name__}: {exc}") from exc


if __name__ == "__main__":
    main()
