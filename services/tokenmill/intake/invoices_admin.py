"""Admin routes for the books' documents: invoices, credit notes and reports (/admin/v1).

Mounted by `create_app` behind the admin credential. Each route declares in the OpenAPI
document every status it answers with and that answer's body, like the customer routes do
(tokenmill.intake.openapi), so the admin Schemathesis pass checks them against the truth.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from tokenmill.intake.errors import ApiError
from tokenmill.intake.openapi import (
    CreditNoteView,
    DecimalString,
    InvoiceList,
    InvoiceSummary,
    InvoiceView,
)
from tokenmill.ledger import invoice_render, invoices
from tokenmill.ledger.billing import Period, parse_day
from tokenmill.ledger.reports import GroupBy, report

router = APIRouter(tags=["admin"])
REF_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# Customer ids are ULID-like (cus_...); anything else (a NUL byte, say) is refused up front.
CUSTOMER_PATTERN = REF_PATTERN
CustomerId = Annotated[str, Field(pattern=CUSTOMER_PATTERN)]
CustomerQuery = Annotated[str | None, Query(pattern=CUSTOMER_PATTERN)]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FinalizeRequest(_Closed):
    customer_id: CustomerId
    period: str = Field(description="The month, YYYY-MM (UTC).", examples=["2026-11"])


class FinalizeResult(_Closed):
    object: Literal["list"]
    finalized_now: list[str]
    supplementary_now: list[str]
    credit_notes_issued: list[str]
    unbilled_requests: int
    data: list[InvoiceSummary]


class CreditNoteList(_Closed):
    object: Literal["list"]
    data: list[CreditNoteView]


class CreditNotesIssued(_Closed):
    issued: list[str]


class ReportFigures(_Closed):
    requests: int
    tokens: int
    energy_j: DecimalString
    energy_kwh: DecimalString
    revenue: DecimalString
    credits: DecimalString
    cost: DecimalString
    margin: DecimalString
    revenue_per_mtok: DecimalString | None
    cost_per_mtok: DecimalString | None


class ReportRow(ReportFigures):
    group: str


class ReportView(_Closed):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    object: Literal["report"]
    from_: date = Field(alias="from")
    to: date
    group_by: GroupBy
    currency: str | None
    groups: list[ReportRow]
    totals: ReportFigures


_PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
_WHY = {
    400: "The request is invalid; the body names the field. Nothing was changed.",
    401: "The admin credential is missing or wrong.",
    403: "A customer API key was sent: these routes take the admin credential only (or this "
    "intake has none configured).",
    404: "No such invoice (or the customer has none for that period).",
    409: "The period (with its grace for late bookings) has not ended; nothing was finalized.",
    413: "The request body is over the size limit; nothing was changed.",
    503: "The intake is shutting down, or cannot reach its storage; try again after "
    "Retry-After seconds.",
    504: "The intake stopped before answering.",
}
_HEADERS = {
    401: {"WWW-Authenticate": "`Bearer`: the scheme to authenticate with."},
    503: {"Retry-After": "Seconds to wait before sending the request again."},
}
# Every admin route meets the credential check and a draining or cut-off intake.
_ALWAYS = (400, 401, 403, 503, 504)


def admin_responses(
    ok: str,
    model: type[BaseModel],
    errors: tuple[int, ...] = (),
    also: dict[str, Any] | None = None,
) -> dict[int | str, Any]:
    """FastAPI `responses` for a route: its 200 (`model` as JSON, and the other media types in
    `also`), then each error as RFC 9457 problem details."""
    declared: dict[int | str, Any] = {200: {"description": ok, "model": model}}
    if also:
        declared[200]["content"] = also
    for status in sorted({*_ALWAYS, *errors}):
        answer: dict[str, Any] = {"description": _WHY[status], "content": _PROBLEM}
        if status in _HEADERS:
            answer["headers"] = {
                name: {"description": text, "required": True, "schema": {"type": "string"}}
                for name, text in _HEADERS[status].items()
            }
        declared[status] = answer
    return declared


def _period(text: str) -> Period:
    try:
        return Period.parse(text)
    except ValueError as exc:
        raise ApiError(400, "invalid_request", str(exc), "period") from exc


@router.get(
    "/invoices",
    response_model=None,
    responses=admin_responses("Invoices, drafts with their current figures.", InvoiceList),
)
async def list_invoices(
    request: Request, period: str | None = None, customer_id: CustomerQuery = None
) -> dict[str, Any]:
    found = await invoices.list_invoices(
        request.app.state.runtime.db,
        period=_period(period) if period is not None else None,
        customer_id=customer_id,
        limit=request.app.state.settings.invoices_list_max,
    )
    return {"object": "list", "data": [invoice_render.summary_json(i) for i in found]}


@router.get(
    "/invoices/{ref}",
    response_model=None,
    responses=admin_responses(
        "The invoice as JSON, or as CSV or PDF when the Accept header asks for it.",
        InvoiceView,
        (404,),
        {
            "text/csv": {"schema": {"type": "string"}},
            "application/pdf": {"schema": {"type": "string", "format": "binary"}},
        },
    ),
)
async def show_invoice(
    request: Request, ref: Annotated[str, Path(pattern=REF_PATTERN)]
) -> Response:
    """By id or number; as JSON, or CSV or PDF when the Accept header asks for it."""
    found = await invoices.find_invoice(request.app.state.runtime.db, ref)
    if found is None:
        raise ApiError(404, "not_found", f"no invoice with id or number {ref}")
    accept = request.headers.get("accept", "")
    if "application/pdf" in accept:
        pdf = await asyncio.to_thread(invoice_render.invoice_pdf, found)
        return Response(pdf, media_type="application/pdf")
    if "text/csv" in accept:
        return Response(invoice_render.invoice_csv(found), media_type="text/csv")
    return JSONResponse(invoice_render.invoice_json(found))


@router.post(
    "/invoices/finalize",
    response_model=None,
    responses=admin_responses(
        "The customer's invoices of the period, with what this call finalized.",
        FinalizeResult,
        (404, 409, 413),
    ),
)
async def finalize(request: Request, body: FinalizeRequest) -> dict[str, Any]:
    """Finalize one customer's invoice for an ended period (and issue any late credit notes);
    an invoice already final is answered as it is."""
    settings = request.app.state.settings
    period = _period(body.period)
    async with request.app.state.runtime.db.acquire() as conn:
        try:
            result = await invoices.issue_period(
                conn,
                period,
                now=datetime.now(UTC),
                grace_s=settings.invoice_grace_s,
                batch_size=settings.invoice_batch_size,
                customer_id=body.customer_id,
            )
        except invoices.PeriodNotOver as exc:
            raise ApiError(409, "period_not_over", str(exc), "period") from exc
        found = await invoices.list_invoices(
            conn, period=period, customer_id=body.customer_id, limit=settings.invoices_list_max
        )
    if not found:
        raise ApiError(404, "not_found", f"customer {body.customer_id} has no invoice for {period}")
    return {
        "object": "list",
        "finalized_now": result.finalized,
        "credit_notes_issued": result.credit_notes,
        "supplementary_now": result.supplementary,
        "unbilled_requests": result.unbilled_requests,
        "data": [invoice_render.summary_json(i) for i in found],
    }


@router.get(
    "/credit-notes",
    response_model=None,
    responses=admin_responses("Credit notes, oldest first.", CreditNoteList),
)
async def list_credit_notes(
    request: Request,
    customer_id: CustomerQuery = None,
    invoice_id: Annotated[str | None, Query(pattern=REF_PATTERN)] = None,
) -> dict[str, Any]:
    notes = await invoices.credit_notes(
        request.app.state.runtime.db,
        customer_id=customer_id,
        invoice_id=invoice_id,
        limit=request.app.state.settings.invoices_list_max,
    )
    return {"object": "list", "data": [invoice_render.credit_note_json(n) for n in notes]}


@router.post(
    "/credit-notes/issue",
    response_model=None,
    responses=admin_responses("The numbers of the credit notes issued now.", CreditNotesIssued),
)
async def issue_credit_notes(request: Request) -> dict[str, Any]:
    """Put every late credit (its period's invoice already final) on a credit note."""
    async with request.app.state.runtime.db.acquire() as conn:
        numbers = await invoices.issue_credit_notes(
            conn, request.app.state.settings.invoice_batch_size
        )
    return {"issued": numbers}


@router.get(
    "/reports",
    response_model=None,
    responses=admin_responses("Revenue, cost and margin per group over the days.", ReportView),
)
async def reports(
    request: Request,
    start: Annotated[str | None, Query(alias="from")] = None,
    end: Annotated[str | None, Query(alias="to")] = None,
    by: GroupBy = "tier",
) -> dict[str, Any]:
    today = datetime.now(UTC).date()
    try:
        first = parse_day(start) if start is not None else today.replace(day=1)
        last = parse_day(end) if end is not None else today
        found = await report(
            request.app.state.runtime.db,
            first,
            last,
            by,
            request.app.state.settings.report_groups_max,
        )
    except ValueError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from exc
    return found.as_json()
