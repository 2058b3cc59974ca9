"""Chaos: SIGKILL every process `tokenmill up` runs (each service, the embedded Redis and Postgres)
and the supervisor itself, under a steady load of small jobs, and check what a user and an
operator would check after it.

Every job a client saw accepted completed, or failed with an error it can read; every completed
job is booked exactly once and no failed one is booked; nothing is left queued or running; and
after the final stop no process that either `up` ran is still alive. `make chaos` runs it; the
summary block it prints holds the counts the faults issue asks for.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx
import psutil
import pytest
import redis

from tests.e2e.factory import free_port
from tests.e2e.test_up import up_env, wait_for_key
from tokenmill import datadir
from tokenmill.settings import Settings
from tokenmill.streams import Streams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Killed one at a time, each restarted by `up`; then `up` itself is killed and started again.
CHILD_VICTIMS = ("worker", "ledger", "inspector", "telemetry", "intake", "redis", "postgres")
# Delivery timings shortened so each kill heals within seconds instead of the production
# defaults' half a minute: a dead worker's entry is reclaimed after this idle time.
CHAOS_SETTINGS = {
    "TOKENMILL_CLAIM_IDLE_MS": "5000",
    "TOKENMILL_POWER_SAMPLE_INTERVAL_S": "2",
    "TOKENMILL_OUTBOX_POLL_S": "0.2",
}
JOB = {"max_tokens": 6}
IN_FLIGHT_MAX = 3
SUBMIT_INTERVAL_S = 0.5
SUBMIT_RETRY_S = 0.25
SUBMIT_TIMEOUT_S = 10.0
START_S_MAX = 180.0
RECOVERY_S_MAX = 90.0
CHILDREN_GONE_S_MAX = 20.0
DRAIN_S_MAX = 120.0
STOP_S_MAX = 90.0
POLL_S = 0.25


def wait_until(check: Callable[[], object], timeout_s: float, what: str) -> object:
    """Poll `check` until it returns something true; a check that raises counts as not yet
    (a server restarting), and the last such error is part of the failure. An AssertionError
    from the check fails at once."""
    deadline = time.monotonic() + timeout_s
    error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if found := check():
                return found
        except AssertionError:
            raise  # A check that knows it can never pass fails at once.
        except Exception as exc:  # Whatever a server that is down or restarting raises.
            error = exc
        time.sleep(POLL_S)
    raise AssertionError(f"not within {timeout_s:.0f}s: {what} (last error: {error!r})")


class Load:
    """A client keeping a few small jobs in flight, each under its own Idempotency-Key.

    Closed loop: a new job is submitted only while fewer than `IN_FLIGHT_MAX` of its jobs are
    unfinished, so on a busy machine the queue stays short and a job submitted after a kill
    runs soon after it. A submission refused or dropped while intake restarts is retried with
    the same key, as a real client does, so a key counts once however many attempts it took.
    """

    def __init__(self, base_url: str, api_key: str):
        self.base_url, self.api_key = base_url, api_key
        self.accepted: dict[str, str] = {}  # Idempotency-Key -> job id, from a 202 or a 200.
        # Why a submission was retried: "refused" (no connection) or the status answered.
        self.retries: Counter[str] = Counter()
        self.errors: list[str] = []
        self._unfinished: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, wait_s: float) -> bool:
        """Submit nothing new; True once the submission in hand got through."""
        self._stop.set()
        self._thread.join(timeout=wait_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        with httpx.Client(base_url=self.base_url, headers=headers, timeout=SUBMIT_TIMEOUT_S) as c:
            for n in itertools.count():
                while not self._stop.is_set() and self._in_flight(c) >= IN_FLIGHT_MAX:
                    self._stop.wait(SUBMIT_INTERVAL_S)
                if self._stop.is_set():
                    return
                self._submit(c, f"chaos-{n}", {"prompt": f"Count to {n % 9 + 2}.", **JOB})
                self._stop.wait(SUBMIT_INTERVAL_S)

    def _in_flight(self, client: httpx.Client) -> int:
        """How many of this client's jobs are not finished yet. While intake does not answer
        that is unknown, and the client goes on to submit: its submission is then retried until
        intake is back, which is what this load is for."""
        unfinished = []
        for job in self._unfinished:
            try:
                answer = client.get(f"/v1/jobs/{job}")
            except httpx.TransportError:
                return 0
            if answer.status_code != 200 or answer.json()["status"] not in ("completed", "failed"):
                unfinished.append(job)
        self._unfinished = unfinished
        return len(unfinished)

    def _submit(self, client: httpx.Client, key: str, body: dict) -> None:
        while True:
            try:
                answer = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
                if answer.status_code in (200, 202):
                    self.accepted[key] = answer.json()["id"]
                    self._unfinished.append(self.accepted[key])
                    return
                if answer.status_code < 500:
                    self.errors.append(f"{key}: {answer.status_code} {answer.text[:200]}")
                    return
                self.retries[str(answer.status_code)] += 1
            except httpx.TransportError:
                self.retries["refused"] += 1
            time.sleep(SUBMIT_RETRY_S)


@dataclass
class Census:
    """Every process a supervisor ran, sampled in the background: what must be gone at the end.
    Each is kept with its start time, so a recycled PID is never mistaken for it."""

    up_pid: int = 0
    seen: dict[tuple[int, float], str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.wait(POLL_S):
            with contextlib.suppress(psutil.Error):  # Between a killed `up` and the next.
                self.sample()

    def sample(self) -> None:
        for process in psutil.Process(self.up_pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                label = f"{process.pid} {role_of(process)}"
                self.seen[(process.pid, process.create_time())] = label

    def stop(self) -> None:
        self._stop.set()

    def alive(self) -> dict[psutil.Process, str]:
        """The processes seen that still run, with what they were."""
        left = {}
        for (pid, started), label in list(self.seen.items()):
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                if process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE:
                    left[process] = label
        return left

    def end_survivors(self) -> list[str]:
        """Kill what still runs (ours: this test's `up` started it) and say what it was."""
        survivors = self.alive()
        for process in survivors:
            with contextlib.suppress(psutil.Error):
                process.kill()
        return list(survivors.values())


def role_of(process: psutil.Process) -> str:
    command = process.cmdline()
    if command[-2:-1] == ["serve"]:
        return command[-1]
    return "redis" if "redis-server" in " ".join(command[:1]) else process.name()


class Books:
    """What Postgres says about the run: one short connection per question, so a question
    asked while the supervisor is down simply fails and is asked again."""

    def __init__(self, url: str):
        self.url = url

    def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        async def run() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(self.url, timeout=5)
            try:
                return await conn.fetch(sql, *args)
            finally:
                await conn.close()

        return asyncio.run(run())

    def first_completion_after(self, at: datetime) -> bool:
        return bool(
            self.fetch(
                "SELECT 1 FROM intake.requests WHERE status = 'completed' AND completed_at > $1",
                at,
            )
        )

    def healthy_since(self, at: datetime) -> bool:
        """Every service did its part since `at`: a job submitted after it was run, inspected
        and booked, and the meter's power reached the books."""
        return bool(
            self.fetch(
                "SELECT 1 FROM intake.requests r "
                "JOIN ledger.request_usage u USING (request_id) "
                "JOIN ledger.quality q USING (request_id) "
                "WHERE r.submitted_at > $1 AND r.status = 'completed' AND r.booked_at IS NOT NULL "
                "AND exists(SELECT 1 FROM ledger.power_samples WHERE window_start > $1)",
                at,
            )
        )

    def drained(self) -> bool:
        return not self.fetch(
            "SELECT 1 FROM intake.requests WHERE status IN ('queued', 'running') "
            "OR (status = 'completed' AND booked_at IS NULL)"
        )

    def counts(self, accepted: dict[str, str]) -> dict[str, int]:
        rows = self.fetch(
            "SELECT r.request_id, r.idempotency_key, r.status, r.error, "
            "r.completion_event_id, "
            "u.completion_event_id AS usage_completion, "
            "(SELECT count(*) FROM ledger.outbox o WHERE o.event_type = 'usage.booked' "
            " AND o.body::jsonb ->> 'request_id' = r.request_id) AS bookings, "
            "(SELECT count(*) FROM ledger.events e WHERE e.event_type = 'job.started' "
            " AND e.request_id = r.request_id) AS starts "
            "FROM intake.requests r LEFT JOIN ledger.request_usage u USING (request_id)"
        )
        by_key = {row["idempotency_key"]: row for row in rows}
        completed = [r for r in rows if r["status"] == "completed"]
        failed = [r for r in rows if r["status"] == "failed"]
        return {
            "accepted": len(accepted),
            "lost": sum(
                1 for key, job in accepted.items() if by_key.get(key, {}).get("request_id") != job
            ),
            "completed": len(completed),
            "failed": len(failed),
            "failed_silently": sum(1 for r in failed if not r["error"]),
            "booked": sum(1 for r in rows if r["usage_completion"] is not None),
            "unbooked": sum(1 for r in completed if r["usage_completion"] is None),
            "failed_but_booked": sum(1 for r in failed if r["usage_completion"] is not None),
            # Billed twice: a second booking of one request, or a second job for one key.
            "duplicates": sum(max(r["bookings"] - 1, 0) for r in rows) + len(rows) - len(by_key),
            # The output a user sees is not the completion that was billed.
            "mismatched": sum(
                1
                for r in completed
                if r["usage_completion"] not in (None, r["completion_event_id"])
            ),
            # Started more than once: a kill caught it running (informative, not a fault).
            "reruns": sum(1 for r in rows if r["starts"] > 1),
            "stuck": sum(1 for r in rows if r["status"] in ("queued", "running")),
        }


def dead_letters(data_dir: Path) -> int:
    """Entries a consumer gave up on, over every stream of the live `up`."""
    settings = Settings()
    client = redis.Redis.from_url(datadir.read_run(data_dir).redis_url)
    try:
        streams = Streams(settings.stream_prefix).all(settings.region)
        return sum(client.xlen(Streams.dead_letters(stream)) for stream in streams)
    finally:
        client.close()


class Supervisor:
    """`tokenmill up` on one data dir and port, started (and restarted) as a user would."""

    def __init__(self, tmp_path: Path):
        self.data_dir = tmp_path / "data"
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {**up_env(self.data_dir, self.port), **CHAOS_SETTINGS}
        self.log_path = tmp_path / "up.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> subprocess.Popen:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tokenmill.cli", "up"],
                env=self.env,
                stdout=log,
                stderr=log,
            )
        return self.process

    def child(self, role: str) -> psutil.Process | None:
        """The child of the running `up` that plays `role` (a service's name, redis, postgres)."""
        assert self.process.poll() is None, f"tokenmill up exited: {self.log_tail()}"
        for process in psutil.Process(self.process.pid).children():
            with contextlib.suppress(psutil.Error):
                if role_of(process) == role:
                    return process
        return None

    def wait_healthy(self) -> None:
        def answers() -> bool:
            assert self.process.poll() is None, f"tokenmill up exited: {self.log_tail()}"
            return httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200

        wait_until(answers, START_S_MAX, "intake answering after `up` restarted")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@dataclass
class Report:
    counts: dict[str, int] = field(default_factory=dict)
    recovery_s: dict[str, float] = field(default_factory=dict)
    redis_to_first_completion_s: float | None = None
    orphans: list[str] = field(default_factory=list)
    retries: Counter[str] = field(default_factory=Counter)
    run_s: float = 0.0
    log_path: Path | None = None

    def log_kib(self) -> int:
        return self.log_path.stat().st_size // 1024 if self.log_path.exists() else 0

    def print(self) -> None:
        counts = {**self.counts, "orphans": len(self.orphans)}
        recovery = " ".join(f"{name}={s:.1f}s" for name, s in self.recovery_s.items())
        redis_s = self.redis_to_first_completion_s
        print(
            "\n=== chaos summary ===\n"
            + " ".join(f"{name}={value}" for name, value in counts.items())
            + "\nredis kill -> first job completed again: "
            + (f"{redis_s:.1f}s" if redis_s is not None else "never")
            + f"\nrecovery (kill -> a new job run, inspected, metered and booked): {recovery}"
            + "\nsubmissions retried while intake or its storage was down: "
            + (" ".join(f"{why}={n}" for why, n in sorted(self.retries.items())) or "none")
            + "".join(f"\norphan: {label}" for label in self.orphans)
            + f"\nrun: {self.run_s:.0f}s, log: {self.log_path} ({self.log_kib()} KiB)"
            + "\n=====================",
            flush=True,
        )


def kill_and_recover(up: Supervisor, books: Books, role: str, report: Report) -> None:
    """SIGKILL one child of `up`, then wait until it is back and the whole pipeline works."""
    victim = up.child(role)
    assert victim is not None, f"no {role} under tokenmill up"
    killed_at, started_s = datetime.now(UTC), time.monotonic()
    victim.send_signal(signal.SIGKILL)
    wait_until(
        lambda: (found := up.child(role)) is not None and found.pid != victim.pid,
        RECOVERY_S_MAX,
        f"{role} restarted by tokenmill up",
    )
    if role == "redis":
        wait_until(
            lambda: books.first_completion_after(killed_at),
            RECOVERY_S_MAX,
            "a job completed after Redis was killed",
        )
        report.redis_to_first_completion_s = time.monotonic() - started_s
    wait_until(lambda: books.healthy_since(killed_at), RECOVERY_S_MAX, f"recovery from {role}")
    report.recovery_s[role] = time.monotonic() - started_s


def kill_supervisor_and_restart(
    up: Supervisor, census: Census, books: Books, report: Report
) -> None:
    """SIGKILL `up` itself: everything it ran must die with it. Then start it again on the same
    data dir, as an operator would, and wait until the whole pipeline works."""
    killed_at, started_s = datetime.now(UTC), time.monotonic()
    up.process.send_signal(signal.SIGKILL)
    up.process.wait()
    try:
        wait_until(lambda: not census.alive(), CHILDREN_GONE_S_MAX, "`up`'s children gone")
    except AssertionError:
        report.orphans += census.end_survivors()
    census.up_pid = up.start().pid
    up.wait_healthy()
    wait_until(lambda: books.healthy_since(killed_at), RECOVERY_S_MAX, "recovery from up")
    report.recovery_s["up"] = time.monotonic() - started_s


def test_chaos_every_process_killed_under_load(tmp_path):
    up = Supervisor(tmp_path)
    census = Census()
    report = Report(log_path=up.log_path)
    started_s = time.monotonic()
    load: Load | None = None
    try:
        census.up_pid = up.start().pid
        threading.Thread(target=census.run, name="chaos-census", daemon=True).start()
        load = Load(up.base_url, wait_for_key(up.process, up.log_path))
        books = Books(datadir.read_run(up.data_dir).database_url)
        load.start()
        wait_until(
            lambda: books.healthy_since(datetime.fromtimestamp(0, UTC)),
            START_S_MAX,
            "the first job booked",
        )
        for role in CHILD_VICTIMS:
            kill_and_recover(up, books, role, report)
        kill_supervisor_and_restart(up, census, books, report)
        assert load.stop(START_S_MAX), "the load's last submission never got through"
        wait_until(books.drained, DRAIN_S_MAX, "every job completed or failed, and booked")
        report.counts = {**books.counts(load.accepted), "dead_letters": dead_letters(up.data_dir)}
    finally:
        if load is not None:
            load.stop(0)
            report.retries = load.retries
        if up.process is not None and up.process.poll() is None:
            up.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                up.process.wait(timeout=STOP_S_MAX)
        census.stop()
        report.orphans += census.end_survivors()
        report.run_s = time.monotonic() - started_s
        report.print()
    assert up.process.returncode == 0, up.log_tail()
    assert not load.errors, load.errors
    # While a process or the storage restarts the intake answers 503 (or not at all), never a
    # bare 500.
    assert set(load.retries) <= {"refused", "503"}, load.retries
    counts = report.counts
    assert counts["accepted"] > 0 and counts["lost"] == 0, counts
    assert counts["completed"] + counts["failed"] == counts["accepted"], counts
    assert counts["failed_silently"] == 0 and counts["stuck"] == 0, counts
    assert counts["booked"] == counts["completed"] and counts["unbooked"] == 0, counts
    assert counts["failed_but_booked"] == 0 and counts["duplicates"] == 0, counts
    assert counts["mismatched"] == 0, counts
    assert not report.orphans, report.orphans
