"""An invoice as JSON (the APIs and `--json`), CSV and PDF (fpdf2). Amounts travel as strings."""

from __future__ import annotations

import csv
import io
from decimal import Decimal
from typing import Any

from fpdf import FPDF

from tokenmill.ledger.billing import Line
from tokenmill.ledger.invoices import CreditNote, Invoice

ROUNDING_RULE = (
    "Each line is rounded to the cent (ROUND_HALF_EVEN); totals are sums of the rounded lines."
)
CSV_COLUMNS = (
    "invoice",
    "period",
    "status",
    "line_no",
    "kind",
    "model",
    "tier",
    "plan",
    "token_class",
    "reason",
    "requests",
    "tokens",
    "charged_tokens",
    "amount",
    "currency",
)


def money(value: Decimal) -> str:
    return format(value, "f")


def _line_json(line: Line) -> dict[str, Any]:
    described = (
        {
            "model": line.model,
            "tier": line.tier,
            "plan_id": line.plan_id,
            "plan_version": line.plan_version,
            "token_class": line.token_class,
            "tokens": line.tokens,
            "charged_tokens": line.charged_tokens,
        }
        if line.kind == "usage"
        else {"reason": line.reason}
    )
    return {
        "kind": line.kind,
        **described,
        "requests": line.requests,
        "amount": money(line.amount),
        "amount_exact": money(line.amount_exact),
    }


def credit_note_json(note: CreditNote) -> dict[str, Any]:
    return {
        "object": "credit_note",
        "id": note.credit_note_id,
        "number": note.number,
        "invoice_id": note.invoice_id,
        "invoice_number": note.invoice_number,
        "customer_id": note.customer_id,
        "currency": note.currency,
        "issued_at": note.issued_at.isoformat(),
        "total": money(note.total),
        "lines": [_line_json(line) for line in note.lines],
    }


def summary_json(invoice: Invoice) -> dict[str, Any]:
    fig = invoice.figures
    return {
        "object": "invoice",
        "id": invoice.invoice_id,
        "number": invoice.number,
        "status": invoice.status,
        "supplement_of": invoice.supplement_of,
        "customer_id": invoice.customer_id,
        "period": str(invoice.period),
        "currency": invoice.currency,
        "created_at": invoice.created_at.isoformat(),
        "finalized_at": invoice.finalized_at.isoformat() if invoice.finalized_at else None,
        "subtotal": money(fig.subtotal),
        "credits_total": money(fig.credits_total),
        "total": money(fig.total),
    }


def invoice_json(invoice: Invoice) -> dict[str, Any]:
    fig = invoice.figures
    return {
        **summary_json(invoice),
        "included_quota": {
            "included_tokens": fig.included_tokens,
            "used_tokens": fig.used_tokens,
            "covered_tokens": fig.quota_used_tokens,
        },
        "rounding": ROUNDING_RULE,
        "lines": [_line_json(line) for line in fig.lines],
        "credit_notes": [credit_note_json(note) for note in invoice.credit_notes],
    }


def invoice_csv(invoice: Invoice) -> str:
    """One row per line, then a total row: a spreadsheet sums the lines to the total."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    head = [invoice.number or invoice.invoice_id, str(invoice.period), invoice.status]
    for n, line in enumerate(invoice.figures.lines, 1):
        plan = f"{line.plan_id}@{line.plan_version}" if line.plan_id else ""
        writer.writerow(
            [
                *head,
                n,
                line.kind,
                line.model or "",
                line.tier or "",
                plan,
                line.token_class or "",
                line.reason or "",
                line.requests,
                line.tokens,
                line.charged_tokens,
                money(line.amount),
                invoice.currency,
            ]
        )
    total = ["", "total", "", "", "", "", "", "", "", "", money(invoice.figures.total)]
    writer.writerow([*head, *total, invoice.currency])
    return out.getvalue()


def _describe(line: Line) -> str:
    if line.kind == "credit":
        return f"Credit: {line.reason} ({line.requests} requests)"
    return (
        f"{line.model} / {line.tier} / {line.plan_id}@{line.plan_version} / "
        f"{line.token_class.replace('_', ' ')}"  # type: ignore[union-attr]
    )


def invoice_pdf(invoice: Invoice) -> bytes:
    """A one-document PDF: header, quota, lines with tokens and amounts, totals, credit notes."""
    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    pdf.set_title(f"Invoice {invoice.number or 'draft'}")
    pdf.set_font("Helvetica", "B", 16)
    title = f"Invoice {invoice.number}" if invoice.number else "Draft invoice (not final)"
    if invoice.supplement_of:
        title = title.replace("nvoice", "nvoice (supplementary)", 1)
    pdf.cell(0, 10, title, new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", size=10)
    fig = invoice.figures
    for text in (
        f"Customer: {invoice.customer_id}",
        f"Billing period: {invoice.period} (calendar month, UTC)",
        f"Currency: {invoice.currency}",
        *_supplement_note(invoice),
        f"Issued: {invoice.finalized_at.isoformat() if invoice.finalized_at else '-'}",
        f"Included tokens: {fig.included_tokens:,}; used: {fig.used_tokens:,}; "
        f"covered by the quota: {fig.quota_used_tokens:,}",
    ):
        pdf.cell(0, 6, text, new_x="LMARGIN", new_y="NEXT")
    pdf.ln(4)
    # A table wraps a long line description (a long model name) instead of overprinting.
    pdf.set_font("Helvetica", size=9)
    with pdf.table(
        col_widths=(100, 30, 30, 30), text_align=("LEFT", "RIGHT", "RIGHT", "RIGHT")
    ) as table:
        table.row(("Line", "Tokens", "Charged", "Amount"))
        for line in fig.lines:
            tokens = f"{line.tokens:,}" if line.kind == "usage" else ""
            charged = f"{line.charged_tokens:,}" if line.kind == "usage" else ""
            table.row((_describe(line), tokens, charged, money(line.amount)))
        for label, amount in (
            ("Subtotal", fig.subtotal),
            ("Credits", fig.credits_total),
            ("Total", fig.total),
        ):
            table.row((label, "", "", f"{money(amount)} {invoice.currency}"))
    pdf.ln(4)
    pdf.set_font("Helvetica", "I", 8)
    pdf.multi_cell(0, 5, ROUNDING_RULE, new_x="LMARGIN", new_y="NEXT")
    for note in invoice.credit_notes:
        pdf.multi_cell(
            0,
            5,
            f"Credit note {note.number} ({note.issued_at.date()}): "
            f"{money(note.total)} {note.currency}",
            new_x="LMARGIN",
            new_y="NEXT",
        )
    return bytes(pdf.output())


def _supplement_note(invoice: Invoice) -> list[str]:
    if not invoice.supplement_of:
        return []
    return [f"Supplementary to invoice {invoice.supplement_of}: usage booked after it was issued"]


def summary_line(invoice: Invoice) -> str:
    fig = invoice.figures
    number = invoice.number or "draft"
    return (
        f"{number:<16} {invoice.invoice_id}  {invoice.customer_id}  {invoice.period}  "
        f"{invoice.status:<9} total {money(fig.total)} {invoice.currency}"
        + (f"  supplement to {invoice.supplement_of}" if invoice.supplement_of else "")
    )


def invoice_text(invoice: Invoice) -> str:
    fig = invoice.figures
    out = [
        summary_line(invoice),
        *_supplement_note(invoice),
        f"included tokens {fig.included_tokens}, used {fig.used_tokens}, "
        f"covered by the quota {fig.quota_used_tokens}",
    ]
    out += [f"  {_describe(line):<72} {money(line.amount):>12}" for line in fig.lines]
    out += [
        f"  {'subtotal':<72} {money(fig.subtotal):>12}",
        f"  {'credits':<72} {money(fig.credits_total):>12}",
        f"  {'total':<72} {money(fig.total):>12} {invoice.currency}",
        ROUNDING_RULE,
    ]
    out += [
        f"credit note {note.number} issued {note.issued_at.isoformat()}: "
        f"{money(note.total)} {note.currency}"
        for note in invoice.credit_notes
    ]
    return "\n".join(out)
