"""The intake's answer when its storage is unreachable: 503 with Retry-After, one log line."""

from __future__ import annotations

import logging

import asyncpg
import httpx
import pytest
from starlette.responses import JSONResponse

from tokenmill.intake.outages import StorageOutage


def app_failing_with(exc: BaseException):
    async def app(scope, receive, send):
        raise exc

    unavailable = lambda scope: JSONResponse(  # noqa: E731
        {"error": "storage"}, status_code=503, headers={"Retry-After": "2"}
    )
    return StorageOutage(app, unavailable=unavailable, log_interval_s=60)


async def get(app) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://intake") as client:
        return await client.get("/v1/jobs/job_1")


@pytest.mark.parametrize(
    "exc",
    [ConnectionRefusedError(111, "refused"), asyncpg.CannotConnectNowError("starting up")],
)
async def test_an_unreachable_storage_is_a_503_with_retry_after(exc):
    answer = await get(app_failing_with(exc))
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "2"


async def test_an_outage_is_logged_once_per_interval_not_per_request(caplog):
    app = app_failing_with(ConnectionRefusedError(111, "refused"))
    with caplog.at_level(logging.WARNING, logger="tokenmill.intake.outages"):
        for _ in range(5):
            assert (await get(app)).status_code == 503
    assert len(caplog.records) == 1


async def test_any_other_failure_is_not_taken_for_an_outage():
    with pytest.raises(ZeroDivisionError):
        await get(app_failing_with(ZeroDivisionError()))
