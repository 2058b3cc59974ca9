"""Admin routes for prices (/admin/v1/prices, /admin/v1/customers/{id}/plan): the same checks
and writes as `tokenmill prices`, from tokenmill.ledger.prices."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request

from tokenmill.intake.errors import ApiError
from tokenmill.ledger import prices
from tokenmill.ledger.plans import describe

router = APIRouter(tags=["admin"])


def _refused(exc: prices.PriceError) -> ApiError:
    return ApiError(exc.status, exc.code, exc.message)


@router.get("/prices")
async def list_prices(request: Request, plan: str | None = None) -> list[dict[str, Any]]:
    async with request.app.state.runtime.db.acquire() as conn:
        return [describe(v) for v in await prices.list_versions(conn, plan)]


@router.post("/prices", status_code=201)
async def add_price_version(
    request: Request, body: Annotated[dict[str, Any], Body()]
) -> dict[str, Any]:
    try:
        plan = prices.from_json(body)
        async with request.app.state.runtime.db.acquire() as conn:
            return describe(await prices.add_version(conn, plan))
    except prices.PriceError as exc:
        raise _refused(exc) from None


@router.post("/customers/{customer_id}/plan", status_code=201)
async def assign_customer_plan(
    request: Request, customer_id: str, body: Annotated[dict[str, Any], Body()]
) -> dict[str, Any]:
    try:
        plan_id = body.get("plan_id")
        if plan_id is not None and not isinstance(plan_id, str):
            raise prices.PriceError(400, "bad_plan", "plan_id is a plan name or null")
        effective = prices.parse_time(str(body.get("effective_from", "")), "effective_from")
        async with request.app.state.runtime.db.acquire() as conn:
            return await prices.assign_plan(conn, customer_id, plan_id, effective)
    except prices.PriceError as exc:
        raise _refused(exc) from None
