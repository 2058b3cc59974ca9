"""The power controller's pure logic: the facility's smoothed power from meters' samples, and
the curtailment level it decides (one tier at a time, hysteresis, dwell), and the cap's bounds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from tokenmill.events import PowerSample
from tokenmill.powercap import LEVEL_MAX, NO_CURTAILMENT, CapError, Level, parse_cap_w, shed_tiers
from tokenmill.telemetry.control import Policy, decide, facility_power_w

POLICY = Policy(release_share=Decimal("0.9"), dwell_s=10.0, release_dwell_s=20.0)
CAP_W = Decimal(1000)
T0 = datetime(2026, 12, 1, tzinfo=UTC)


def sample(
    power_w: float, seconds: float = 1.0, device: str = "cpu", start_s: float = 0, host: str = ""
):
    start = T0 + timedelta(seconds=start_s)
    energy_j = Decimal(str(power_w)) * Decimal(str(seconds))
    return PowerSample(
        producer="telemetry",
        customer_id="",
        request_id="",
        region="eu-west",
        meter="scripted",
        device=device,
        estimated=True,
        window_start=start,
        window_end=start + timedelta(seconds=seconds),
        energy_j=energy_j,
        power_w=Decimal(str(power_w)),
        host=host,
    )


def test_each_meter_is_averaged_over_its_windows_and_the_meters_are_summed():
    samples = [
        sample(100, 1, "cuda:0"),
        sample(300, 3, "cuda:0", 1),  # 1000 J over 4 s: 250 W.
        sample(40, 2, "cpu"),
    ]
    assert facility_power_w(samples) == Decimal("290.000")


def test_two_hosts_devices_of_one_name_are_two_meters():
    samples = [sample(500, 1, "cuda:0", host="gpu-a"), sample(700, 1, "cuda:0", host="gpu-b")]
    assert facility_power_w(samples) == Decimal("1200.000")
    # One host's windows of one device are still one meter's, averaged.
    again = [*samples, sample(300, 1, "cuda:0", 1, host="gpu-a")]
    assert facility_power_w(again) == Decimal("1100.000")


def test_no_samples_is_no_measurement_not_zero_watts():
    assert facility_power_w([]) is None
    assert facility_power_w([sample(100, 0)]) is None


def walk(trace_w, now_s=100.0, step_s=1.0, level=NO_CURTAILMENT, cap_w=CAP_W):
    """Feed `decide` one measurement per step; the level after each."""
    levels = []
    for measured_w in trace_w:
        level = decide(level, Decimal(measured_w), cap_w, now_s, POLICY)
        levels.append(level.level)
        now_s += step_s
    return levels


def test_over_the_cap_sheds_one_tier_per_dwell_free_first():
    levels = walk([1200] * 25)
    assert levels[0] == 1 and shed_tiers(1) == ("free",)
    # Dwell of 10 s between steps: standard after 10 s, premium after 20 s, and no further.
    assert levels[9] == 1 and levels[10] == 2 and shed_tiers(2) == ("free", "standard")
    assert levels[20] == LEVEL_MAX == 3 and levels[-1] == 3


def test_hysteresis_holds_the_level_between_the_release_line_and_the_cap():
    shed = Level(level=2, changed_at=-100.0)
    # 950 W: under the cap, over 90 % of it: nothing changes however long it lasts.
    assert walk([950] * 30, level=shed) == [2] * 30
    # Exactly at the cap is not over it.
    assert walk([1000] * 5, level=shed) == [2] * 5


def test_capacity_returns_one_tier_at_a_time_premium_first_slower_than_it_was_shed():
    shed = Level(level=3, changed_at=-100.0)
    levels = walk([500] * 45, level=shed)
    # The release dwell (20 s) is twice the shedding one: premium, standard, then free return.
    assert levels[0] == 2 and levels[19] == 2 and levels[20] == 1 and levels[40] == 0
    assert levels[-1] == 0


def test_a_trace_that_flickers_around_the_cap_does_not_flap():
    # Alternating 5 % over and 5 % under the cap every second for a minute.
    levels = walk([1050, 950] * 30)
    changes = sum(1 for a, b in zip(levels, levels[1:], strict=False) if a != b)
    assert changes <= 3  # Only escalations, each after a dwell; never back and forth.
    assert levels == sorted(levels)


def test_no_cap_or_no_measurement_lifts_curtailment_at_once():
    shed = Level(level=2, changed_at=0.0)
    assert decide(shed, Decimal(5000), None, 1.0, POLICY).level == 0
    lifted = decide(shed, None, CAP_W, 1.0, POLICY)
    assert lifted.level == 0 and "no power samples" in lifted.reason


def test_a_decision_keeps_when_its_level_last_changed():
    first = decide(NO_CURTAILMENT, Decimal(1200), CAP_W, 100.0, POLICY)
    held = decide(first, Decimal(1200), CAP_W, 105.0, POLICY)
    assert (first.changed_at, held.changed_at, held.decided_at) == (100.0, 100.0, 105.0)
    assert held.level == 1 and "letting the last step show" in held.reason


@pytest.mark.parametrize(
    "raw", ["-5", "0", "abc", "nan", "inf", "1e12", True, None, [], "0.0001", "  "]
)
def test_a_cap_that_is_no_power_budget_is_refused(raw):
    with pytest.raises(CapError):
        parse_cap_w(raw, 1e8)


def test_a_cap_is_kept_to_the_milliwatt():
    assert parse_cap_w("1500.5", 1e8) == Decimal("1500.500")
    assert parse_cap_w(2500, 1e8) == Decimal("2500.000")
