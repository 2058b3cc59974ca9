"""The admin API for customers, keys, budgets, prepaid credit and admission reconciliation.

Mounted under ADMIN_PREFIX behind the admin credential (admin_api.py). Every route calls the
same domain functions as the CLI (customers.py, admission.py, keys.py), so both say and do
the same. Bad input is a 400 and an unknown customer or key a 404, changing nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from tokenmill.events import Tier
from tokenmill.intake import admission, customers, openapi
from tokenmill.intake.admin import as_json
from tokenmill.intake.admin_api import ADMIN_PREFIX
from tokenmill.intake.errors import ApiError
from tokenmill.intake.keys import list_keys, revoke_key
from tokenmill.intake.openapi import Answer, DecimalString, Operation

router = APIRouter()

IDENTIFIER = r"^[A-Za-z0-9_-]{1,64}$"
AmountString = Annotated[
    str,
    Field(
        pattern=r"^[0-9]{1,9}(\.[0-9]{1,2})?$",
        examples=["25.00"],
        description="A positive amount in whole cents, as a string (exact, never a float).",
    ),
]


class _Body(BaseModel):
    """A request body: every field declared, none taken for another type."""

    model_config = ConfigDict(extra="forbid", strict=True)


class NewCustomer(_Body):
    name: Annotated[str, Field(min_length=1, max_length=customers.NAME_CHARS_MAX)]
    tier: Tier = "standard"
    region: Annotated[str | None, Field(pattern=r"^[a-z0-9-]{1,32}$")] = None
    key: bool = Field(default=False, description="Also create the customer's first API key.")


class TierChange(_Body):
    tier: Tier


class BudgetChange(_Body):
    monthly: AmountString | None = Field(description="The monthly budget; null clears it.")


class TopUp(_Body):
    amount: AmountString
    reference: Annotated[str, Field(max_length=admission.REFERENCE_CHARS_MAX)] = ""


class KeyToRevoke(_Body):
    key: Annotated[
        str,
        Field(
            min_length=1,
            max_length=200,
            description="The key's id (key_...), its prefix (tm_...), or the key itself.",
        ),
    ]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdmissionView(_Closed):
    """The customer's admission balance for the current billing period (calendar month, UTC)."""

    currency: str
    period: str
    monthly_budget: DecimalString | None
    prepaid_balance: DecimalString | None
    held: DecimalString
    held_all_periods: DecimalString
    settled: DecimalString
    tokens_held: int
    tokens_used: int
    postpaid: bool


class CustomerView(_Closed):
    customer_id: str
    name: str
    tier: Tier
    region: str
    created_at: datetime
    suspended_at: datetime | None
    active_keys: int
    admission: AdmissionView


class CreatedCustomer(CustomerView):
    api_key: str | None


class SuspensionChange(CustomerView):
    changed: bool


class CustomerList(_Closed):
    object: Literal["list"]
    data: list[CustomerView]


class NewKey(_Closed):
    customer_id: str
    api_key: str


class KeyView(_Closed):
    key_id: str
    key_prefix: str
    customer_id: str
    customer_name: str
    created_at: datetime
    revoked_at: datetime | None


class RevokedKey(KeyView):
    revoked_now: bool


class KeyList(_Closed):
    object: Literal["list"]
    data: list[KeyView]


class CreditAdded(_Closed):
    customer_id: str
    event_id: str
    amount: DecimalString
    admission: AdmissionView


class ReconciledPeriod(_Closed):
    customer_id: str
    period: str
    intake_settled: DecimalString
    ledger_revenue: DecimalString
    revenue_difference: DecimalString
    intake_topups: DecimalString
    ledger_topups: DecimalString
    topups_difference: DecimalString
    matches: bool


class Reconciliation(_Closed):
    matches: bool
    periods: list[ReconciledPeriod]


async def connection(request: Request) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection; the domain's refusals become the API's 404 and 400."""
    async with request.app.state.runtime.db.acquire() as conn:
        try:
            yield conn
        except LookupError as exc:
            raise ApiError(404, "not_found", str(exc)) from exc
        except ValueError as exc:
            raise ApiError(400, "invalid_request", str(exc)) from exc


Conn = Annotated[asyncpg.Connection, Depends(connection)]
CustomerId = Annotated[str, Path(pattern=IDENTIFIER)]


@router.post("/customers", status_code=201)
async def create_customer(request: Request, body: NewCustomer, conn: Conn) -> JSONResponse:
    region = body.region or request.app.state.settings.region
    customer, key = await customers.create(conn, body.name, body.tier, region, body.key)
    shown = await customers.show(conn, customer.customer_id)
    return JSONResponse({**shown, "api_key": key}, status_code=201)


@router.get("/customers")
async def list_customers(conn: Conn) -> dict[str, Any]:
    return {"object": "list", "data": await customers.listing(conn)}


@router.get("/customers/{customer_id}")
async def show_customer(customer_id: CustomerId, conn: Conn) -> dict[str, Any]:
    return await customers.show(conn, customer_id)


@router.put("/customers/{customer_id}/tier")
async def change_tier(customer_id: CustomerId, body: TierChange, conn: Conn) -> dict[str, Any]:
    return await customers.set_tier(conn, customer_id, body.tier)


@router.post("/customers/{customer_id}/suspend")
async def suspend(customer_id: CustomerId, conn: Conn) -> dict[str, Any]:
    shown, changed = await customers.set_suspended(conn, customer_id, True)
    return {**shown, "changed": changed}


@router.post("/customers/{customer_id}/resume")
async def resume(customer_id: CustomerId, conn: Conn) -> dict[str, Any]:
    shown, changed = await customers.set_suspended(conn, customer_id, False)
    return {**shown, "changed": changed}


@router.post("/customers/{customer_id}/keys", status_code=201)
async def create_key(customer_id: CustomerId, conn: Conn) -> JSONResponse:
    key = await customers.new_key(conn, customer_id)
    return JSONResponse({"customer_id": customer_id, "api_key": key}, status_code=201)


@router.put("/customers/{customer_id}/budget")
async def set_budget(customer_id: CustomerId, body: BudgetChange, conn: Conn) -> dict[str, Any]:
    monthly = None if body.monthly is None else admission.parse_amount(body.monthly, "monthly")
    await admission.set_budget(conn, customer_id, monthly)
    return await customers.show(conn, customer_id)


@router.post("/customers/{customer_id}/credits", status_code=201)
async def add_credit(
    request: Request, customer_id: CustomerId, body: TopUp, conn: Conn
) -> JSONResponse:
    amount = admission.parse_amount(body.amount, "amount")
    billing = request.app.state.runtime.streams.billing
    event, balance = await admission.add_credit(conn, billing, customer_id, amount, body.reference)
    added = {
        "customer_id": customer_id,
        "event_id": event.event_id,
        "amount": format(amount, "f"),
        "admission": admission.balance_view(balance, datetime.now(UTC).date()),
    }
    return JSONResponse(added, status_code=201)


@router.get("/keys")
async def keys(
    conn: Conn,
    prefix: Annotated[str, Query(pattern=r"^[A-Za-z0-9_-]{0,64}$")] = "",
    customer: Annotated[str | None, Query(pattern=IDENTIFIER)] = None,
) -> dict[str, Any]:
    found = await list_keys(conn, prefix, customer)
    return {"object": "list", "data": [as_json(key) for key in found]}


@router.post("/keys/revoke")
async def revoke(body: KeyToRevoke, conn: Conn) -> dict[str, Any]:
    key, now = await revoke_key(conn, body.key)
    return {**as_json(key), "revoked_now": now}


@router.get("/admission/reconcile")
async def reconcile(conn: Conn) -> dict[str, Any]:
    periods = await admission.reconcile(conn)
    return {"matches": all(p["matches"] for p in periods), "periods": periods}


# Every admin route can meet a missing or wrong credential (401), a customer key (403), a
# draining intake or an outage of its storage (503, 504).
_ADMIN = (401, 403, 503, 504)
_WHY = {
    401: "The admin credential is missing or wrong.",
    403: "A customer API key was sent: admin routes take only the admin credential.",
    404: "No customer (or key) of that id; nothing changed.",
}
_NAMED = (400, 404, *_ADMIN)
_BODY = (400, 404, 413, *_ADMIN)


def _op(status: int, why: str, model: type[BaseModel], errors: tuple[int, ...]) -> Operation:
    return Operation({status: Answer(why, model)}, "problem", errors, why=_WHY)


_ROUTES = {
    ("post", "/customers"): _op(
        201,
        "The customer, postpaid until given a budget or credit; api_key if one was asked for.",
        CreatedCustomer,
        (400, 413, *_ADMIN),
    ),
    ("get", "/customers"): _op(200, "Every customer, oldest first.", CustomerList, _ADMIN),
    ("get", "/customers/{customer_id}"): _op(200, "The customer.", CustomerView, _NAMED),
    ("put", "/customers/{customer_id}/tier"): _op(
        200, "The customer, at its new tier.", CustomerView, _BODY
    ),
    ("post", "/customers/{customer_id}/suspend"): _op(
        200,
        "Suspended: every intake refuses its keys within a second. changed: false if it was.",
        SuspensionChange,
        _NAMED,
    ),
    ("post", "/customers/{customer_id}/resume"): _op(
        200,
        "Resumed: its keys work again. changed: false if it was not suspended.",
        SuspensionChange,
        _NAMED,
    ),
    ("post", "/customers/{customer_id}/keys"): _op(
        201, "A new key for the customer, shown this once.", NewKey, _NAMED
    ),
    ("put", "/customers/{customer_id}/budget"): _op(
        200, "The customer with its new monthly budget.", CustomerView, _BODY
    ),
    ("post", "/customers/{customer_id}/credits"): _op(
        201,
        "Prepaid credit raised; PrepaidCreditAdded queued for the ledger in the same transaction.",
        CreditAdded,
        _BODY,
    ),
    ("get", "/keys"): _op(
        200, "Keys (never the keys themselves), oldest first.", KeyList, (400, *_ADMIN)
    ),
    ("post", "/keys/revoke"): _op(
        200,
        "The key, revoked: every intake refuses it within a second. revoked_now: false if it "
        "already was.",
        RevokedKey,
        _BODY,
    ),
    ("get", "/admission/reconcile"): _op(
        200,
        "Per customer and period, the intake's settled amount beside the ledger's booked "
        "revenue, and the prepaid top-ups on each side.",
        Reconciliation,
        _ADMIN,
    ),
}
openapi.declare(
    {(method, ADMIN_PREFIX + path): spec for (method, path), spec in _ROUTES.items()},
    (
        CustomerView,
        CreatedCustomer,
        CustomerList,
        SuspensionChange,
        NewKey,
        RevokedKey,
        KeyList,
        CreditAdded,
        Reconciliation,
    ),
)
