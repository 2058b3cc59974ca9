from datetime import UTC, datetime
from decimal import Decimal

import pytest
from pydantic import ValidationError

from tokenmill.events import EnergyReading, JobCompleted, JobStarted, canonical_json, parse_event


def completed(**overrides) -> JobCompleted:
    fields = dict(
        producer="worker",
        customer_id="cus_1",
        request_id="job_1",
        region="eu-west",
        tier="standard",
        submitted_at=datetime(2026, 11, 1, tzinfo=UTC),
        worker="w",
        model="m",
        device="cpu",
        max_tokens=8,
        text="hi",
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=1,
        queue_ms=1.0,
        ttft_ms=2.0,
        generation_ms=3.0,
        e2e_ms=4.0,
        compute_s=Decimal("0.003"),
        energy=EnergyReading(energy_j=Decimal("0.123456"), meter="scripted", estimated=True),
    )
    return JobCompleted(**{**fields, **overrides})


def test_event_round_trips_through_canonical_json_exactly():
    event = completed()
    again = parse_event(event.canonical_json())
    assert again == event
    assert again.energy.energy_j == Decimal("0.123456")
    assert again.canonical_json() == event.canonical_json()


def test_canonical_json_sorts_keys_without_spaces():
    text = completed().canonical_json()
    assert ": " not in text and ", " not in text
    assert text.index('"compute_s"') < text.index('"customer_id"') < text.index('"energy"')


def test_event_ids_are_minted_once_and_unique():
    a, b = completed(), completed()
    assert a.event_id != b.event_id
    assert parse_event(a.canonical_json()).event_id == a.event_id


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b'{"type": "job.unknown"}', b'{"type": "job.started", "request_id": 1}'],
)
def test_malformed_events_are_refused(raw):
    with pytest.raises((ValidationError, ValueError)):
        parse_event(raw)


def test_events_are_immutable():
    event = JobStarted(
        producer="w", customer_id="c", request_id="r", region="x", worker="w", queue_ms=0
    )
    with pytest.raises(ValidationError):
        event.worker = "other"


def test_an_event_from_a_newer_producer_is_read_with_its_unknown_fields_kept():
    sent = completed().model_dump(mode="json")
    sent["carbon_g"] = "1.5"
    sent["energy"]["meter_serial"] = "A-1"
    body = canonical_json(sent)
    event = parse_event(body)
    assert isinstance(event, JobCompleted) and event.energy.energy_j == Decimal("0.123456")
    assert event.canonical_json() == body


def test_constructing_an_event_with_an_unknown_field_still_fails():
    with pytest.raises(ValidationError, match="extra"):
        completed(carbon_g="1.5")
