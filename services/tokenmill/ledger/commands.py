"""`tokenmill invoices issue|list|show|credit-notes` and `tokenmill reports`: no SQL by hand."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import asyncpg

from tokenmill.ledger import billing, invoices
from tokenmill.ledger import invoice_render as render
from tokenmill.ledger.billing import Period
from tokenmill.ledger.reports import (
    GROUP_BY,
    energy_report,
    energy_report_text,
    report,
    report_text,
)
from tokenmill.settings import Settings

PROGRESS_BAR_CHARS = 30


class CommandError(ValueError):
    """Bad input to a command: said to the operator, nothing changed."""


def add_commands(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("invoices", help="issue, list and show invoices").add_subparsers(
        dest="invoices_command", required=True
    )
    issue = sub.add_parser("issue", help="finalize every draft invoice of an ended period")
    issue.add_argument("--period", type=PERIOD, required=True, help="the month, YYYY-MM (UTC)")
    listing = sub.add_parser("list", help="list invoices (drafts with their current totals)")
    listing.add_argument("--period", type=PERIOD, default=None, help="only this month, YYYY-MM")
    listing.add_argument("--customer", default=None, help="only this customer's")
    show = sub.add_parser("show", help="one invoice with its lines and credit notes")
    show.add_argument("invoice", help="the invoice's id (inv_...) or number (TM-YYYY-NNNNNN)")
    formats = show.add_mutually_exclusive_group()
    formats.add_argument("--csv", action="store_true", help="its lines as CSV")
    formats.add_argument("--pdf", metavar="FILE", default=None, help="write it as PDF to FILE")
    notes = sub.add_parser("credit-notes", help="list credit notes")
    notes.add_argument("--customer", default=None, help="only this customer's")
    reports = commands.add_parser("reports", help="revenue, cost and margin; unit economics")
    reports.add_argument("--from", dest="start", type=DAY, help="first day, YYYY-MM-DD")
    reports.add_argument("--to", dest="end", type=DAY, help="last day, included")
    reports.add_argument("--by", choices=GROUP_BY, default="tier", help="group by (tier)")
    reports.add_argument(
        "--energy",
        action="store_true",
        help="the energy report: metered, attributed and idle J; J/token per model and tier",
    )
    for command in (issue, listing, show, notes, reports):
        json_flag = formats if command is show else command
        json_flag.add_argument("--json", action="store_true", help="machine-readable output")


def _argument(parse):
    """`parse` as an argparse type: bad input is refused before anything is connected to."""

    def parsed(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return parsed


PERIOD = _argument(Period.parse)
DAY = _argument(billing.parse_day)


class Progress:
    """A progress bar on stderr when it is a terminal; plain lines when it is not (a log)."""

    def __init__(self, stream: TextIO, label: str):
        self.stream, self.label = stream, label
        self.total, self.done = 0, 0
        self.tty = stream.isatty()

    def start(self, total: int) -> None:
        self.total = total
        self._show()

    def advance(self, count: int) -> None:
        self.done += count
        self._show()

    def _show(self) -> None:
        if self.total == 0:
            return
        if not self.tty:
            print(f"{self.label}: {self.done}/{self.total}", file=self.stream, flush=True)
            return
        filled = PROGRESS_BAR_CHARS * self.done // self.total
        bar = "#" * filled + "-" * (PROGRESS_BAR_CHARS - filled)
        end = "\n" if self.done >= self.total else ""
        self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total}{end}")
        self.stream.flush()


async def command(settings: Settings, args: argparse.Namespace) -> str:
    """Run one invoices or reports command; raise CommandError or LookupError for bad input."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        if args.command == "reports":
            return await _reports(conn, settings, args)
        handler = {
            "issue": _issue,
            "list": _list,
            "show": _show,
            "credit-notes": _credit_notes,
        }[args.invoices_command]
        return await handler(conn, settings, args)
    finally:
        await conn.close()


async def _issue(conn: asyncpg.Connection, settings: Settings, args: argparse.Namespace) -> str:
    period = args.period
    progress = Progress(sys.stderr, f"finalizing {period}")
    try:
        result = await invoices.issue_period(
            conn,
            period,
            now=datetime.now(UTC),
            grace_s=settings.invoice_grace_s,
            batch_size=settings.invoice_batch_size,
            on_total=progress.start,
            on_batch=progress.advance,
        )
    except invoices.PeriodNotOver as exc:
        raise CommandError(str(exc)) from exc
    if args.json:
        return json.dumps(
            {
                "period": str(period),
                "finalized": result.finalized,
                "already_finalized": result.already_final,
                "supplementary": result.supplementary,
                "credit_notes": result.credit_notes,
                "unbilled_requests": result.unbilled_requests,
            },
            indent=2,
        )
    lines = [
        f"period {period}: finalized {len(result.finalized)} invoices"
        + (f" ({result.finalized[0]} to {result.finalized[-1]})" if result.finalized else "")
        + f", {result.already_final} were already final",
        f"supplementary invoices for late usage: {len(result.supplementary)}"
        + (f" ({', '.join(result.supplementary)})" if result.supplementary else ""),
        f"credit notes issued for late credits: {len(result.credit_notes)}"
        + (f" ({', '.join(result.credit_notes)})" if result.credit_notes else ""),
    ]
    if result.unbilled_requests:
        lines.append(
            f"note: {result.unbilled_requests} requests of {period} were booked while this ran; "
            "they are on draft supplementary invoices, which the next run issues"
        )
    return "\n".join(lines)


async def _list(conn: asyncpg.Connection, settings: Settings, args: argparse.Namespace) -> str:
    period = args.period
    found = await invoices.list_invoices(
        conn, period=period, customer_id=args.customer, limit=settings.invoices_list_max
    )
    if args.json:
        return json.dumps([render.summary_json(invoice) for invoice in found], indent=2)
    return "\n".join(map(render.summary_line, found)) if found else "no invoices"


async def _show(conn: asyncpg.Connection, settings: Settings, args: argparse.Namespace) -> str:
    invoice = await invoices.find_invoice(conn, args.invoice)
    if invoice is None:
        raise LookupError(f"no invoice with id or number {args.invoice!r}")
    if args.json:
        return json.dumps(render.invoice_json(invoice), indent=2)
    if args.csv:
        return render.invoice_csv(invoice).rstrip("\n")
    if args.pdf:
        await asyncio.to_thread(Path(args.pdf).write_bytes, render.invoice_pdf(invoice))
        return f"wrote {args.pdf} ({invoice.number or 'draft ' + invoice.invoice_id})"
    return render.invoice_text(invoice)


async def _credit_notes(
    conn: asyncpg.Connection, settings: Settings, args: argparse.Namespace
) -> str:
    notes = await invoices.credit_notes(
        conn, customer_id=args.customer, limit=settings.invoices_list_max
    )
    if args.json:
        return json.dumps([render.credit_note_json(note) for note in notes], indent=2)
    if not notes:
        return "no credit notes"
    return "\n".join(
        f"{note.number}  for {note.invoice_number}  {note.customer_id}  "
        f"{render.money(note.total)} {note.currency}  issued {note.issued_at.isoformat()}"
        for note in notes
    )


async def _reports(conn: asyncpg.Connection, settings: Settings, args: argparse.Namespace) -> str:
    today = datetime.now(UTC).date()
    start = args.start or today.replace(day=1)
    end = args.end or today
    try:
        if args.energy:
            energy = await energy_report(conn, start, end, settings.report_groups_max)
            return (
                json.dumps(energy.as_json(), indent=2) if args.json else energy_report_text(energy)
            )
        rep = await report(conn, start, end, args.by, settings.report_groups_max)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    return json.dumps(rep.as_json(), indent=2) if args.json else report_text(rep)
