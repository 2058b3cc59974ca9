"""The data directory's lock and run file: one `tokenmill up` per data dir, and every other
command uses the servers of the live `up` instead of starting a second Redis or Postgres on
the same files.

Whoever runs the embedded servers holds an exclusive `flock` on `up.lock` for as long as
they run, with its PID written in the file. `up` also writes `run.json` (mode 0600: the Redis
URL carries its password) with its servers' URLs; a command that finds the lock held reads
it. A `run.json` whose PID is not the lock holder's is stale (a killed `up`) and is ignored.
The kernel drops a flock when its holder dies, however it dies, so a killed `up` never leaves
the data dir locked. (fcntl is POSIX: on Windows this module cannot be imported.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

LOCK_NAME = "up.lock"
RUN_NAME = "run.json"
POLL_S = 0.1
# How long `up` retries a held lock before refusing: a command probing the lock (see
# `servers`) holds it for an instant only.
LOCK_RETRY_S = 1.0
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


class DataDirBusy(RuntimeError):
    """The data dir is locked by another process, whose PID the message names."""


@dataclass(frozen=True)
class RunInfo:
    """What a live `tokenmill up` tells the other commands: its PID and its servers."""

    pid: int
    database_url: str
    redis_url: str


def secure(data_dir: Path) -> None:
    """Create the data dir if needed, for its owner only (it holds every prompt): 0700.

    One exception is kept: a group given traverse-only rights on purpose (not our own group).
    As root, the embedded Postgres runs as its own user and reaches its directory that way."""
    data_dir.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    status = data_dir.stat()
    mode = PRIVATE_DIR_MODE
    if status.st_gid != os.getegid():
        mode |= status.st_mode & stat.S_IXGRP
    data_dir.chmod(mode)


class DataDirLock:
    """An exclusive, non-blocking flock on `data_dir/up.lock`, naming its holder's PID."""

    def __init__(self, data_dir: Path):
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        # Opened without O_TRUNC: the PID of the current holder must survive a failed try.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # Closing the only descriptor drops the flock.
            self._fd = None

    def holder_pid(self) -> int | None:
        """The PID written by the process holding the lock (None while it is writing it)."""
        try:
            return int(self.path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None


@contextlib.contextmanager
def exclusive(data_dir: Path) -> Iterator[DataDirLock]:
    """Hold the data dir for `up`'s lifetime, or raise DataDirBusy naming the holder. The run
    file `up` writes meanwhile is removed when it lets go."""
    lock = DataDirLock(data_dir)
    deadline_s = time.monotonic() + LOCK_RETRY_S
    while not lock.try_acquire():
        if time.monotonic() >= deadline_s:
            raise DataDirBusy(_busy_message(data_dir, lock.holder_pid()))
        time.sleep(POLL_S)
    try:
        remove_run(data_dir)  # A killed `up` left it; it names servers that are gone.
        yield lock
    finally:
        remove_run(data_dir)
        lock.release()


@contextlib.contextmanager
def servers(data_dir: Path, wait_s: float) -> Iterator[RunInfo | None]:
    """For a command other than `up`: yield the live `up`'s servers, or None with the data dir
    locked for this command (which then starts embedded servers of its own, as `up` would).

    While another command holds the data dir, or an `up` has not written its run file yet
    (its servers are starting), wait up to `wait_s`."""
    deadline_s = time.monotonic() + wait_s
    while True:
        lock = DataDirLock(data_dir)
        if lock.try_acquire():
            break
        run, holder = read_run(data_dir), lock.holder_pid()
        if run is not None and run.pid == holder:
            yield run
            return
        if time.monotonic() >= deadline_s:
            raise DataDirBusy(_busy_message(data_dir, holder))
        time.sleep(POLL_S)
    try:
        yield None
    finally:
        lock.release()


def random_secret() -> str:
    return secrets.token_urlsafe(32)


def secret(path: Path, make: Callable[[], str] = random_secret) -> str:
    """The secret kept in `path`, made by `make` and written owner-only the first time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        # O_EXCL: two processes starting at once never overwrite each other's secret.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
        with os.fdopen(descriptor, "w") as file:
            file.write(make() + "\n")
    return path.read_text().strip()


def write_run(data_dir: Path, run: RunInfo) -> None:
    """Publish `run` for the other commands; written whole or not at all, owner-only."""
    temporary = data_dir / f".{RUN_NAME}.{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "w") as file:
        json.dump(asdict(run), file)
    os.replace(temporary, data_dir / RUN_NAME)


def read_run(data_dir: Path) -> RunInfo | None:
    try:
        return RunInfo(**json.loads((data_dir / RUN_NAME).read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def remove_run(data_dir: Path) -> None:
    (data_dir / RUN_NAME).unlink(missing_ok=True)


def _busy_message(data_dir: Path, holder: int | None) -> str:
    who = f"PID {holder}" if holder else "another process"
    run = read_run(data_dir)
    what = "`tokenmill up`" if run is not None and run.pid == holder else "a tokenmill command"
    return (
        f"data dir {data_dir} is in use by {what} ({who}); stop it first, "
        "or set TOKENMILL_DATA_DIR to another directory"
    )
