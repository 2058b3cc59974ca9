"""Admin routes for prices (/admin/v1/prices, /admin/v1/customers/{id}/plan): the same checks
and writes as `tokenmill prices`, from tokenmill.ledger.prices."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request

from tokenmill.intake.errors import ApiError
from tokenmill.ledger import prices
from tokenmill.ledger.plans import describe

router = APIRouter(tags=["admin"])

_WHY = {
    400: "The plan or its prices are invalid; the detail says how. Nothing was written.",
    401: "The admin credential is missing or wrong.",
    403: "A customer API key, or an intake without an admin credential: never admin routes.",
    404: "No such customer or plan.",
    409: "It would reprice usage already booked or sent, or that version or plan exists.",
}
_WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}}


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error answers a route gives, as RFC 9457 problem details (see intake.openapi)."""
    problem = {"schema": {"$ref": "#/components/schemas/Problem"}}
    return {
        status: {
            "description": _WHY[status],
            "content": {"application/problem+json": problem},
            **({"headers": _WWW_AUTHENTICATE} if status == 401 else {}),
        }
        for status in statuses
    }


def _refused(exc: prices.PriceError) -> ApiError:
    return ApiError(exc.status, exc.code, exc.message)


@router.get("/prices", responses=_problems(401, 403))
async def list_prices(request: Request, plan: str | None = None) -> list[dict[str, Any]]:
    async with request.app.state.runtime.db.acquire() as conn:
        return [describe(v) for v in await prices.list_versions(conn, plan)]


@router.post("/prices", status_code=201, responses=_problems(400, 401, 403, 409))
async def add_price_version(
    request: Request, body: Annotated[dict[str, Any], Body()]
) -> dict[str, Any]:
    try:
        plan = prices.from_json(body)
        async with request.app.state.runtime.db.acquire() as conn:
            return describe(await prices.add_version(conn, plan))
    except prices.PriceError as exc:
        raise _refused(exc) from None


@router.post(
    "/customers/{customer_id}/plan", status_code=201, responses=_problems(400, 401, 403, 404, 409)
)
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
