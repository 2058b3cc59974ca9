from decimal import Decimal

import pytest

from tokenmill.meters import ModelledCpuMeter, ScriptedMeter, create_meter
from tokenmill.settings import Settings


def test_scripted_meter_counts_a_fixed_step_per_reading():
    meter = ScriptedMeter(Decimal("0.5"))
    assert [meter.energy_j() for _ in range(3)] == [Decimal("0.5"), Decimal("1.0"), Decimal("1.5")]


def test_modelled_cpu_meter_counts_up_between_idle_and_tdp_power():
    meter = ModelledCpuMeter(tdp_w=65.0, idle_w=10.0)
    first = meter.energy_j()
    sum(i * i for i in range(300_000))  # Some work, so utilisation is above zero.
    second = meter.energy_j()
    assert second >= first
    assert meter.estimated and meter.name == "modelled-cpu"


def test_create_meter_picks_by_settings_and_device():
    assert create_meter(Settings.from_env({}), "cpu").name == "modelled-cpu"
    assert create_meter(Settings.from_env({}, meter="scripted:2"), "cpu").energy_j() == 2
    with pytest.raises(ValueError, match="unknown meter"):
        create_meter(Settings.from_env({}, meter="sundial"), "cpu")


def test_modelled_meter_refuses_idle_above_tdp():
    with pytest.raises(AssertionError):
        ModelledCpuMeter(tdp_w=10.0, idle_w=20.0)
