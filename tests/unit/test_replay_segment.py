"""How a replay's fold groups the log's events into segments: completions keep their log order,
and other events go around them as the order that matters allows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.integration.test_journal import completion, prepaid_added, verdict
from tokenmill.ledger import refold
from tokenmill.ledger.refold import Document, Segment


def test_a_verdict_goes_before_the_completions_unless_its_completion_came_first() -> None:
    segment = Segment()
    first, second = completion("cus_a"), completion("cus_a")
    early = verdict(second)  # Judged before the ledger saw the completion.
    segment.add(first)
    segment.add(early)
    segment.add(second)
    late = verdict(first)
    segment.add(late)
    assert segment.completions == [first, second]
    assert segment.before == [early]
    assert segment.after == [late]
    assert segment.events == 4


def test_a_prepaid_top_up_after_a_completion_starts_a_new_segment() -> None:
    segment = Segment()
    top_up = prepaid_added("cus_a", "1.00")
    assert segment.takes(top_up)
    segment.add(top_up)
    segment.add(completion("cus_b"))
    assert not segment.takes(prepaid_added("cus_a", "2.00"))
    assert segment.takes(verdict(completion("cus_a")))


def test_a_segment_is_bounded() -> None:
    segment = Segment()
    for _ in range(refold.SEGMENT_EVENTS_MAX):
        segment.add(completion("cus_a"))
    assert not segment.takes(completion("cus_a"))
    with pytest.raises(AssertionError):
        segment.add(completion("cus_a"))


def test_documents_issued_in_one_transaction_are_one_group() -> None:
    at = datetime(2026, 11, 1, tzinfo=UTC)

    def doc(number: str, when: datetime, kind: str = "invoice") -> Document:
        return Document(when, number, kind, f"cus_{number}", None, "USD")

    docs = [doc("1", at), doc("2", at), doc("3", at, "credit_note"), doc("4", at + timedelta(1))]
    groups = refold.document_groups(docs)
    assert [[d.number for d in group] for group in groups] == [["1", "2"], ["3"], ["4"]]
