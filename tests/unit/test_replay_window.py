"""The replay's window: bad input is refused with a message naming the flag, before anything
is connected to; balances are compared over the whole UTC days the window touches."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tokenmill.ledger.replay import ReplayInputError, Window

NOW = datetime(2026, 12, 2, 4, 0, tzinfo=UTC)


def test_a_window_defaults_to_now_and_reads_dates_as_utc() -> None:
    window = Window.parse("2026-10-01", None, NOW)
    assert window == Window(datetime(2026, 10, 1, tzinfo=UTC), NOW)


@pytest.mark.parametrize(
    ("time_from", "time_to", "message"),
    [
        ("yesterday", None, "--from 'yesterday' is not an ISO 8601 date or time"),
        ("2026-10-01", "2026-13-01", "--to '2026-13-01' is not an ISO 8601 date or time"),
        ("2026-11-01", "2026-10-01", "must be later than --from"),
        ("2026-11-01", "2026-11-01", "must be later than --from"),
        ("2027-01-01", None, "must be later than --from"),
    ],
)
def test_bad_windows_are_refused(time_from: str, time_to: str | None, message: str) -> None:
    with pytest.raises(ReplayInputError, match=message):
        Window.parse(time_from, time_to, NOW)


def test_balances_cover_the_whole_days_the_window_touches() -> None:
    window = Window.parse("2026-10-01T06:00:00+02:00", "2026-10-03T00:00:00Z", NOW)
    assert window.first_day == datetime(2026, 10, 1, tzinfo=UTC)
    assert window.last_day_end == datetime(2026, 10, 3, tzinfo=UTC)
    late = Window.parse("2026-10-01", "2026-10-03T00:00:01Z", NOW)
    assert late.last_day_end == datetime(2026, 10, 4, tzinfo=UTC)
