"""The factory's services as child processes: used by the end-to-end tests and the bench."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx

from tokenmill.intake.keys import create_customer, issue_key
from tokenmill.settings import Settings

SERVICES = ("ledger", "inspector", "telemetry", "worker", "intake")
START_S_MAX = 120.0


class Factory:
    """The five services as child processes, sharing one test database and stream prefix."""

    def __init__(self, settings: Settings, log_dir: Path):
        self.settings = settings
        self.base_url = f"http://127.0.0.1:{settings.http_port}"
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen] = {}
        # The database is the whole test run's: rows from before this are other tests'.
        self.started_at = datetime.now(UTC)

    def start(self, name: str) -> None:
        env = {**os.environ, **self.settings.to_env()}
        env.pop("TOKENMILL_CONSUMER")  # Each process names itself, as in production.
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.processes[name] = subprocess.Popen(
            # "worker-2" is a second worker, as `tokenmill up --workers N` names them.
            [sys.executable, "-m", "tokenmill.cli", "serve", name.split("-", 1)[0]],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_S_MAX
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                assert process.poll() is None, f"{name} exited: see {self.log_dir}/{name}.log"
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("intake did not become healthy")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_factory(
    settings: Settings, logs: Path, name: str, services=SERVICES, **overrides
) -> Iterator[Factory]:
    """Every service of `services` as its own process, on a stream prefix of its own (`name`),
    the modelled CPU meter and a short claim; stopped on exit."""
    factory_settings = dataclasses.replace(
        settings,
        stream_prefix=f"{settings.stream_prefix}.{name}",
        http_port=free_port(),
        claim_idle_ms=3000,
        meter="modelled-cpu",
        device="cpu",
        **overrides,
    )
    running = Factory(factory_settings, logs)
    for service in services:
        running.start(service)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


async def customer_key(factory: Factory, name: str, tier: str) -> str:
    """A new customer of `tier` and an API key for it."""
    conn = await asyncpg.connect(factory.settings.database_url)
    try:
        async with conn.transaction():
            customer = await create_customer(conn, name, tier, factory.settings.region)
            return await issue_key(conn, customer.customer_id)
    finally:
        await conn.close()
