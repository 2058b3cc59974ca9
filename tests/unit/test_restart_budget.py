import pytest

from tokenmill.cli import SERVICES, STOP_ORDER, RestartBudget


def test_restarts_past_the_budget_in_a_minute_stop_up_naming_the_culprit():
    budget = RestartBudget(per_minute_max=3)
    for _ in range(3):
        budget.spend("redis", -9)
    with pytest.raises(SystemExit, match=r"redis keeps exiting \(code -9\)"):
        budget.spend("redis", -9)


def test_restarts_older_than_a_minute_no_longer_count():
    budget = RestartBudget(per_minute_max=1)
    budget.spend("worker", 1)
    budget.times_s = [t - 61 for t in budget.times_s]
    budget.spend("worker", 1)


def test_every_service_is_stopped_once_intake_first_and_the_worker_before_consumers():
    stopped = [name for step in STOP_ORDER for name in step]
    assert sorted(stopped) == sorted(SERVICES)
    assert stopped[:2] == ["intake", "worker"]
