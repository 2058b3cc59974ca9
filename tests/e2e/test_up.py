"""`tokenmill up` on its embedded default: what `make run` does on a fresh machine."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.e2e.factory import free_port

BANNER_S_MAX = 180.0
JOB_S_MAX = 120.0


def wait_for_key(process: subprocess.Popen, log_path) -> str:
    deadline = time.monotonic() + BANNER_S_MAX
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()[-3000:]
        found = re.search(r"first API key \(shown once, keep it\): (tm_\S+)", log_path.read_text())
        if found:
            return found[1]
        time.sleep(0.5)
    raise AssertionError("tokenmill up printed no API key in time")


def up_env(data_dir: Path, port: int) -> dict[str, str]:
    """The environment of a user running `tokenmill up` on `data_dir`, serving on `port`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TOKENMILL_")}
    env.update(
        TOKENMILL_DATA_DIR=str(data_dir),
        TOKENMILL_HTTP_PORT=str(port),
        TOKENMILL_MODEL_CACHE_DIR=os.environ.get(
            "TOKENMILL_MODEL_CACHE_DIR", os.path.expanduser("~/.cache/tokenmill/models")
        ),
    )
    return env


def start_up(data_dir: Path, port: int, log_path: Path, **popen: object) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "tokenmill.cli", "up"],
            env=up_env(data_dir, port),
            stdout=log,
            stderr=log,
            **popen,
        )


def submit_until_booked(base_url: str, key: str) -> dict:
    """Submit a small job and return its view once it is booked (failing past JOB_S_MAX)."""
    headers = {"Authorization": f"Bearer {key}"}
    job = httpx.post(
        f"{base_url}/v1/jobs", json={"prompt": "Say hi.", "max_tokens": 8}, headers=headers
    ).json()
    deadline_s = time.monotonic() + JOB_S_MAX
    while job["booked_at"] is None:
        assert time.monotonic() < deadline_s, job
        time.sleep(0.2)
        job = httpx.get(f"{base_url}/v1/jobs/{job['id']}", headers=headers).json()
    return job


def test_up_runs_the_factory_on_embedded_servers_and_stops_cleanly(tmp_path):
    port = free_port()
    log_path = tmp_path / "up.log"
    up = start_up(tmp_path / "data", port, log_path)
    try:
        key = wait_for_key(up, log_path)
        services = psutil.Process(up.pid).children()
        assert len(services) >= 6  # Five services and the embedded Redis.
        job = submit_until_booked(f"http://127.0.0.1:{port}", key)
        assert job["status"] == "completed" and job["billing"]["currency"] == "USD"
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
    assert up.returncode == 0, log_path.read_text()[-3000:]
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in services)
