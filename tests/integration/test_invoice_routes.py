"""Invoices, usage and reports as customers, operators and scripts reach them: /v1/invoices
(each customer sees only its own), /v1/usage ranges and groups, the admin routes, and
`tokenmill invoices ...` / `tokenmill reports` on real Postgres."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.integration.test_intake_api import auth
from tests.integration.test_invoices import MTOK, at, parse_pdf
from tests.integration.usage_rows import book, usage_record
from tokenmill import cli
from tokenmill.intake.api import create_app
from tokenmill.intake.keys import create_customer, issue_key
from tokenmill.intake.main import wire
from tokenmill.settings import Settings

ADMIN_TOKEN = "test-admin-token"


@pytest.fixture
async def client(test_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(dataclasses.replace(test_settings, admin_token=ADMIN_TOKEN), wire)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://intake") as http:
            yield http


async def new_customer(pool: asyncpg.Pool) -> tuple[str, str]:
    async with pool.acquire() as conn, conn.transaction():
        found = await create_customer(conn, "test", "standard", "eu-west")
        return found.customer_id, await issue_key(conn, found.customer_id)


async def test_a_customer_sees_its_own_invoices_and_never_anothers(
    client: httpx.AsyncClient, pool: asyncpg.Pool
):
    alice, alice_key = await new_customer(pool)
    bob, bob_key = await new_customer(pool)
    await book(
        pool,
        [
            usage_record(alice, at("2025-08"), input_tokens=MTOK),
            usage_record(bob, at("2025-08"), input_tokens=2 * MTOK),
        ],
    )
    listed = (await client.get("/v1/invoices", headers=auth(alice_key))).json()
    (mine,) = listed["data"]
    assert mine["customer_id"] == alice and mine["status"] == "draft" and mine["number"] is None
    assert mine["total"] == "0.50"

    stranger = await client.get(f"/v1/invoices/{mine['id']}", headers=auth(bob_key))
    assert stranger.status_code == 404
    shown = await client.get(f"/v1/invoices/{mine['id']}", headers=auth(alice_key))
    assert shown.status_code == 200 and shown.json()["lines"][0]["amount"] == "0.50"

    # Finalized by the operator (one customer), then found by its number too.
    refused = await client.post(
        "/admin/v1/invoices/finalize",
        json={"customer_id": alice, "period": "2025-08"},
        headers=auth(alice_key),
    )
    assert refused.status_code == 403
    done = await client.post(
        "/admin/v1/invoices/finalize",
        json={"customer_id": alice, "period": "2025-08"},
        headers=auth(ADMIN_TOKEN),
    )
    assert done.status_code == 200, done.text
    (number,) = done.json()["finalized_now"]
    pdf = await client.get(
        f"/v1/invoices/{number}", headers={**auth(alice_key), "Accept": "application/pdf"}
    )
    assert pdf.headers["content-type"] == "application/pdf"
    assert number.encode() in b"".join(parse_pdf(pdf.content))
    assert (await client.get(f"/v1/invoices/{number}", headers=auth(bob_key))).status_code == 404
    # Bob's draft is untouched by Alice's finalization.
    (bobs,) = (await client.get("/v1/invoices", headers=auth(bob_key))).json()["data"]
    assert bobs["status"] == "draft" and bobs["total"] == "1.00"

    # A request of August booked after Alice's invoice was issued: the admin finalization
    # issues it on a supplementary invoice, which names the original; she sees both.
    await book(pool, [usage_record(alice, at("2025-08", 31), input_tokens=MTOK)])
    late = await client.post(
        "/admin/v1/invoices/finalize",
        json={"customer_id": alice, "period": "2025-08"},
        headers=auth(ADMIN_TOKEN),
    )
    (supplement,) = late.json()["supplementary_now"]
    assert late.json()["finalized_now"] == [supplement]
    listed = (await client.get("/v1/invoices", headers=auth(alice_key))).json()["data"]
    assert [(i["number"], i["supplement_of"], i["total"]) for i in listed] == [
        (number, None, "0.50"),
        (supplement, number, "0.50"),
    ]


async def test_the_admin_routes_are_declared_in_the_openapi_document(
    client: httpx.AsyncClient,
):
    paths = (await client.get("/openapi.json")).json()["paths"]
    declared = {
        (method.upper(), path): sorted(operation["responses"])
        for path, item in paths.items()
        if path.startswith("/admin/v1/invoices") or path == "/admin/v1/reports"
        for method, operation in item.items()
    }
    assert declared[("POST", "/admin/v1/invoices/finalize")] == [
        *("200", "400", "401", "403", "404", "409", "413", "503", "504")
    ]
    assert declared[("GET", "/admin/v1/invoices/{ref}")] == [
        *("200", "400", "401", "403", "404", "503", "504")
    ]
    assert declared[("GET", "/admin/v1/reports")] == ["200", "400", "401", "403", "503", "504"]


async def test_the_admin_routes_refuse_bad_input_and_an_unfinished_period(
    client: httpx.AsyncClient,
):
    admin = auth(ADMIN_TOKEN)
    for period, status in (("2025-13", 400), ("2099-01", 409)):
        answer = await client.post(
            "/admin/v1/invoices/finalize",
            json={"customer_id": "cus_x", "period": period},
            headers=admin,
        )
        assert answer.status_code == status, answer.text
    answer = await client.get("/admin/v1/reports?from=2025-02-01&to=2025-01-01", headers=admin)
    assert answer.status_code == 400 and "after" in answer.json()["detail"]
    answer = await client.get("/admin/v1/reports?by=week", headers=admin)
    assert answer.status_code == 400 and "query.by" in answer.json()["detail"]


async def test_usage_by_day_model_and_tier_over_a_range_and_bad_ranges_refused(
    client: httpx.AsyncClient, pool: asyncpg.Pool
):
    _, key = await new_customer(pool)
    for prompt in ("one", "two"):
        body = {"prompt": prompt, "max_tokens": 4}
        assert (await client.post("/v1/jobs", json=body, headers=auth(key))).status_code == 202
    plain = (await client.get("/v1/usage", headers=auth(key))).json()
    assert plain["tiers"][0]["requests"] == 2 and plain["groups"] is None
    today = (await client.get("/v1/usage?group_by=day", headers=auth(key))).json()
    (day,) = today["groups"]
    assert day["requests"] == 2
    ranged = await client.get(
        f"/v1/usage?from={day['group']}&to={day['group']}&group_by=model", headers=auth(key)
    )
    assert ranged.json()["groups"][0]["requests"] == 2 and ranged.json()["from"] == day["group"]
    before = (await client.get("/v1/usage?to=2020-01-01&group_by=tier", headers=auth(key))).json()
    assert before["tiers"] == [] and before["groups"] == []

    for query, says in (
        ("from=2026-13-01", "YYYY-MM-DD"),
        ("to=yesterday", "YYYY-MM-DD"),
        ("from=2026-11-30&to=2026-11-01", "after"),
        ("group_by=week", "day, model, tier"),
    ):
        answer = await client.get(f"/v1/usage?{query}", headers=auth(key))
        assert answer.status_code == 400, query
        assert says in answer.json()["detail"], answer.json()


@pytest.fixture
def tokenmill(settings: Settings, monkeypatch, capsys):
    """Run `tokenmill ...` on this test run's servers; return (exit message, stdout, stderr)."""
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)

    async def run(*argv: str) -> tuple[str | None, str, str]:
        try:
            await asyncio.to_thread(cli.main, list(argv))
            refusal = None
        except SystemExit as exc:
            refusal = str(exc.code)
        captured = capsys.readouterr()
        return refusal, captured.out, captured.err

    return run


async def test_invoices_and_reports_from_the_command_line(pool, tokenmill, tmp_path: Path):
    customers = [(await new_customer(pool))[0] for _ in range(3)]
    rows = [usage_record(c, at("2025-09"), input_tokens=MTOK) for c in customers]
    rows.append(usage_record(customers[0], at("2025-09", 2), model="tm-b", output_tokens=MTOK))
    await book(pool, rows)

    refusal, _, err = await tokenmill("invoices", "issue", "--period", "2025-9")
    assert refusal == "2" and "YYYY-MM" in err
    refusal, _, _ = await tokenmill("invoices", "issue", "--period", "2099-01")
    assert "2099-01 is not over" in refusal

    refusal, out, err = await tokenmill("invoices", "issue", "--period", "2025-09", "--json")
    assert refusal is None, refusal
    issued = json.loads(out)
    assert len(issued["finalized"]) == 3 and issued["already_finalized"] == 0
    # Not a terminal: the progress is plain lines on stderr.
    assert "finalizing 2025-09: 3/3" in err.splitlines()
    refusal, out, _ = await tokenmill("invoices", "issue", "--period", "2025-09", "--json")
    assert json.loads(out)["finalized"] == [] and json.loads(out)["already_finalized"] == 3

    refusal, out, _ = await tokenmill("invoices", "list", "--period", "2025-09", "--json")
    assert sorted(i["number"] for i in json.loads(out)) == sorted(issued["finalized"])
    number = issued["finalized"][0]
    refusal, out, _ = await tokenmill("invoices", "show", number, "--csv")
    *lines, total = list(csv.DictReader(io.StringIO(out)))
    assert sum(Decimal(line["amount"]) for line in lines) == Decimal(total["amount"])
    pdf = tmp_path / "invoice.pdf"
    refusal, out, _ = await tokenmill("invoices", "show", number, "--pdf", str(pdf))
    assert refusal is None and number.encode() in b"".join(parse_pdf(pdf.read_bytes()))
    refusal, _, _ = await tokenmill("invoices", "show", "TM-1999-000001")
    assert "no invoice" in refusal

    refusal, out, _ = await tokenmill(
        "reports", "--from", "2025-09-01", "--to", "2025-09-30", "--by", "model", "--json"
    )
    report = json.loads(out)
    assert [g["group"] for g in report["groups"]][-1] == "tm-test"
    totals = report["totals"]
    # Three requests of 1,000,000 input and 500 output tokens, one of 1,000 and 1,000,000.
    assert totals["tokens"] == 4 * MTOK + 2500 and totals["revenue"] == "3.002750000000"
    assert Decimal(totals["margin"]) == Decimal(totals["revenue"]) - Decimal(totals["cost"])
    assert totals["energy_kwh"] == "0.000004" and totals["revenue_per_mtok"] is not None
    refusal, _, err = await tokenmill("reports", "--from", "2025-09-31")
    assert refusal == "2" and "YYYY-MM-DD" in err

    # A late request: the next run issues it on a supplementary invoice, and only it.
    await book(pool, [usage_record(customers[1], at("2025-09", 30, 23), input_tokens=MTOK)])
    refusal, out, _ = await tokenmill("invoices", "issue", "--period", "2025-09", "--json")
    late = json.loads(out)
    assert late["finalized"] == late["supplementary"] and len(late["supplementary"]) == 1
    assert late["unbilled_requests"] == 0
    refusal, out, _ = await tokenmill("invoices", "list", "--customer", customers[1])
    original, supplement = out.splitlines()
    assert supplement.startswith(late["supplementary"][0])
    assert supplement.endswith(f"supplement to {original.split()[0]}")
