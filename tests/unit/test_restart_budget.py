import pytest

from tokenmill.cli import SERVICES, STOP_ORDER, RestartBudget, parser, process_names, service_of


def test_restarts_past_the_budget_in_a_minute_stop_up_naming_the_culprit():
    budget = RestartBudget(per_minute_max=3)
    for _ in range(3):
        budget.spend("redis", -9)
    with pytest.raises(SystemExit, match=r"redis keeps exiting \(code -9\)"):
        budget.spend("redis", -9)


def test_restarts_older_than_a_minute_no_longer_count():
    budget = RestartBudget(per_minute_max=1)
    budget.spend("worker", 1)
    budget.times_s["worker"] = [t - 61 for t in budget.times_s["worker"]]
    budget.spend("worker", 1)


def test_each_process_has_its_own_budget():
    budget = RestartBudget(per_minute_max=1)
    for name in ("worker", "ledger", "inspector", "redis", "postgres"):
        budget.spend(name, -9)
    with pytest.raises(SystemExit, match="ledger keeps exiting"):
        budget.spend("ledger", -9)


def test_every_service_is_stopped_once_intake_first_and_the_worker_before_consumers():
    stopped = [name for step in STOP_ORDER for name in step]
    assert sorted(stopped) == sorted(SERVICES)
    assert stopped[:2] == ["intake", "worker"]


def test_up_with_n_workers_runs_the_worker_n_times_each_process_with_its_own_budget():
    names = process_names(3)
    assert [n for n in names if service_of(n) == "worker"] == ["worker-1", "worker-2", "worker-3"]
    assert sorted({service_of(n) for n in names}) == sorted(SERVICES)
    assert process_names(1) == list(SERVICES)
    budget = RestartBudget(per_minute_max=1)
    budget.spend("worker-1", -9)
    budget.spend("worker-2", -9)


def test_workers_must_be_a_count_from_one(capsys):
    for bad in ("0", "-1", "two", "65"):
        with pytest.raises(SystemExit):
            parser().parse_args(["up", "--workers", bad])
        assert "--workers: must be a whole number from 1 to 64" in capsys.readouterr().err
    assert parser().parse_args(["up", "--workers", "4"]).workers == 4
