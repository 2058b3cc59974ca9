"""Admin routes for the books' documents: invoices, credit notes and reports (/admin/v1).

Mounted by `create_app` behind the admin credential. They are the operator's, not the
customers', so they stay out of the customer-facing OpenAPI document (README lists them).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from tokenmill.intake.errors import ApiError
from tokenmill.ledger import invoice_render, invoices
from tokenmill.ledger.billing import Period, parse_day
from tokenmill.ledger.reports import GROUP_BY, report

router = APIRouter(include_in_schema=False)
REF_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class FinalizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer_id: str
    period: str


def _period(text: str) -> Period:
    try:
        return Period.parse(text)
    except ValueError as exc:
        raise ApiError(400, "invalid_request", str(exc), "period") from exc


@router.get("/invoices")
async def list_invoices(
    request: Request, period: str | None = None, customer_id: str | None = None
) -> dict[str, Any]:
    found = await invoices.list_invoices(
        request.app.state.runtime.db,
        period=_period(period) if period is not None else None,
        customer_id=customer_id,
        limit=request.app.state.settings.invoices_list_max,
    )
    return {"object": "list", "data": [invoice_render.summary_json(i) for i in found]}


@router.get("/invoices/{ref}")
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


@router.post("/invoices/finalize")
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


@router.get("/credit-notes")
async def list_credit_notes(
    request: Request, customer_id: str | None = None, invoice_id: str | None = None
) -> dict[str, Any]:
    notes = await invoices.credit_notes(
        request.app.state.runtime.db,
        customer_id=customer_id,
        invoice_id=invoice_id,
        limit=request.app.state.settings.invoices_list_max,
    )
    return {"object": "list", "data": [invoice_render.credit_note_json(n) for n in notes]}


@router.post("/credit-notes/issue")
async def issue_credit_notes(request: Request) -> dict[str, Any]:
    """Put every late credit (its period's invoice already final) on a credit note."""
    async with request.app.state.runtime.db.acquire() as conn:
        numbers = await invoices.issue_credit_notes(
            conn, request.app.state.settings.invoice_batch_size
        )
    return {"issued": numbers}


@router.get("/reports")
async def reports(
    request: Request,
    start: Annotated[str | None, Query(alias="from")] = None,
    end: Annotated[str | None, Query(alias="to")] = None,
    by: str = "tier",
) -> dict[str, Any]:
    today = datetime.now(UTC).date()
    try:
        first = parse_day(start) if start is not None else today.replace(day=1)
        last = parse_day(end) if end is not None else today
        if by not in GROUP_BY:
            raise ValueError(f"by {by!r} is not one of: {', '.join(GROUP_BY)}")
        found = await report(
            request.app.state.runtime.db,
            first,
            last,
            by,  # type: ignore[arg-type]
            request.app.state.settings.report_groups_max,
        )
    except ValueError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from exc
    return found.as_json()
