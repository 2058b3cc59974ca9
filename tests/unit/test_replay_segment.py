"""How a replay groups the log's events into segments: completions keep their log order, other
events go around them as the order that matters allows, and customers are split into lanes."""

from __future__ import annotations

from decimal import Decimal

import pytest

from tests.integration.test_journal import completion, prepaid_added, verdict
from tokenmill.events import PowerSample, utc_now
from tokenmill.ledger import replay
from tokenmill.ledger.replay import Segment


def lane_of(segment: Segment, customer_id: str) -> replay.Lane:
    (lane,) = [lane for lane in segment.lanes if customer_id in _customers(lane)]
    return lane


def _customers(lane: replay.Lane) -> set[str]:
    return {e.customer_id for e in (*lane.before, *lane.completions, *lane.after)}


def test_a_verdict_goes_before_the_completions_unless_its_completion_came_first() -> None:
    segment = Segment(1)
    first, second = completion("cus_a"), completion("cus_a")
    early = verdict(second)  # Judged before the ledger saw the completion.
    segment.add(first)
    segment.add(early)
    segment.add(second)
    late = verdict(first)
    segment.add(late)
    (lane,) = segment.lanes
    assert lane.completions == [first, second]
    assert lane.before == [early]
    assert lane.after == [late]


def test_a_prepaid_top_up_after_a_completion_starts_a_new_segment() -> None:
    segment = Segment(2)
    top_up = prepaid_added("cus_a", "1.00")
    assert segment.takes(top_up)
    segment.add(top_up)
    segment.add(completion("cus_b"))
    assert not segment.takes(prepaid_added("cus_a", "2.00"))
    assert segment.takes(verdict(completion("cus_a")))


def test_a_segment_is_bounded() -> None:
    segment = Segment(1)
    for _ in range(replay.SEGMENT_EVENTS_MAX):
        segment.add(completion("cus_a"))
    assert not segment.takes(completion("cus_a"))
    with pytest.raises(AssertionError):
        segment.add(completion("cus_a"))


def test_each_customer_stays_in_one_lane_in_log_order() -> None:
    segment = Segment(2)
    done = [completion(f"cus_{i % 7}") for i in range(70)]
    for event in done:
        segment.add(event)
    sample = PowerSample(
        producer="test", customer_id="", request_id="", region="eu-west", meter="modelled",
        device="cpu", estimated=True, window_start=utc_now(), window_end=utc_now(),
        energy_j=Decimal(1), power_w=Decimal(1),
    )  # fmt: skip
    segment.add(sample)
    assert segment.events == 71
    for i in range(7):
        lane = lane_of(segment, f"cus_{i}")
        assert [e for e in lane.completions if e.customer_id == f"cus_{i}"] == done[i::7]
    assert sum(len(lane.completions) for lane in segment.lanes) == 70
    assert all(lane.completions for lane in segment.lanes), "7 customers over 2 lanes"
    assert sum(sample in lane.before for lane in segment.lanes) == 1
