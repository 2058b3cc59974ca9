"""The OpenAPI document declares what the intake sends, and the success bodies the views build
match the models it declares, including the completed and booked shapes that the Schemathesis
run (no worker) never reaches."""

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from pydantic import BaseModel

from tokenmill.intake import openapi, views
from tokenmill.intake import usage as usage_view
from tokenmill.intake.api import create_app
from tokenmill.intake.keys import Customer
from tokenmill.intake.main import wire
from tokenmill.settings import Settings

SETTINGS = Settings.from_env({}, max_prompt_chars=100, max_tokens_limit=64)
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def document() -> dict:
    return create_app(SETTINGS, wire).openapi()


def operations(document: dict):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def test_no_route_declares_the_422_it_never_sends(document: dict):
    assert all("422" not in op["responses"] for _, _, op in operations(document))
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_every_v1_route_is_described_and_needs_the_bearer_key(document: dict):
    v1 = {(method, path) for method, path, _ in operations(document) if path.startswith("/v1")}
    assert v1 == {(method, path) for method, path in openapi.OPERATIONS if path.startswith("/v1")}
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": openapi.BEARER.model.description,
    }
    for method, path, op in operations(document):
        if path.startswith("/v1"):
            assert op["security"] == [{"bearer": []}], (method, path)
            assert all(p["name"].lower() != "authorization" for p in op.get("parameters", []))
            assert "WWW-Authenticate" in op["responses"]["401"]["headers"]
            assert "Retry-After" in op["responses"]["503"]["headers"]
            if "429" in op["responses"]:
                assert "Retry-After" in op["responses"]["429"]["headers"]


# 402: over budget, out of prepaid credit or past the free quota; 403: a suspended customer;
# 429: the key's tier is shed under the facility power cap.
BODY_ERRORS = ("400", "401", "402", "403", "409", "413", "415", "429")
# Every /v1 route may meet a draining intake or a storage outage.
UNAVAILABLE = ("503", "504")


@pytest.mark.parametrize(
    ("method", "path", "statuses", "error_type"),
    [
        ("post", "/v1/jobs", {"200", "202", *BODY_ERRORS, *UNAVAILABLE}, "problem+json"),
        (
            "get",
            "/v1/jobs/{job_id}",
            {"200", "400", "401", "403", "404", *UNAVAILABLE},
            "problem+json",
        ),
        ("post", "/v1/chat/completions", {"200", *BODY_ERRORS, *UNAVAILABLE}, "json"),
        ("post", "/v1/completions", {"200", *BODY_ERRORS, *UNAVAILABLE}, "json"),
        ("get", "/v1/models", {"200", "401", "403", *UNAVAILABLE}, "json"),
        ("get", "/v1/usage", {"200", "400", "401", "403", *UNAVAILABLE}, "problem+json"),
        ("get", "/v1/invoices", {"200", "401", "403", *UNAVAILABLE}, "problem+json"),
        (
            "get",
            "/v1/invoices/{invoice_id}",
            {"200", "400", "401", "403", "404", *UNAVAILABLE},
            "problem+json",
        ),
    ],
)
def test_each_route_declares_the_statuses_it_answers_in_its_error_shape(
    document: dict, method: str, path: str, statuses: set[str], error_type: str
):
    responses = document["paths"][path][method]["responses"]
    assert set(responses) == statuses
    assert all(
        list(responses[status]["content"]) == [f"application/{error_type}"]
        for status in statuses
        if status >= "400"
    )


def test_request_bodies_carry_the_limits_validate_applies(document: dict):
    schemas = document["components"]["schemas"]
    chat, text = schemas["ChatCompletionRequest"], schemas["CompletionRequest"]
    assert chat["required"] == ["messages"] and "prompt" not in chat["properties"]
    assert text["required"] == ["prompt"] and "messages" not in text["properties"]
    assert text["properties"]["prompt"]["maxLength"] == SETTINGS.max_prompt_chars
    tokens = text["properties"]["max_tokens"]["anyOf"][0]
    assert (tokens["minimum"], tokens["maximum"]) == (1, SETTINGS.max_tokens_limit)


def conforms(model: type[BaseModel], body: dict) -> None:
    """Strictly, as the body travels: JSON, no coercion."""
    model.model_validate_json(json.dumps(body), strict=True)


def row(**overrides) -> dict:
    """An intake.requests row of a job that completed and was booked."""
    return {
        "request_id": "job_01",
        "status": "completed",
        "model": "smollm2",
        "tier": "standard",
        "region": "eu-west",
        "max_tokens": 8,
        "submitted_at": NOW,
        "started_at": NOW,
        "completed_at": NOW,
        "booked_at": NOW,
        "output_text": "hi",
        "finish_reason": "stop",
        "prompt_tokens": 3,
        "completion_tokens": 1,
        "queue_ms": 1.5,
        "ttft_ms": 2.25,
        "e2e_ms": 3.0,
        "energy_j": Decimal("1.250"),
        "meter": "scripted",
        "energy_estimated": False,
        "cost": Decimal("0.00001"),
        "revenue": Decimal("0.00002"),
        "currency": "USD",
        "error": None,
        "cancel_requested_at": None,
        "cached_prompt_tokens": 2,
        "api": "chat",
    } | overrides


@pytest.mark.parametrize(
    "record",
    [
        row(),
        row(booked_at=None, cost=None, revenue=None, currency=None),
        row(status="queued", started_at=None, completed_at=None, booked_at=None),
        row(status="failed", output_text=None, finish_reason=None, error="too long"),
        row(status="cancelled", finish_reason="cancelled", cancel_requested_at=NOW),
        row(status="cancelled", output_text=None, finish_reason=None, cancel_requested_at=NOW),
        row(cached_prompt_tokens=None),
    ],
)
def test_views_build_the_bodies_the_document_declares(record: dict):
    conforms(openapi.JobView, views.job(record))
    if record["output_text"] is not None:
        conforms(openapi.ChatCompletion, views.chat_completion(record))
        conforms(openapi.TextCompletion, views.text_completion(record))


def test_a_running_job_shows_its_partial_text_without_a_finish_reason():
    running = row(status="running", completed_at=None, booked_at=None, output_text=None)
    view = views.job(running, partial="Hel")
    conforms(openapi.JobView, view)
    assert view["output"] == {"text": "Hel", "finish_reason": None}


@pytest.mark.parametrize("api", ["chat", "completions"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_chunks_are_shaped_as_declared(api: str, include_usage: bool):
    chunks = views.Chunks(row(api=api), include_usage)
    model = openapi.ChatCompletionChunk if api == "chat" else openapi.TextCompletionChunk
    sent = [chunks.first(), chunks.text("Hel"), chunks.finish("stop"), chunks.usage(3, 1, 2)]
    for chunk in sent:
        if chunk is not None:
            conforms(model, chunk)
    assert ("usage" in sent[1]) is include_usage and sent[3]["choices"] == []
    assert sent[3]["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}
    if api == "chat":
        assert sent[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert sent[1]["choices"][0]["delta"] == {"content": "Hel"}
    else:
        assert sent[0] is None and sent[1]["choices"][0]["text"] == "Hel"


def test_usage_view_matches_its_declared_model():
    group = {
        "grp": "premium",
        "requests": 2,
        "completed": 1,
        "booked": 1,
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "energy_j": Decimal("2.5"),
        "revenue": Decimal("0.1"),
        "currency": None,
    }
    who = Customer("cus_1", "test", "standard", "eu-west")
    plain = usage_view.parse_query(None, None, None)
    conforms(openapi.UsageReport, usage_view.view(who, plain, [group], None))
    by_day = usage_view.parse_query("2026-11-01", "2026-11-30", "day")
    body = usage_view.view(who, by_day, [group], [{**group, "grp": "2026-11-02"}])
    conforms(openapi.UsageReport, body)
    assert body["from"] == "2026-11-01" and body["groups"][0]["group"] == "2026-11-02"


def test_the_invoice_route_declares_its_pdf_too(document: dict):
    content = document["paths"]["/v1/invoices/{invoice_id}"]["get"]["responses"]["200"]["content"]
    assert set(content) == {"application/json", "application/pdf"}
