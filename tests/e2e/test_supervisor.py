"""`tokenmill up` supervises what it starts: one `up` per data dir, nothing outlives it, a dead
embedded server comes back on its address, other commands use its servers, its files are
private, and it stops in order."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import redis
from redis.exceptions import RedisError

from tests.e2e.factory import free_port
from tests.e2e.test_up import (
    BANNER_S_MAX,
    start_up,
    submit_until_booked,
    up_env,
    wait_for_key,
)

GONE_S_MAX = 5.0
RESTART_S_MAX = 30.0
COMMAND_S_MAX = 120.0
SERVER_NAMES = ("redis-server", "postgres")


class Up:
    """A running `tokenmill up` on a private data dir, in a process group of its own."""

    def __init__(self, tmp: Path):
        self.data_dir = tmp / "data"
        self.port = free_port()
        self.log_path = tmp / "up.log"
        fresh = not self.data_dir.exists()
        self.process = start_up(self.data_dir, self.port, self.log_path, start_new_session=True)
        if fresh:
            self.key = wait_for_key(self.process, self.log_path)
        else:  # Only a fresh data dir gets a first key printed.
            wait_until(self._running, BANNER_S_MAX, "tokenmill up did not start in time")
        self.base_url = f"http://127.0.0.1:{self.port}"

    def _running(self) -> bool:
        assert self.process.poll() is None, self.log_path.read_text()[-3000:]
        return "tokenmill is running" in self.log_path.read_text()

    def children(self) -> dict[str, psutil.Process]:
        """Its direct children by name: the five services (by their `serve` argument) and
        the two servers."""
        found = {}
        for child in psutil.Process(self.process.pid).children():
            # A child that just died (a zombie until `up` reaps and replaces it) is not one.
            with contextlib.suppress(psutil.ZombieProcess, psutil.NoSuchProcess):
                name = child.name()
                found[child.cmdline()[-1] if name.startswith("python") else name] = child
        return found

    def server(self, name: str) -> psutil.Process:
        return self.children()[name]

    def run_file(self) -> dict:
        return json.loads((self.data_dir / "run.json").read_text())

    def command(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "tokenmill.cli", *args],
            env=up_env(self.data_dir, free_port()),
            capture_output=True,
            text=True,
            timeout=COMMAND_S_MAX,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=180)


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline_s = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline_s, what
        time.sleep(0.1)


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    running = Up(tmp_path_factory.mktemp("supervised"))
    yield running
    running.stop()


def test_a_second_up_on_the_same_data_dir_is_refused_naming_the_first(up):
    second = up.command("up")
    assert second.returncode != 0
    assert f"is in use by `tokenmill up` (PID {up.process.pid})" in second.stderr
    assert up.process.poll() is None and up.run_file()["pid"] == up.process.pid


def test_keys_create_while_up_runs_uses_its_servers(up):
    redis_before = up.server("redis-server")
    redis_dir = up.data_dir / "redis"
    command = subprocess.Popen(
        [sys.executable, "-m", "tokenmill.cli", "keys", "create", "--name", "beside-up"],
        env=up_env(up.data_dir, free_port()),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while command.poll() is None:  # No second Redis on the same files, ever.
        assert working_in("redis-server", redis_dir) == [redis_before.pid]
        time.sleep(0.05)
    output, errors = command.communicate()
    assert command.returncode == 0, errors
    key = output.split("API key (shown once): ")[1].strip()
    # The key was written to the running Postgres: the running intake knows it at once.
    answer = httpx.get(
        f"{up.base_url}/v1/jobs/job_none", headers={"Authorization": f"Bearer {key}"}
    )
    assert answer.status_code == 404
    assert up.server("redis-server").pid == redis_before.pid


def working_in(name: str, directory: Path) -> list[int]:
    """The PIDs of `name` processes working in `directory`: Redis works in its --dir, and
    Postgres in its data directory, whatever they show as their command line."""
    found = []
    for process in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error):
            if process.info["name"] == name and Path(process.cwd()) == directory:
                found.append(process.pid)
    return found


def test_the_data_dir_and_its_files_are_private(up):
    mode = (up.data_dir.stat().st_mode) & 0o777
    if os.geteuid() == 0:
        # Postgres refuses to run as root; its own user may only traverse the data dir.
        assert mode == 0o710 and up.data_dir.group() == "pgserver"
    else:
        assert mode == 0o700
    for path in [up.data_dir / "postgres", *up.data_dir.rglob("*")]:
        if path.is_socket() or not path.exists():
            continue  # Postgres' socket, and files that come and go while we look.
        assert path.stat().st_mode & 0o077 == 0, f"{path} is {path.stat().st_mode & 0o777:o}"
    assert (up.data_dir / "redis.password").stat().st_mode & 0o777 == 0o600


def test_redis_refuses_a_client_without_the_password(up):
    url = up.run_file()["redis_url"]
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(RedisError, match="(?i)auth"):
        redis.Redis(host="127.0.0.1", port=port).ping()
    assert redis.Redis.from_url(url).ping()


@pytest.mark.slow
def test_a_killed_redis_comes_back_on_its_port_and_jobs_complete_after(up):
    url = up.run_file()["redis_url"]
    up.server("redis-server").kill()
    killed_s = time.monotonic()
    wait_until(lambda: _answers(url), RESTART_S_MAX, "redis did not come back on its port")
    print(f"redis killed → answering on its port again in {time.monotonic() - killed_s:.1f}s")
    assert submit_until_booked(up.base_url, up.key)["status"] == "completed"
    print(f"redis killed → job booked in {time.monotonic() - killed_s:.1f}s")


def _answers(url: str) -> bool:
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except RedisError:
        return False


def test_sigterm_to_the_process_group_stops_services_first_and_servers_last(up):
    # Last in this module: it stops the shared `up`.
    children = up.children()
    gone_s: dict[str, float] = {}
    os.killpg(up.process.pid, signal.SIGTERM)
    deadline_s = time.monotonic() + 180
    while len(gone_s) < len(children):
        assert time.monotonic() < deadline_s, f"still running: {set(children) - set(gone_s)}"
        for name, child in children.items():
            if name not in gone_s and gone(child):
                gone_s[name] = time.monotonic()
        time.sleep(0.02)
    assert up.process.wait(timeout=30) == 0, up.log_path.read_text()[-3000:]
    services = {name: t for name, t in gone_s.items() if name not in SERVER_NAMES}
    assert len(services) == 5 and set(SERVER_NAMES) <= set(gone_s)
    assert gone_s["intake"] <= gone_s["worker"]
    assert max(services.values()) <= min(gone_s[name] for name in SERVER_NAMES)
    assert not (up.data_dir / "run.json").exists()


def test_children_die_with_a_killed_up_and_the_next_up_starts_clean(tmp_path):
    first = Up(tmp_path)
    everything = psutil.Process(first.process.pid).children(recursive=True)
    assert len(everything) >= 7  # Five services, Redis, Postgres (and its backends).
    first.process.kill()
    first.process.wait()
    wait_until(
        lambda: all(gone(p) for p in everything),
        GONE_S_MAX,
        f"orphans: {[p.pid for p in everything if not gone(p)]}",
    )
    # The lock died with it: a new `up` takes the data dir over, ignoring the stale run file.
    second = Up(tmp_path)
    try:
        assert second.run_file()["pid"] == second.process.pid
    finally:
        second.stop()
    assert second.process.returncode == 0


def test_a_postgres_left_by_an_earlier_run_does_not_outlive_the_next_clean_exit(tmp_path):
    data_dir = tmp_path / "data"
    migrate = [sys.executable, "-m", "tokenmill.cli", "migrate"]
    env = up_env(data_dir, free_port())
    run_migrate = functools.partial(_succeeds, migrate, env)
    run_migrate()
    # What a killed run of an earlier version left: a Postgres daemonized by pg_ctl (so no
    # child of anyone) with pgserver's list of handles naming a process that is gone.
    pgdata = data_dir / "postgres"
    (pgdata / ".handle_pids.json").write_text("[1]")
    pg_ctl = Path(pgserver_bin(), "pg_ctl")
    as_owner = {"user": pgdata.owner(), "group": pgdata.group(), "extra_groups": []}
    subprocess.run(
        [
            pg_ctl,
            "-D",
            pgdata,
            "-o",
            f"-h '' -k {pgdata}",
            "-l",
            pgdata / "leftover.log",
            "-w",
            "start",
        ],
        check=True,
        capture_output=True,
        **(as_owner if os.geteuid() == 0 else {}),
    )
    leftover = psutil.Process(int((pgdata / "postmaster.pid").read_text().split()[0]))
    run_migrate()
    assert gone(leftover)
    assert working_in("postgres", pgdata) == []


def _succeeds(command: list, env: dict) -> None:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=COMMAND_S_MAX)
    assert done.returncode == 0, f"{command} exited {done.returncode}: {done.stderr}"


def pgserver_bin() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("pgserver").submodule_search_locations[0], "pginstall/bin")
