"""The event contract between services: every message on every stream is one of these.

Events are immutable. `event_id` is a ULID minted once by the producer, so a redelivered or
re-published event keeps its identity and every consumer can deduplicate on it. A change that
would break an old reader bumps `schema_version` and keeps the old shape readable.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from ulid import ULID

Tier = Literal["free", "standard", "premium"]
TIERS: tuple[Tier, ...] = ("free", "standard", "premium")


def new_id() -> str:
    return str(ULID())


def utc_now() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str
    event_id: str = Field(default_factory=new_id)
    schema_version: int = 1
    occurred_at: datetime = Field(default_factory=utc_now)
    producer: str
    customer_id: str
    request_id: str
    region: str

    def canonical_json(self) -> str:
        """Sorted keys, no spaces: the exact text that gets signed, hashed and stored.

        Fields a newer producer added (kept by `parse_event`) are part of it: the ledger logs
        this text, so its log holds what the producer sent, not what this version understood,
        and a later version replaying the log finds every field.
        """
        return canonical_json(_json_with_extras(self))

    def envelope_for(self, producer: str) -> dict[str, str]:
        """The envelope of an event this one causes: same customer, request and region."""
        return {
            "producer": producer,
            "customer_id": self.customer_id,
            "request_id": self.request_id,
            "region": self.region,
        }


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class JobSubmitted(Event):
    """Intake accepted a job; it is recorded and will be run exactly once to completion."""

    type: Literal["job.submitted"] = "job.submitted"
    tier: Tier
    model: str
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Sample only among the k most likely tokens; None keeps them all.
    top_k: int | None = None


class JobStarted(Event):
    type: Literal["job.started"] = "job.started"
    worker: str
    queue_ms: float


class EnergyReading(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    energy_j: Decimal
    meter: str
    estimated: bool
    # energy_j over the request's prompt and completion tokens (None from older workers).
    joules_per_token: Decimal | None = None


class JobCompleted(Event):
    """A worker finished a job. Carries everything the books and the inspector need."""

    type: Literal["job.completed"] = "job.completed"
    tier: Tier
    submitted_at: datetime
    worker: str
    model: str
    device: str
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    max_tokens: int
    text: str
    # "cancelled": stopped by its customer (or a client that hung up) after its first token;
    # billed for the tokens it made.
    finish_reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int
    completion_tokens: int
    # Of prompt_tokens, how many came from the engine's prefix cache (OpenAI's
    # usage.prompt_tokens_details.cached_tokens); billed at the cached-input price.
    cached_prompt_tokens: int = 0
    queue_ms: float
    ttft_ms: float
    generation_ms: float
    e2e_ms: float
    compute_s: Decimal
    energy: EnergyReading
    # Mean time between output tokens after the first (vLLM's TPOT); None for one token.
    tpot_ms: float | None = None
    # Times the batching engine preempted the request (its KV freed, recomputed on resume).
    preemptions: int = 0
    # The tokens the request had in each engine step it took part in (a prompt chunk counts its
    # tokens, a decode one), in step order and run-length encoded as (tokens, steps): a 300-token
    # prompt in chunks of 256 and 44, then 40 decodes, is ((256, 1), (44, 1), (1, 40)). Each
    # step's joules were split by these. At most STEP_TOKEN_RUNS_MAX runs: a request past that
    # (prompt chunks that kept changing size, many preemptions) ends with (0, n), n further steps
    # not itemized; 0 is never a real count, since a request in a step has at least one token.
    step_tokens: tuple[tuple[int, int], ...] = ()


STEP_TOKEN_RUNS_MAX = 64


class JobFailed(Event):
    """A job that cannot succeed (bad prompt for this model, for example). Never billed."""

    type: Literal["job.failed"] = "job.failed"
    worker: str
    reason: str


class QualitySignal(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    severity: Literal["ok", "warn", "defect"]
    detail: str = ""


class QualityVerdict(Event):
    type: Literal["quality.verdict"] = "quality.verdict"
    completion_event_id: str
    verdict: Literal["pass", "warn", "defective"]
    signals: tuple[QualitySignal, ...]


class PowerSample(Event):
    """Energy a meter measured over one window. Not tied to a request: `request_id` is empty."""

    type: Literal["power.sample"] = "power.sample"
    meter: str
    device: str
    estimated: bool
    window_start: datetime
    window_end: datetime
    energy_j: Decimal
    power_w: Decimal
    # The highest power between two of the window's readings (None from older telemetry).
    power_w_max: Decimal | None = None
    # The machine the meter is on: every GPU host has a "cuda:0" (empty from older telemetry).
    host: str = ""


class PrepaidCreditAdded(Event):
    """An operator topped up a customer's prepaid credit. Not tied to a request: `request_id`
    is empty. Intake raises the customer's admission balance in the same transaction that
    queues this event; the ledger posts it to the journal."""

    type: Literal["credit.prepaid_added"] = "credit.prepaid_added"
    amount: Decimal = Field(gt=0)
    currency: str
    reference: str = ""


class UsageBooked(Event):
    """The ledger booked a request: its cost and revenue are final for this price version."""

    type: Literal["usage.booked"] = "usage.booked"
    tier: Tier
    prompt_tokens: int
    completion_tokens: int
    energy_j: Decimal
    cost: Decimal
    revenue: Decimal
    currency: str
    price_version: str
    # The completion booked: the request's canonical one, whose output the customer is shown
    # and whose verdict counts. None only in bookings made before the field existed.
    completion_event_id: str | None = None


class EnergyInterval(Event):
    """A worker's energy account over one interval, per device: what its meter counted
    (metered_j) is what engine steps used (attributed_j, split across their requests) plus
    what it used between steps (idle_j). unbilled_j is attributed joules, of this interval or
    an earlier one, that will reach no completion (a request cancelled or given back in this
    interval). The ledger books idle_j + unbilled_j as factory overhead."""

    type: Literal["energy.interval"] = "energy.interval"
    worker: str
    meter: str
    device: str
    estimated: bool
    interval_start: datetime
    interval_end: datetime
    metered_j: Decimal = Field(ge=0)
    attributed_j: Decimal = Field(ge=0)
    idle_j: Decimal = Field(ge=0)
    unbilled_j: Decimal = Field(ge=0)
    tokens: int = Field(ge=0)
    steps: int = Field(ge=0)


class PowerCapSet(Event):
    """An operator (admin API, CLI) or a grid signal set the facility's power budget, or
    cleared it (`cap_w` None). Not tied to a request: `request_id` is empty. The newest one
    (by event id, a time-ordered ULID) is the cap in force."""

    type: Literal["power.cap_set"] = "power.cap_set"
    cap_w: Decimal | None = Field(default=None, gt=0)
    # Who set it: "admin-api", "cli", or "grid:<name>" for a grid operator's signal.
    source: str = Field(min_length=1, max_length=200)
    reason: str = Field(default="", max_length=500)


class CurtailmentChanged(Event):
    """The power controller moved the curtailment level: how many tiers, in curtailment order
    (free, standard, premium), are shed. Not tied to a request: `request_id` is empty."""

    type: Literal["power.curtailment"] = "power.curtailment"
    level: int = Field(ge=0, le=len(TIERS))
    previous_level: int = Field(ge=0, le=len(TIERS))
    shed_tiers: tuple[Tier, ...]
    # The smoothed facility power the decision saw; None when no meter reported in the window.
    measured_w: Decimal | None
    cap_w: Decimal | None
    reason: str


class SloPolicySet(Event):
    """The latency objectives a ledger process books completions under from now on, logged by
    the ledger itself (not published) when it starts with a policy other than the last one
    logged, so that a replay of the log credits each completion as it was credited live. Not
    tied to a customer or request: both are empty."""

    type: Literal["ledger.slo_policy"] = "ledger.slo_policy"
    # Per tier: the time-to-first-token objective (ms; 0 = none), the share of the charge
    # credited when a completion misses it.
    ttft_ms_max: dict[str, float]
    credit_share: dict[str, Decimal]


AnyEvent = Annotated[
    JobSubmitted
    | JobStarted
    | JobCompleted
    | JobFailed
    | QualityVerdict
    | PowerSample
    | PrepaidCreditAdded
    | UsageBooked
    | EnergyInterval
    | PowerCapSet
    | CurtailmentChanged
    | SloPolicySet,
    Field(discriminator="type"),
]
_any_event = TypeAdapter(AnyEvent)


def parse_event(raw: bytes | str | dict[str, Any]) -> Event:
    """Decode an event as a consumer reads it; raises `pydantic.ValidationError` or `ValueError`
    on malformed input.

    Fields this version does not know are accepted and kept, at every level: during a rolling
    upgrade a newer producer's event must reach older consumers, not their dead letters.
    Constructing an event stays strict (`extra="forbid"`), so our own producers and tests
    cannot misspell a field.
    """
    if isinstance(raw, dict):
        return _any_event.validate_python(raw, extra="allow")
    return _any_event.validate_json(raw, extra="allow")


def _json_with_extras(model: BaseModel) -> dict[str, Any]:
    """`model` as JSON values with its unknown fields: pydantic does not serialize the extras
    of a model whose class forbids them."""
    dumped = model.model_dump(mode="json")
    dumped.update(model.__pydantic_extra__ or {})
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            dumped[name] = _json_with_extras(value)
        elif isinstance(value, tuple) and any(isinstance(item, BaseModel) for item in value):
            dumped[name] = [_json_with_extras(item) for item in value]
    return dumped


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
