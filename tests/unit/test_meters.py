"""Each meter against synthetic readings: no GPU, no RAPL, no load on the host needed."""

from decimal import Decimal
from pathlib import Path

import pytest

from tokenmill.meters import ModelledCpuMeter, NvmlMeter, RaplMeter, ScriptedMeter, create_meter
from tokenmill.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


# --- the scripted meter ---


def test_scripted_meter_integrates_its_trace_piecewise():
    clock = Clock()
    meter = ScriptedMeter([(0.0, 100.0), (2.0, 50.0), (4.0, 0.0)], clock=clock, device="cuda:0")
    readings = []
    for t in (0.0, 1.0, 2.0, 3.0, 4.0, 10.0):
        clock.now_s = t
        readings.append(meter.energy_j())
    assert readings == [0, 100, 200, 250, 300, 300]
    assert meter.device == "cuda:0" and meter.power_w(3.0) == 50.0


def test_scripted_meter_holds_the_first_power_before_its_first_point():
    clock = Clock()
    meter = ScriptedMeter([(1.0, 10.0), (2.0, 20.0)], clock=clock)
    clock.now_s = 3.0
    assert meter.energy_j() == 10 + 10 + 20


def test_scripted_meter_refuses_a_trace_out_of_order_or_negative():
    with pytest.raises(AssertionError):
        ScriptedMeter([(2.0, 1.0), (1.0, 1.0)])
    with pytest.raises(AssertionError):
        ScriptedMeter([(0.0, -1.0)])


# --- NVML, through a fake module ---


class FakeNvml:
    class NVMLError(Exception):
        pass

    def __init__(self, counter_mj: int | None = 0, power_mw: int = 100_000):
        self.counter_mj = counter_mj
        self.power_mw = power_mw

    def nvmlDeviceGetHandleByIndex(self, index):  # noqa: N802 - pynvml's name
        return index

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):  # noqa: N802
        if self.counter_mj is None:
            raise self.NVMLError("not supported")
        return self.counter_mj

    def nvmlDeviceGetPowerUsage(self, handle):  # noqa: N802
        return self.power_mw


def nvml_meter(fake: FakeNvml, clock: Clock) -> NvmlMeter:
    return NvmlMeter(1, nvml=fake, clock=clock, tick_window_s=0.2)


def test_nvml_counts_the_counter_delta():
    fake, clock = FakeNvml(counter_mj=5_000_000), Clock()
    meter = nvml_meter(fake, clock)
    fake.counter_mj += 1500
    clock.now_s = 0.05
    assert meter.energy_j() == Decimal("1.5")
    assert meter.name == "nvml" and meter.device == "cuda:1" and not meter.estimated


def test_nvml_integrates_power_while_the_counter_does_not_tick_then_defers_to_it():
    fake, clock = FakeNvml(counter_mj=0, power_mw=100_000), Clock()
    meter = nvml_meter(fake, clock)
    clock.now_s = 0.1  # Within the tick window: no tick yet is normal, nothing is guessed.
    assert meter.energy_j() == 0
    clock.now_s = 0.5  # Stalled past the window: 100 W x 0.5 s since the last tick.
    assert meter.energy_j() == 50
    fake.counter_mj = 60_000  # It ticks: 60 J, which replaces the 50 J estimate.
    clock.now_s = 0.6
    assert meter.energy_j() == 60


def test_nvml_never_reports_less_when_the_counter_comes_in_under_the_estimate():
    fake, clock = FakeNvml(counter_mj=0, power_mw=100_000), Clock()
    meter = nvml_meter(fake, clock)
    clock.now_s = 1.0
    assert meter.energy_j() == 100
    fake.counter_mj = 80_000
    clock.now_s = 1.1
    assert meter.energy_j() == 100, "the total holds until the counter catches up"
    fake.counter_mj = 130_000
    clock.now_s = 1.15
    assert meter.energy_j() == 130


def test_nvml_survives_a_counter_reset():
    fake, clock = FakeNvml(counter_mj=9_000_000), Clock()
    meter = nvml_meter(fake, clock)
    fake.counter_mj = 9_002_000
    clock.now_s = 0.05
    assert meter.energy_j() == 2
    fake.counter_mj = 500  # Driver reloaded: the counter restarted from zero.
    clock.now_s = 0.1
    assert meter.energy_j() == Decimal("2.5")


def test_nvml_without_a_counter_integrates_power():
    fake, clock = FakeNvml(counter_mj=None, power_mw=250_000), Clock()
    meter = nvml_meter(fake, clock)
    assert meter.name == "nvml-power"
    clock.now_s = 2.0
    assert meter.energy_j() == 500
    fake.power_mw = 100_000
    clock.now_s = 3.0
    assert meter.energy_j() == 600


# --- RAPL, from a fake sysfs tree ---


def rapl_tree(root: Path, packages: dict[int, tuple[int, int]]) -> None:
    for index, (energy_uj, range_uj) in packages.items():
        zone = root / f"intel-rapl:{index}"
        zone.mkdir(parents=True, exist_ok=True)
        (zone / "energy_uj").write_text(f"{energy_uj}\n")
        (zone / "max_energy_range_uj").write_text(f"{range_uj}\n")
        sub = zone / f"intel-rapl:{index}:0"  # A core subzone: counted inside its package.
        sub.mkdir(exist_ok=True)
        (sub / "energy_uj").write_text("123\n")


def test_rapl_sums_its_packages_and_skips_subzones(tmp_path):
    rapl_tree(tmp_path, {0: (1_000_000, 10**9), 1: (0, 10**9)})
    meter = RaplMeter(tmp_path)
    rapl_tree(tmp_path, {0: (3_000_000, 10**9), 1: (500_000, 10**9)})
    assert meter.energy_j() == Decimal("2.5")
    assert meter.name == "rapl" and not meter.estimated


def test_rapl_handles_wrap_around_at_its_max_range(tmp_path):
    rapl_tree(tmp_path, {0: (999_000_000, 999_999_999)})
    meter = RaplMeter(tmp_path)
    rapl_tree(tmp_path, {0: (1_000_000, 999_999_999)})  # Wrapped past 999_999_999 to 0.
    assert meter.energy_j() == 2  # 999_999 µJ to the top, 1 to wrap, 1_000_000 after.


def test_rapl_refuses_a_tree_without_a_readable_package(tmp_path):
    with pytest.raises(OSError, match="no readable RAPL"):
        RaplMeter(tmp_path)


# --- the modelled CPU meter ---


def test_modelled_meter_charges_this_process_cpu_time_not_the_host_load():
    clock, cpu = Clock(), {"s": 0.0}
    meter = ModelledCpuMeter(tdp_w=65.0, idle_w=10.0, cpu_s=lambda: cpu["s"], clock=clock, cpus=2)
    clock.now_s = 1.0  # Our process idle for a second (whatever else the host runs): idle power.
    assert meter.energy_j() == 10
    clock.now_s, cpu["s"] = 2.0, 1.0  # One of two cores busy for a second: half utilisation.
    assert meter.energy_j() == 10 + 10 + 55 / 2
    assert meter.utilisation == 0.5 and meter.estimated


def test_modelled_meter_counts_up_with_real_cpu_time():
    meter = ModelledCpuMeter(tdp_w=65.0, idle_w=10.0)
    first = meter.energy_j()
    sum(i * i for i in range(300_000))
    assert meter.energy_j() >= first


def test_modelled_meter_refuses_idle_above_tdp():
    with pytest.raises(AssertionError):
        ModelledCpuMeter(tdp_w=10.0, idle_w=20.0)


def test_create_meter_picks_by_settings_and_device(tmp_path):
    no_rapl = {"rapl_root": str(tmp_path / "none")}
    assert create_meter(Settings.from_env({}, **no_rapl), "cpu").name == "modelled-cpu"
    host = create_meter(Settings.from_env({}, **no_rapl), "cpu", scope="host")
    assert host.name == "modelled-cpu-host" and host.estimated
    assert create_meter(Settings.from_env({}, meter="scripted:2"), "cpu").name == "scripted"
    rapl_tree(tmp_path / "rapl", {0: (0, 10**9)})
    with_rapl = Settings.from_env({}, rapl_root=str(tmp_path / "rapl"))
    assert create_meter(with_rapl, "cpu").name == "rapl"
    with pytest.raises(ValueError, match="unknown meter"):
        create_meter(Settings.from_env({}, meter="sundial"), "cpu")
