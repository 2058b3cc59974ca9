import logging

import asyncpg
import pytest
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError

from tokenmill.outage import OutageBackoff, is_outage


def raised_from(cause: BaseException) -> RuntimeError:
    try:
        try:
            raise cause
        except BaseException as exc:
            raise RuntimeError("the handler wrapped it") from exc
    except RuntimeError as wrapped:
        return wrapped


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(111, "Connection refused"),
        OSError("Multiple exceptions: [Errno 111] Connect call failed"),
        TimeoutError(),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        RedisConnectionError("Error 111 connecting to 127.0.0.1:6379"),
        BusyLoadingError("Redis is loading the dataset in memory"),
        raised_from(ConnectionResetError()),
    ],
)
def test_connection_level_failures_of_our_storage_are_outages(exc):
    assert is_outage(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("a handler bug"),
        KeyError("job"),
        asyncpg.UniqueViolationError("duplicate key"),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        FileNotFoundError("model.gguf"),
        raised_from(ValueError("still a bug")),
    ],
)
def test_failures_the_same_entry_would_repeat_are_not_outages(exc):
    assert not is_outage(exc)


async def test_backoff_doubles_up_to_its_cap_and_logs_start_and_end_once(caplog):
    backoff = OutageBackoff("ledger on s", delay_s_min=0.001, delay_s_max=0.004, reminder_s=60)
    with caplog.at_level(logging.INFO, logger="tokenmill.outage"):
        delays = []
        for _ in range(5):
            await backoff.failed(ConnectionRefusedError())
            delays.append(backoff.delay_s)
        backoff.answered()
        backoff.answered()
    assert delays == [0.002, 0.004, 0.004, 0.004, 0.004]
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2, messages
    assert "unreachable" in messages[0] and "reachable again" in messages[1]
    assert "5 attempts" in messages[1]
