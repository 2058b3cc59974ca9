"""The intake's OpenAPI document tells the truth: Schemathesis generates requests from it (NUL
bytes included, with a valid key, bodies valid enough to reach the database) and sends them in
process to the app on real Postgres and Redis. No worker runs, so chat and text completions
answer 504 after a short wait. Every answer must be declared, shaped as declared, and never a
server error."""

from __future__ import annotations

import dataclasses
from collections import Counter

import asyncpg
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events

from tests.integration.test_intake_api import new_key
from tokenmill.intake.api import create_app
from tokenmill.intake.main import wire
from tokenmill.settings import Settings

# Generated requests per operation and phase: enough to find crashes, small enough that the
# whole run stays well under a minute on two slow cores.
EXAMPLES_MAX = 25
# The operator's routes (tokenmill.intake.admin_api), left out of the customer-key pass.
ADMIN_PATHS = "^/admin/"
# No worker runs, so a completion is never ready: answer 504 at once rather than after 120 s.
CHAT_WAIT_S = 0.05


def config(key: str) -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "seed": 20261201,
            # Two busy cores make generation slow at times; that is not the API's failure.
            "suppress-health-check": ["too_slow", "filter_too_much"],
            # Show the bodies that failed as sent: test keys and token counts are no secrets.
            "output": {"sanitization": {"enabled": False}},
            "auth": {"openapi": {"bearer": {"bearer": key}}},
            # No example database: each run sends the same requests, and writes no files.
            "generation": {
                "max-examples": EXAMPLES_MAX,
                "allow-x00": True,
                "mode": "all",
                "database": "none",
            },
            "phases": {
                # Boundary values of what the document allows. Its invalid variants would triple
                # the run; fuzzing sends invalid requests, and test_intake_api the 405s.
                "coverage": {"generation": {"mode": "positive"}},
                "stateful": {"enabled": False},
            },
            "checks": {
                "enabled": False,
                # 504 is the designed answer of a completion no worker finished in time.
                "not_a_server_error": {"enabled": True, "expected-statuses": ["2xx", "4xx", 504]},
                "status_code_conformance": {"enabled": True},
                "content_type_conformance": {"enabled": True},
                "response_schema_conformance": {"enabled": True},
                "response_headers_conformance": {"enabled": True},
            },
            # Not ready is what the probes say with no worker running: their designed 503.
            "operations": [
                {
                    "include-path": ["/readyz", "/metrics"],
                    "checks": {"not_a_server_error": {"expected-statuses": ["2xx", 503]}},
                }
            ],
        }
    )


ADMIN_TOKEN = "schemathesis-admin-token"
# The admin routes take the admin credential, not a customer key: they run in a pass of their
# own (test_every_admin_answer_...), with that credential.
ADMIN_PATHS = r"^/admin/"


def app_for(test_settings: Settings):
    settings = dataclasses.replace(test_settings, chat_wait_s=CHAT_WAIT_S, admin_token=ADMIN_TOKEN)
    return create_app(settings, wire)


@pytest.fixture
async def api_schema(test_settings: Settings, pool: asyncpg.Pool) -> schemathesis.BaseSchema:
    key = await new_key(pool)
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", app_for(test_settings), config=config(key)
    )
    # This pass sends a customer's key: the admin routes would answer it 403 and nothing else,
    # so they are checked by their own pass with the admin credential instead.
    return schema.exclude(path_regex=ADMIN_PATHS)


def operations_of(schema: schemathesis.BaseSchema) -> set[str]:
    return {
        f"{op.method.upper()} {op.path}"
        for op in (result.ok() for result in schema.get_all_operations())
    }


def run(schema: schemathesis.BaseSchema) -> tuple[Counter[tuple[str, int]], list[str]]:
    """Every phase Schemathesis runs (examples, coverage, fuzzing): how many answers of each
    status each operation gave, and each failed check with the request that reproduces it."""
    answers: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.NonFatalError):
            failures.append(f"{event.label}: the app raised {event.value!r}")
        if isinstance(event, events.FatalError):
            failures.append(f"Schemathesis failed: {event.exception!r}")
        if not isinstance(event, events.ScenarioFinished):
            continue
        for interaction in event.recorder.interactions.values():
            if interaction.response is not None:
                answers[(event.recorder.label, interaction.response.status_code)] += 1
        for nodes in event.recorder.checks.values():
            for node in nodes:
                if node.status == Status.FAILURE and node.failure_info is not None:
                    info = node.failure_info
                    failures.append(f"{node.name}: {info.failure.title}\n{info.code_sample}")
    return answers, failures


def test_every_answer_is_declared_shaped_as_declared_and_never_a_server_error(
    api_schema: schemathesis.BaseSchema,
):
    answers, failures = run(api_schema)
    assert not failures, "\n\n".join(failures)
    assert {operation for operation, _ in answers} == operations_of(api_schema), answers
    # Generated bodies got past validation into the database: jobs were accepted, completions
    # recorded and waited for (504: no worker runs), or a reused Idempotency-Key looked up.
    for operation in ("POST /v1/jobs", "POST /v1/chat/completions", "POST /v1/completions"):
        stored = sum(answers[(operation, status)] for status in (200, 202, 409, 504))
        assert stored >= EXAMPLES_MAX // 4, answers


def test_every_admin_answer_is_declared_shaped_as_declared_and_never_a_server_error(
    test_settings: Settings,
):
    """Every admin route with the admin credential: customers created, tiers changed, budgets
    and top-ups of generated amounts, keys listed and revoked by generated names, price plans
    of generated bands, invoices listed, shown and finalized, reports of generated ranges."""
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", app_for(test_settings), config=config(ADMIN_TOKEN)
    ).include(path_regex=ADMIN_PATHS)
    answers, failures = run(schema)
    assert not failures, "\n\n".join(failures)
    assert {operation for operation, _ in answers} == operations_of(schema), answers
    # Generated bodies got past validation: customers were made.
    assert answers[("POST /admin/v1/customers", 201)] >= EXAMPLES_MAX // 4, answers
