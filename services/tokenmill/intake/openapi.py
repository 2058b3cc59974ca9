"""The intake's OpenAPI document, made to say what the API does.

FastAPI's own document declares a 422 we never send, none of the errors we do send, and the
API key as an optional header. This one declares, per route, every status it answers with and
that status's body (OpenAI's error shape on the OpenAI-compatible routes, RFC 9457 problem
details elsewhere), the key as a bearer security scheme, the shapes of the success bodies, and
request bodies with the limits `validate` enforces, so clients, code generators and the
Schemathesis run in the test suite all check against what the server really does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from tokenmill.events import Tier
from tokenmill.intake.requests import Api, GenerationRequest
from tokenmill.settings import Settings

# Reads `Authorization: Bearer <key>` and declares the scheme; it never answers by itself
# (auto_error off), so a missing or wrong key gets the API's own 401 body on every route.
BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="An API key from `tokenmill keys create`, sent as `Authorization: Bearer <key>`.",
)

# Exact decimals travel as strings (see views.money).
DecimalString = Annotated[str, Field(pattern=r"^-?[0-9]+(\.[0-9]+)?$", examples=["0.000065"])]
# "cancelled": the job was cancelled (or its streaming client hung up) after its first token.
FinishReason = Literal["stop", "length", "cancelled"]


class _Closed(BaseModel):
    """A body whose every field is declared here, so an undeclared field fails the schema."""

    model_config = ConfigDict(extra="forbid")


class TokenUsage(_Closed):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PromptTokensDetails(_Closed):
    cached_tokens: int = Field(
        description="Of prompt_tokens, how many came from the prefix cache (billed at the "
        "cached-input price)."
    )


class OpenAIUsage(TokenUsage):
    prompt_tokens_details: PromptTokensDetails


class JobOutput(_Closed):
    text: str | None
    finish_reason: FinishReason | None


class JobTimings(_Closed):
    queue_ms: float | None
    ttft_ms: float | None
    total_ms: float | None


class JobEnergy(_Closed):
    """The request's share of its engine steps' metered energy, by the meter named."""

    joules: DecimalString | None
    joules_per_token: DecimalString | None
    meter: str | None
    estimated: bool | None


class JobBilling(_Closed):
    """What the customer is charged; our cost stays in the operator's books."""

    revenue: DecimalString | None
    currency: str | None


class JobView(_Closed):
    """A job as its customer sees it; output, timings and energy once it completed (a
    running job's output is the text streamed so far, with no finish reason), billing once the
    ledger booked it."""

    id: str
    object: Literal["job"]
    status: Literal["queued", "running", "completed", "failed", "cancelled"]
    model: str
    tier: Tier
    region: str
    max_tokens: int
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    booked_at: datetime | None
    output: JobOutput | None
    usage: TokenUsage | None
    timings: JobTimings | None
    energy: JobEnergy | None
    billing: JobBilling | None
    error: str | None
    cancel_requested_at: datetime | None


class JobEvent(_Closed):
    """One event of a job in the ledger's hash-chained log: `position` and `hash` are its place
    in the chain, null until the ledger seals it (within seconds). The hash can be checked
    against a published checkpoint or an auditor's export (`tokenmill audit export`)."""

    seq: int
    event_id: str
    type: str
    occurred_at: datetime
    position: int | None
    hash: str | None


class JobEventList(_Closed):
    object: Literal["list"]
    job_id: str
    data: list[JobEvent]


class AssistantMessage(_Closed):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(_Closed):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: FinishReason | None


class ChatCompletion(_Closed):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage | None


class TextChoice(_Closed):
    index: int
    text: str | None
    logprobs: None
    finish_reason: FinishReason | None


class TextCompletion(_Closed):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: OpenAIUsage | None


class ChunkDelta(_Closed):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Closed):
    index: int
    delta: ChunkDelta
    logprobs: None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Closed):
    """One `data:` event of a streamed chat completion (`stream: true`). The first carries the
    role, the next ones the text, the last choice chunk the finish reason; with
    `stream_options.include_usage` every chunk has `usage: null` but a final one with no
    choices and the usage. `data: [DONE]` ends the stream; an error after the stream began comes
    as `data: {"error": {...}}`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: OpenAIUsage | None = None


class TextCompletionChunk(_Closed):
    """One `data:` event of a streamed text completion, shaped as ChatCompletionChunk's are."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: OpenAIUsage | None = None


class Model(_Closed):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Closed):
    object: Literal["list"]
    data: list[Model]


class _UsageFigures(_Closed):
    requests: int
    completed: int
    booked: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    energy_j: DecimalString
    revenue: DecimalString
    currency: str | None


class TierUsage(_UsageFigures):
    tier: Tier


class GroupUsage(_UsageFigures):
    group: str = Field(description="The day (YYYY-MM-DD, UTC), model or tier.")


class UsageReport(_Closed):
    """Usage by tier over the range (all time without one); with group_by, also per group."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    object: Literal["usage"]
    customer_id: str
    from_: date | None = Field(alias="from")
    to: date | None
    group_by: Literal["day", "model", "tier"] | None
    tiers: list[TierUsage]
    groups: list[GroupUsage] | None


class InvoiceSummary(_Closed):
    """An invoice: a draft (no number, figures as the books stand now) or finalized
    (numbered, never changed again)."""

    object: Literal["invoice"]
    id: str
    number: str | None
    status: Literal["draft", "finalized"]
    supplement_of: str | None = Field(
        description="The number of the period's original invoice when this one is a "
        "supplementary invoice (usage booked after the original was issued)."
    )
    customer_id: str
    period: str = Field(pattern=r"^[0-9]{4}-[0-9]{2}$", examples=["2026-11"])
    currency: str
    created_at: datetime
    finalized_at: datetime | None
    subtotal: DecimalString
    credits_total: DecimalString
    total: DecimalString


class InvoiceList(_Closed):
    object: Literal["list"]
    data: list[InvoiceSummary]


class InvoiceLine(_Closed):
    """A usage line (model, tier, plan version, token class) or a credit line (reason)."""

    kind: Literal["usage", "credit"]
    model: str | None = None
    tier: str | None = None
    plan_id: str | None = None
    plan_version: str | None = None
    token_class: Literal["input", "cached_input", "output"] | None = None
    tokens: int | None = None
    charged_tokens: int | None = None
    reason: str | None = None
    requests: int
    amount: DecimalString
    amount_exact: DecimalString


class IncludedQuota(_Closed):
    included_tokens: int
    used_tokens: int
    covered_tokens: int


class CreditNoteView(_Closed):
    object: Literal["credit_note"]
    id: str
    number: str
    invoice_id: str
    invoice_number: str
    customer_id: str
    currency: str
    issued_at: datetime
    total: DecimalString
    lines: list[InvoiceLine]


class InvoiceView(InvoiceSummary):
    included_quota: IncludedQuota
    rounding: str
    lines: list[InvoiceLine]
    credit_notes: list[CreditNoteView]


class OpenAIErrorDetail(_Closed):
    message: str
    type: Literal["invalid_request_error", "authentication_error", "server_error"]
    param: str | None
    code: str | None


class OpenAIError(_Closed):
    """The error body of the OpenAI-compatible routes, as OpenAI's clients parse it."""

    error: OpenAIErrorDetail


class Problem(BaseModel):
    """RFC 9457 problem details; open to extension members, as the RFC allows."""

    type: str
    title: str
    status: int
    detail: str
    param: str | None = None


class Liveness(_Closed):
    status: Literal["ok"]


class Readiness(BaseModel):
    """Open beyond these two: what each check found is for people to read."""

    status: Literal["ready", "not ready"]
    checks: dict[str, Any]


ErrorShape = Literal["openai", "problem"]
_ERROR_BODIES: dict[ErrorShape, tuple[str, type[BaseModel]]] = {
    "openai": ("application/json", OpenAIError),
    "problem": ("application/problem+json", Problem),
}
_WHY: dict[int, str] = {
    400: "The request is invalid; the body names the field. Nothing was written or queued.",
    401: "The API key is missing, unknown or revoked.",
    402: "The request's worst case (prompt and max_tokens at the plan's highest prices) does not "
    "fit the customer's monthly budget, prepaid credit or free quota; the message says which "
    "and by how much (code `insufficient_quota`). Nothing was written or queued.",
    403: "The key's customer is suspended: its keys are refused until an operator resumes it.",
    404: "Nothing by that id for this key's customer; another customer's job or invoice is not "
    "found either.",
    409: "This Idempotency-Key was used before with a different body; nothing was queued.",
    429: "The facility is over its power budget and sheds this key's tier (free first, then "
    "standard, premium last; code `power_curtailed`): nothing was queued. Send it again after "
    "Retry-After seconds; requests already accepted still complete (a retry with the "
    "Idempotency-Key of one gets its job).",
    413: "The request body is over the size limit; nothing was written or queued.",
    415: "The body is not `application/json`; nothing was written or queued.",
    503: "The intake is shutting down, or cannot reach its storage right now. Send the request "
    "again after Retry-After seconds, with the same Idempotency-Key.",
    504: "No answer in time: the job did not finish within the wait, or the intake stopped "
    "first. An accepted job still runs and is billed once; read it at `/v1/jobs/{id}` "
    "instead of retrying.",
}
_HEADERS: dict[int, dict[str, str]] = {
    401: {"WWW-Authenticate": "`Bearer`: the scheme to authenticate with."},
    429: {"Retry-After": "Seconds to wait before sending the request again."},
    503: {"Retry-After": "Seconds to wait before sending the request again."},
    504: {"x-should-retry": "`false`: OpenAI's clients then do not retry (and pay) again."},
}


@dataclass(frozen=True)
class Answer:
    """One answer that is not an error: why it is sent, its JSON body's model (None: plain
    text), and the headers that always come with it."""

    why: str
    model: type[BaseModel] | None
    headers: dict[str, str] = field(default_factory=dict)
    # Other media types the same answer comes in, when asked for with Accept.
    also: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Operation:
    """What one route answers: its answers, its errors in its error shape, its request body."""

    answers: dict[int, Answer]
    errors_as: ErrorShape = "problem"
    errors: tuple[int, ...] = ()
    request: Api | None = None
    # Why an error is sent, where a route's reason differs from the usual one (_WHY).
    why: dict[int, str] = field(default_factory=dict)


_LOCATION = {"Location": "Where the job can be read: `/v1/jobs/{id}`."}
_STREAMS_FULL = (
    _WHY[503] + " With `stream: true`, also: this intake streams as many answers as it may "
    "(code `too_many_streams`); nothing was written or queued."
)


def _streamed(chunk: str) -> dict[str, dict[str, Any]]:
    """The `stream: true` answer: server-sent events, each one's `data` a `chunk` as JSON (or
    an error, after the stream began), the last one `[DONE]`."""
    payload = {
        "anyOf": [{"$ref": f"#/components/schemas/{name}"} for name in (chunk, "OpenAIError")]
    }
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "string",
                "if": {"const": "[DONE]"},
                "else": {"contentMediaType": "application/json", "contentSchema": payload},
            }
        },
    }
    return {"text/event-stream": {"schema": event}}


# Any /v1 request can meet a draining intake (503, or 504 past the drain's time) or an
# outage of the storage (503).
_UNAVAILABLE = (503, 504)
_BODY_ERRORS = (400, 401, 402, 403, 409, 413, 415, 429, *_UNAVAILABLE)
OPERATIONS: dict[tuple[str, str], Operation] = {
    ("post", "/v1/jobs"): Operation(
        {
            202: Answer("The job was accepted and queued.", JobView, _LOCATION),
            200: Answer(
                "The Idempotency-Key was seen before: the job it made.", JobView, _LOCATION
            ),
        },
        "problem",
        _BODY_ERRORS,
        "jobs",
    ),
    ("get", "/v1/jobs/{job_id}"): Operation(
        {200: Answer("The job.", JobView)}, "problem", (400, 401, 403, 404, *_UNAVAILABLE)
    ),
    ("get", "/v1/jobs/{job_id}/events"): Operation(
        {200: Answer("The job's events in the ledger's log, in log order.", JobEventList)},
        "problem",
        (400, 401, 403, 404, *_UNAVAILABLE),
    ),
    ("post", "/v1/jobs/{job_id}/cancel"): Operation(
        {200: Answer("The job, cancelled or being cancelled.", JobView)},
        "problem",
        (400, 401, 403, 404, 409, *_UNAVAILABLE),
        why={
            404: "No job by that id for this key's customer.",
            409: "The job completed or failed already: there is nothing to cancel.",
        },
    ),
    ("post", "/v1/chat/completions"): Operation(
        {200: Answer("The completion.", ChatCompletion, also=_streamed("ChatCompletionChunk"))},
        "openai",
        _BODY_ERRORS,
        "chat",
        why={503: _STREAMS_FULL},
    ),
    ("post", "/v1/completions"): Operation(
        {200: Answer("The completion.", TextCompletion, also=_streamed("TextCompletionChunk"))},
        "openai",
        _BODY_ERRORS,
        "completions",
        why={503: _STREAMS_FULL},
    ),
    ("get", "/v1/models"): Operation(
        {200: Answer("The models served.", ModelList)}, "openai", (401, 403, *_UNAVAILABLE)
    ),
    ("get", "/v1/usage"): Operation(
        {200: Answer("Usage for this key's customer, by tier and by group_by.", UsageReport)},
        "problem",
        (400, 401, 403, *_UNAVAILABLE),
    ),
    ("get", "/v1/invoices"): Operation(
        {200: Answer("This key's customer's invoices, drafts included.", InvoiceList)},
        "problem",
        (401, 403, *_UNAVAILABLE),
    ),
    ("get", "/v1/invoices/{invoice_id}"): Operation(
        {
            200: Answer(
                "The invoice (by id or number) as JSON, or as PDF with Accept: application/pdf.",
                InvoiceView,
                also={"application/pdf": {"schema": {"type": "string", "format": "binary"}}},
            )
        },
        "problem",
        (400, 401, 403, 404, *_UNAVAILABLE),
    ),
    # The probes take no key. /readyz and /metrics come with the probes (tokenmill.intake
    # .probes); a route that is not there is not described.
    ("get", "/healthz"): Operation({200: Answer("The process answers.", Liveness)}),
    ("get", "/readyz"): Operation(
        {
            200: Answer("Ready for traffic; the body says what was checked.", Readiness),
            503: Answer("Not ready; the body says which check failed.", Readiness),
        }
    ),
    ("get", "/metrics"): Operation(
        {
            200: Answer("Prometheus' text format.", None),
            503: Answer("The numbers could not be read in time; the text says why.", None),
        }
    ),
}
_REQUEST_SCHEMAS: dict[Api, str] = {
    "jobs": "JobRequest",
    "chat": "ChatCompletionRequest",
    "completions": "CompletionRequest",
}
_EXAMPLES: dict[Api, dict[str, Any]] = {
    "jobs": {"prompt": "Name three colours.", "max_tokens": 32},
    "chat": {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16,
    },
    "completions": {"prompt": "The capital of France is", "max_tokens": 8},
}
# Some message must have text that is not whitespace.
_SOME_TEXT = r"\S"
_MODELS: list[type[BaseModel]] = [
    JobView,
    JobEventList,
    ChatCompletion,
    TextCompletion,
    ChatCompletionChunk,
    TextCompletionChunk,
    ModelList,
    UsageReport,
    InvoiceList,
    InvoiceView,
    OpenAIError,
    Problem,
    Liveness,
    Readiness,
]


def declare(operations: dict[tuple[str, str], Operation], models: tuple[type[BaseModel], ...]):
    """Describe more routes (an admin module's): what each answers, and the body models."""
    assert not operations.keys() & OPERATIONS.keys(), "a route is described once"
    OPERATIONS.update(operations)
    _MODELS.extend(models)


def install(app: FastAPI, settings: Settings) -> None:
    """Serve this document at the app's /openapi.json (and /docs) instead of FastAPI's."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    # Replaced: 422 bodies, and the request body that every route below takes its own view of.
    for unused in ("HTTPValidationError", "ValidationError", "GenerationRequest"):
        schemas.pop(unused, None)
    schemas.update(_component_schemas(settings))
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            # Bad input is a 400 everywhere (api._validation_error); FastAPI's 422 never goes out.
            operation["responses"].pop("422", None)
            if (method, path) in OPERATIONS:
                _describe(operation, OPERATIONS[(method, path)])
    return doc


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _describe(operation: dict[str, Any], spec: Operation) -> None:
    responses = {str(status): _response(answer) for status, answer in spec.answers.items()}
    media_type, error_model = _ERROR_BODIES[spec.errors_as]
    for status in spec.errors:
        error = Answer(spec.why.get(status, _WHY[status]), error_model, _HEADERS.get(status, {}))
        responses[str(status)] = _response(error, media_type)
    operation["responses"] = responses
    if spec.request is not None:
        body = {"schema": _ref(_REQUEST_SCHEMAS[spec.request]), "example": _EXAMPLES[spec.request]}
        operation["requestBody"] = {"required": True, "content": {"application/json": body}}


def _response(answer: Answer, media_type: str = "application/json") -> dict[str, Any]:
    if answer.model is None:
        content = {"text/plain": {"schema": {"type": "string"}}}
    else:
        content = {media_type: {"schema": _ref(answer.model.__name__)}}
    content.update(answer.also)
    response: dict[str, Any] = {"description": answer.why, "content": content}
    if answer.headers:
        response["headers"] = {
            name: {"description": text, "required": True, "schema": {"type": "string"}}
            for name, text in answer.headers.items()
        }
    return response


def _component_schemas(settings: Settings) -> dict[str, Any]:
    _, top = models_json_schema(
        [(model, "serialization") for model in _MODELS] + [(GenerationRequest, "validation")],
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = top["$defs"]
    base = schemas.pop("GenerationRequest")
    for api, name in _REQUEST_SCHEMAS.items():
        schemas[name] = _request_schema(base, api, settings)
    return schemas


def _request_schema(base: dict[str, Any], api: Api, settings: Settings) -> dict[str, Any]:
    """GenerationRequest as one route takes it, with the limits `requests.validate` applies."""
    schema = copy.deepcopy(base)
    schema["title"] = _REQUEST_SCHEMAS[api]
    tokens = {"type": "integer", "minimum": 1, "maximum": settings.max_tokens_limit}
    stop = {"type": "string", "minLength": 1, "maxLength": settings.request_stop_chars_max}
    properties = schema["properties"]
    message = _non_null(properties["messages"])["items"]
    properties.update(
        model={"enum": [settings.model, None], "description": "The one model served here."},
        # Not also pattern _SOME_TEXT: with a maxLength that slows generating examples 10-fold.
        prompt={
            "type": "string",
            "minLength": 1,
            "maxLength": settings.max_prompt_chars,
            "description": "Text to complete; not only whitespace.",
        },
        messages={
            "type": "array",
            "items": message,
            "maxItems": settings.request_messages_max,
            "contains": {"properties": {"content": {"pattern": _SOME_TEXT}}},
        },
        max_tokens={"anyOf": [tokens, {"type": "null"}]},
        max_completion_tokens={
            "anyOf": [tokens, {"type": "null"}],
            "description": "The newer name of max_tokens; send one of the two.",
        },
        stop={
            "anyOf": [
                stop,
                {"type": "array", "items": stop, "maxItems": settings.request_stop_sequences_max},
                {"type": "null"},
            ]
        },
        n={"const": 1, "description": "Only one choice per request is supported."},
        stream={
            "type": "boolean",
            "description": "Answer as server-sent events (OpenAI's chunks) as tokens come.",
        }
        if api != "jobs"
        else {"const": False, "description": "A job is followed at /v1/jobs/{id}."},
    )
    # stream_options only with stream: true.
    only_streamed = {
        "anyOf": [
            {"not": {"required": ["stream_options"]}},
            {"properties": {"stream_options": {"type": "null"}}},
            {"required": ["stream"], "properties": {"stream": {"const": True}}},
        ]
    }
    one_token_budget = {"not": {"required": ["max_tokens", "max_completion_tokens"]}}
    if api == "chat":
        del properties["prompt"]
        schema["required"] = ["messages"]
        schema["allOf"] = [one_token_budget, only_streamed]
    elif api == "completions":
        del properties["messages"]
        schema["required"] = ["prompt"]
        schema["allOf"] = [one_token_budget, only_streamed]
    else:
        # Exactly one of prompt or messages, and a token budget under one of its names.
        schema["allOf"] = [
            only_streamed,
            {"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]},
            {
                "oneOf": [
                    {"required": ["max_tokens"], "properties": {"max_tokens": tokens}},
                    {
                        "required": ["max_completion_tokens"],
                        "properties": {"max_completion_tokens": tokens},
                    },
                ]
            },
        ]
    return schema


def _non_null(schema: dict[str, Any]) -> dict[str, Any]:
    """The non-null branch of an optional field's schema (`X | None` is anyOf [X, null])."""
    return next(branch for branch in schema.get("anyOf", [schema]) if branch != {"type": "null"})
