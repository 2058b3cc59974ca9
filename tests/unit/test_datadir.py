"""The data dir's lock and run file. A flock is held per open file, so a second lock in this
same process stands for a second `tokenmill` process."""

from __future__ import annotations

import os
import time

import pytest

from tokenmill import datadir
from tokenmill.datadir import DataDirBusy, DataDirLock, RunInfo

RUN = RunInfo(pid=os.getpid(), database_url="postgresql://db", redis_url="redis://:pw@r:1/0")


def test_one_holder_at_a_time_and_the_lock_names_its_pid(tmp_path):
    first, second = DataDirLock(tmp_path), DataDirLock(tmp_path)
    assert first.try_acquire()
    assert not second.try_acquire()
    assert second.holder_pid() == os.getpid()
    first.release()
    assert second.try_acquire()
    second.release()


def test_a_second_up_is_refused_with_the_first_ones_pid(tmp_path):
    with datadir.exclusive(tmp_path):
        datadir.write_run(tmp_path, RUN)
        started_s = time.monotonic()
        with pytest.raises(DataDirBusy, match=rf"`tokenmill up` \(PID {os.getpid()}\)"):
            with datadir.exclusive(tmp_path):
                pass
        assert time.monotonic() - started_s < datadir.LOCK_RETRY_S + 1


def test_the_run_file_is_private_and_gone_when_up_lets_go(tmp_path):
    with datadir.exclusive(tmp_path):
        datadir.write_run(tmp_path, RUN)
        assert (tmp_path / datadir.RUN_NAME).stat().st_mode & 0o777 == 0o600
        assert datadir.read_run(tmp_path) == RUN
    assert datadir.read_run(tmp_path) is None
    assert DataDirLock(tmp_path).try_acquire()


def test_commands_use_the_servers_of_the_live_up(tmp_path):
    with datadir.exclusive(tmp_path):
        datadir.write_run(tmp_path, RUN)
        with datadir.servers(tmp_path, wait_s=1) as run:
            assert run == RUN


def test_a_stale_run_file_is_ignored_and_the_command_holds_the_data_dir(tmp_path):
    datadir.write_run(tmp_path, RunInfo(pid=1, database_url="x", redis_url="y"))  # Killed up.
    with datadir.servers(tmp_path, wait_s=1) as run:
        assert run is None
        assert not DataDirLock(tmp_path).try_acquire()  # Its own embedded servers are safe.
    assert DataDirLock(tmp_path).try_acquire()


def test_a_command_waits_for_a_busy_data_dir_then_says_who_holds_it(tmp_path):
    holder = DataDirLock(tmp_path)
    assert holder.try_acquire()  # Another command running embedded servers: no run file.
    started_s = time.monotonic()
    with pytest.raises(DataDirBusy, match=rf"a tokenmill command \(PID {os.getpid()}\)"):
        with datadir.servers(tmp_path, wait_s=0.3):
            pass
    assert 0.3 <= time.monotonic() - started_s < 2
    holder.release()


def test_secure_makes_the_data_dir_owner_only(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    datadir.secure(data_dir)
    assert data_dir.stat().st_mode & 0o777 == 0o700
