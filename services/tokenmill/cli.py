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
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import httpx
from redis.asyncio import Redis as RedisClient
from redis.exceptions import RedisError

from tokenmill import datadir, deadletters, powercap, retention, service
from tokenmill.db import migrate
from tokenmill.embedded import EmbeddedInfra, die_with_parent
from tokenmill.intake import admin, customer_commands
from tokenmill.intake.admin_api import ADMIN_PREFIX, ADMIN_TOKEN_FILE, with_admin_token
from tokenmill.ledger import audit, prices, replay, tariffs
from tokenmill.ledger import commands as books
from tokenmill.ledger.chain import AuditKeyError, with_audit_key
from tokenmill.settings import ENV_PREFIX, Settings
from tokenmill.signing import SigningKeyError, SigningKeys, with_local_key
from tokenmill.streams import Streams, create_groups
from tokenmill.telemetry import commands as power

log = logging.getLogger("tokenmill")

SERVICES = ("ledger", "inspector", "telemetry", "worker", "intake")
# The order `up` stops them in: intake stops taking requests first, the worker finishes or
# hands back its job while its consumers still run, then the consumers drain.
STOP_ORDER = (
    ("intake",),
    ("worker",),
    tuple(name for name in SERVICES if name not in ("intake", "worker")),
)
READY_WAIT_S_MAX = 600.0
# Each worker process loads its own copy of the model (about 1.5 GB with the default one).
WORKERS_MAX = 64


def process_names(workers: int) -> list[str]:
    """The processes `up` runs: every service once, the worker `workers` times."""
    assert 1 <= workers <= WORKERS_MAX
    expanded = [f"worker-{i}" for i in range(1, workers + 1)] if workers > 1 else ["worker"]
    return [n for name in SERVICES for n in (expanded if name == "worker" else [name])]


def service_of(process: str) -> str:
    """The service a process runs: "worker-2" runs the worker."""
    return process.split("-", 1)[0]


@contextlib.contextmanager
def infrastructure(settings: Settings) -> Iterator[Settings]:
    """For every command but `up`: yield settings with real URLs. The configured servers first;
    for the rest, those of the `up` running on this data dir, or else embedded ones started
    for this command alone (the data dir locked meanwhile), never a second pair on its files."""
    if settings.database_url and settings.redis_url:
        yield settings
        return
    data_dir = Path(settings.data_dir)
    datadir.secure(data_dir)
    with datadir.servers(data_dir, settings.data_dir_wait_s_max) as run:
        if run is not None:
            yield dataclasses.replace(
                settings,
                database_url=settings.database_url or run.database_url,
                redis_url=settings.redis_url or run.redis_url,
            )
            return
        with embedded(settings) as (resolved, _):
            yield resolved


@contextlib.contextmanager
def embedded(settings: Settings) -> Iterator[tuple[Settings, EmbeddedInfra]]:
    """Start embedded servers for the URLs not configured; stop them on the way out."""
    infra = EmbeddedInfra(Path(settings.data_dir), start_s_max=settings.embedded_start_s_max)
    try:
        resolved = dataclasses.replace(
            settings,
            database_url=settings.database_url or infra.start_postgres(),
            redis_url=settings.redis_url or infra.start_redis(),
        )
        yield resolved, infra
    finally:
        infra.stop(settings.stop_servers_s_max)


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


async def add_key(settings: Settings, customer_id: str) -> str:
    """Another API key for an existing customer."""
    from tokenmill.intake.customers import new_key

    conn = await asyncpg.connect(settings.database_url)
    try:
        return await new_key(conn, customer_id)
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


def process_settings(process: str, settings: Settings) -> Settings:
    """The settings of one process of `up`: worker i (from 1) serves its metrics on the
    configured port + i - 1, so that several workers on one host never share a port."""
    if service_of(process) != "worker" or not settings.worker_metrics_port:
        return settings
    index = int(process.split("-", 1)[1]) if "-" in process else 1
    return dataclasses.replace(
        settings, worker_metrics_port=settings.worker_metrics_port + index - 1
    )


def spawn(process: str, settings: Settings) -> subprocess.Popen:
    settings = process_settings(process, settings)
    # Each service names its own consumer (host and pid), so a restarted worker is never taken
    # for the dead one it replaces when a lease's owner is checked.
    env = {**os.environ, **settings.to_env()}
    del env[ENV_PREFIX + "CONSUMER"]
    # A session of its own: Ctrl-C reaches only `up`, which then stops every service in turn,
    # instead of every process receiving it at once in whatever state it is in. SIGKILL when
    # `up` dies: with no supervisor left there is no order to stop in, and every service's
    # work is redelivered (and billed once) after a crash.
    return subprocess.Popen(
        [sys.executable, "-m", "tokenmill.cli", "serve", service_of(process)],
        env=env,
        start_new_session=True,
        preexec_fn=die_with_parent(signal.SIGKILL),
    )


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@dataclasses.dataclass
class RestartBudget:
    """At most `per_minute_max` restarts of any one service or embedded server in a minute:
    past that `up` stops everything and says which one kept exiting.

    Counted per process: one crash-looping child is what this stops, while several children
    each dying once (a host under memory pressure, an operator's test) are each restarted.
    """

    per_minute_max: int
    times_s: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def spend(self, name: str, code: int | None) -> None:
        now_s = time.monotonic()
        recent_s = [t for t in self.times_s.get(name, []) if now_s - t < 60] + [now_s]
        self.times_s[name] = recent_s
        if len(recent_s) > self.per_minute_max:
            raise SystemExit(f"{name} keeps exiting (code {code}); stopping")


def supervise(
    settings: Settings, infra: EmbeddedInfra, first_key: str | None, workers: int = 1
) -> None:
    """Run every service as its own process (the worker `workers` times) until Ctrl-C or
    SIGTERM; restart a process or an embedded server that dies (a server on the same address,
    which every service holds)."""
    children = {name: spawn(name, settings) for name in process_names(workers)}
    budget = RestartBudget(settings.restarts_per_minute_max)
    try:
        wait_until_ready(settings, children)
        print_banner(settings, first_key)
        while True:
            time.sleep(1)
            for server in infra.dead():
                budget.spend(server.name, server.exit_code())
                infra.restart(server)
            for name, child in children.items():
                if child.poll() is None:
                    continue
                budget.spend(name, child.returncode)
                log.warning("%s exited with code %s; restarting it", name, child.returncode)
                children[name] = spawn(name, settings)
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave services running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_in_order(children, settings)


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


def stop_in_order(children: dict[str, subprocess.Popen], settings: Settings) -> None:
    bounds_s = (
        settings.stop_intake_s_max,
        settings.stop_worker_s_max,
        settings.stop_consumers_s_max,
    )
    for names, wait_s in zip(STOP_ORDER, bounds_s, strict=True):
        stop_together({p: c for p, c in children.items() if service_of(p) in names}, wait_s)


def stop_together(processes: dict[str, subprocess.Popen], wait_s: float) -> None:
    """SIGTERM each, then wait for all within `wait_s`, killing those still running after."""
    for process in processes.values():
        if process.poll() is None:
            process.terminate()
    deadline_s = time.monotonic() + wait_s
    for name, process in processes.items():
        try:
            process.wait(timeout=max(0.0, deadline_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", name, wait_s)
            process.kill()
            process.wait()


def admin_token_source(settings: Settings) -> str:
    token_file = Path(settings.data_dir) / ADMIN_TOKEN_FILE
    if os.environ.get(ENV_PREFIX + "ADMIN_TOKEN"):
        return "TOKENMILL_ADMIN_TOKEN"
    return f"cat {token_file}"


def print_banner(settings: Settings, first_key: str | None) -> None:
    base = f"http://{settings.http_host}:{settings.http_port}"
    key = first_key or "<your key: tokenmill keys create --name NAME --tier standard>"
    print(
        f"\ntokenmill is running: {base}  (Ctrl-C stops it)\n"
        + "the worker may still be loading the model; jobs queue until it is ready\n"
        + (f"first API key (shown once, keep it): {first_key}\n" if first_key else "")
        + f"admin credential for {ADMIN_PREFIX}: {admin_token_source(settings)}\n"
        + f"\n  curl -s {base}/v1/jobs -H 'Authorization: Bearer {key}' \\\n"
        + "       -H 'Content-Type: application/json' \\\n"
        + '       -d \'{"prompt": "Name three colours.", "max_tokens": 32}\'\n',
        flush=True,
    )


def cmd_up(settings: Settings, args: argparse.Namespace) -> None:
    # Explicit handlers from the start: SIGTERM (docker stop, systemd) must stop whatever has
    # been started, as Ctrl-C does, and a parent that started us in the background may have
    # left SIGINT ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    # Everything `up` and its children write (the model cache in the data dir included) is
    # for our user only: it is made of prompts, outputs and keys.
    os.umask(0o077)
    data_dir = Path(settings.data_dir)
    datadir.secure(data_dir)
    settings = with_admin_token(with_local_key(settings))
    settings = with_audit_key(settings)
    with contextlib.suppress(KeyboardInterrupt):  # Stopped while starting: nothing to report.
        with datadir.exclusive(data_dir), embedded(settings) as (resolved, infra):
            run = datadir.RunInfo(os.getpid(), resolved.database_url, resolved.redis_url)
            datadir.write_run(data_dir, run)
            supervise(resolved, infra, asyncio.run(prepare(resolved)), args.workers)


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


def cmd_keys(settings: Settings, args: argparse.Namespace) -> None:
    if args.keys_command == "create":
        cmd_keys_create(settings, args)
        return
    with infrastructure(settings) as resolved:
        asyncio.run(bootstrap(resolved))
        try:
            print(asyncio.run(admin.command(resolved, args)))
        except LookupError as exc:
            raise SystemExit(f"tokenmill keys {args.keys_command}: {exc}") from exc


def cmd_keys_create(settings: Settings, args: argparse.Namespace) -> None:
    if (args.name is None) == (args.customer is None):
        raise SystemExit(
            "tokenmill keys create: give --name (a new customer) or --customer (another key "
            "for an existing one)"
        )
    with infrastructure(settings) as resolved:
        asyncio.run(bootstrap(resolved))
        if args.customer is not None:
            try:
                key = asyncio.run(add_key(resolved, args.customer))
            except LookupError as exc:
                raise SystemExit(f"tokenmill keys create: {exc}") from exc
            print(f"customer {args.customer}")
            print(f"API key (shown once): {key}")
            return
        customer_id, key = asyncio.run(
            create_key(resolved, args.name, args.tier, args.region or resolved.region)
        )
        print(f"customer {customer_id} ({args.tier}, {args.region or resolved.region})")
        print(f"API key (shown once): {key}")


def operate(
    settings: Settings,
    what: str,
    work: Callable[[Settings], tuple[str, bool]],
    refused: tuple[type[Exception], ...],
) -> None:
    """Run one operator command on the servers of the live `up` (or the configured ones, or
    embedded ones for it alone): print what it says, exit 1 when it reports a failure (a
    reconcile that differs, a chain that does not verify), and turn refused input into one
    line that names the command."""
    with infrastructure(settings) as resolved:
        asyncio.run(bootstrap(resolved))
        try:
            output, ok = work(resolved)
        except refused as exc:
            raise SystemExit(f"tokenmill {what}: {exc}") from None
    print(output)
    if not ok:
        raise SystemExit(1)


def cmd_accounts(settings: Settings, args: argparse.Namespace) -> None:
    """`tokenmill customers|budgets|credits ...`."""
    operate(
        settings,
        f"{args.command} {args.action}",
        lambda s: asyncio.run(customer_commands.command(s, args)),
        (LookupError, ValueError),
    )


def cmd_tariffs(settings: Settings, args: argparse.Namespace) -> None:
    operate(
        settings,
        f"tariffs {args.tariffs_command}",
        lambda s: (asyncio.run(tariffs.command(s, args)), True),
        (prices.PriceError,),
    )


def cmd_prices(settings: Settings, args: argparse.Namespace) -> None:
    operate(
        settings,
        f"prices {args.prices_command}",
        lambda s: (asyncio.run(prices.command(s, args)), True),
        (prices.PriceError,),
    )


def cmd_dlq(settings: Settings, args: argparse.Namespace) -> None:
    with infrastructure(with_local_key(settings)) as resolved:
        try:
            output, done = asyncio.run(deadletters.command(resolved, args))
        except LookupError as exc:
            raise SystemExit(f"tokenmill dlq: {exc}") from exc
    print(output)
    if not done:
        raise SystemExit(1)


def _worker_count(raw: str) -> int:
    try:
        count = int(raw)
    except ValueError:
        count = 0
    if not 1 <= count <= WORKERS_MAX:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {WORKERS_MAX}")
    return count


def cmd_audit(settings: Settings, args: argparse.Namespace) -> None:
    if args.audit_command == "replay":
        # Bad input is refused before anything is connected to, with argparse's status.
        try:
            replay.window_of(args)
            replay.lanes_of(args)
        except replay.ReplayInputError as exc:
            print(f"tokenmill audit replay: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        if args.source == "redis":
            # The streams' entries are checked against the key `up`'s services sign with.
            settings = with_local_key(settings)
    operate(
        settings,
        f"audit {args.audit_command}",
        lambda s: audit.run(s, args),
        (LookupError, AuditKeyError),
    )


def cmd_streams(settings: Settings, args: argparse.Namespace) -> None:
    operate(
        settings,
        f"streams {args.streams_command}",
        lambda s: (asyncio.run(retention.command(s, args)), True),
        (retention.RetentionConfigError,),
    )


def cmd_books(settings: Settings, args: argparse.Namespace) -> None:
    """`tokenmill invoices ...` and `tokenmill reports`."""
    operate(
        settings,
        args.command,
        lambda s: (asyncio.run(books.command(s, args)), True),
        (books.CommandError, LookupError),
    )


def cmd_power(settings: Settings, args: argparse.Namespace) -> None:
    """`tokenmill power cap WATTS|--clear` and `tokenmill power status`."""
    what = f"power {args.power_command}"
    try:
        power.check(args, settings)  # Bad input is refused before any server is touched.
    except powercap.CapError as exc:
        raise SystemExit(f"tokenmill {what}: {exc}") from None
    work = lambda s: (asyncio.run(power.command(s, args)), True)  # noqa: E731
    operate(with_local_key(settings), what, work, (powercap.CapError,))


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="tokenmill", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="run the whole platform (embedded servers by default)")
    up.add_argument(
        "--workers",
        type=_worker_count,
        default=1,
        help=f"worker processes sharing the region's jobs (1 to {WORKERS_MAX}; default 1)",
    )
    serve = commands.add_parser("serve", help="run one service in this process")
    serve.add_argument("service", choices=SERVICES)
    commands.add_parser("migrate", help="apply migrations and create consumer groups")
    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser(
        "create", help="create a customer and its first API key, or another key (--customer)"
    )
    create.add_argument("--name", help="the new customer's name")
    create.add_argument("--customer", help="an existing customer's id: a second key for it")
    create.add_argument("--tier", choices=("free", "standard", "premium"), default="standard")
    create.add_argument("--region", default=None)
    admin.add_commands(keys)
    customer_commands.add_commands(commands)
    deadletters.add_commands(commands)
    prices.add_commands(commands)
    tariffs.add_commands(commands)
    audit.add_commands(commands)
    retention.add_commands(commands)
    books.add_commands(commands)
    power.add_commands(commands)
    return root


def main(argv: list[str] | None = None) -> None:
    service.configure_logging()
    args = parser().parse_args(argv)
    handlers = {
        "up": cmd_up,
        "serve": cmd_serve,
        "migrate": cmd_migrate,
        "keys": cmd_keys,
        "dlq": cmd_dlq,
        **{name: cmd_accounts for name in customer_commands.COMMANDS},
        "prices": cmd_prices,
        "tariffs": cmd_tariffs,
        "audit": cmd_audit,
        "streams": cmd_streams,
        "invoices": cmd_books,
        "reports": cmd_books,
        "power": cmd_power,
    }
    try:
        handlers[args.command](Settings.from_env(), args)
    except (
        OSError,
        asyncpg.PostgresError,
        RedisError,
        SigningKeyError,
        datadir.DataDirBusy,
        AuditKeyError,
    ) as exc:
        # A server that is down or misnamed is an operator's problem, not a crash to debug.
        raise SystemExit(f"tokenmill {args.command}: {type(exc).__name__}: {exc}") from exc


if __name__ == "__main__":
    main()
