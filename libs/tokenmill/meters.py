"""Energy meters behind one interface: a cumulative joule counter per device, with its method.

Every meter answers `energy_j()`, the joules it has counted since it was created, as an exact
decimal that never decreases, and says how it counts (`name`) and whether that is a model
(`estimated`). Callers take differences: a step's energy is the counter after it minus the
counter before it; a telemetry sample is the difference over its window.

The hardware readers are injected (an NVML module-like object, a sysfs root, a CPU-time
function, a clock), so every meter is tested against synthetic readings without hardware.
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_right
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import psutil

from tokenmill.money import to_decimal
from tokenmill.settings import Settings

Clock = Callable[[], float]
# Joules are reported to the microjoule: finer than any meter here resolves.
_JOULE_PLACES = 6


class Meter(Protocol):
    name: str
    device: str
    estimated: bool

    def energy_j(self) -> Decimal: ...


def _joules(value: float) -> Decimal:
    return to_decimal(round(value, _JOULE_PLACES))


def process_cpu_s() -> float:
    """CPU seconds this process (and the children it waited for) has used, all threads: one
    times(2) call, cheap enough to read around every engine step."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def host_cpu_s() -> float:
    """CPU seconds every program on the host has used: what the host draws, not what we do."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


class ModelledCpuMeter:
    """Estimates the CPU energy of this process: idle power plus (TDP - idle) x utilisation,
    integrated over time, labelled estimated so the books never present a model as a
    measurement.

    Utilisation is this process's CPU time over the window divided by the wall time the host's
    cores offered (`cpu_s`, by default `process_cpu_s`), not the host's load: another program
    busy on the same host adds nothing to our requests. The telemetry service, which reports
    what the host draws (for the power cap), passes `host_cpu_s` instead and is named
    modelled-cpu-host. The idle power is the host's floor,
    which the factory pays for whether it serves or not, so it is counted (and, between
    engine steps, booked as idle energy). Used where no hardware counter can be read (RAPL is
    root-only or absent on most VMs)."""

    name = "modelled-cpu"
    device = "cpu"
    estimated = True

    def __init__(
        self,
        tdp_w: float,
        idle_w: float,
        cpu_s: Callable[[], float] = process_cpu_s,
        clock: Clock = time.monotonic,
        cpus: int | None = None,
    ):
        assert 0 <= idle_w <= tdp_w, (idle_w, tdp_w)
        if cpu_s is host_cpu_s:
            self.name = "modelled-cpu-host"
        self._tdp_w = tdp_w
        self._idle_w = idle_w
        self._cpu_s = cpu_s
        self._clock = clock
        self._cpus = cpus or psutil.cpu_count() or 1
        self._lock = threading.Lock()
        self._total_j = 0.0
        self._last_wall_s = clock()
        self._last_cpu_s = cpu_s()
        self.utilisation = 0.0

    def energy_j(self) -> Decimal:
        with self._lock:
            wall_s, cpu_s = self._clock(), self._cpu_s()
            elapsed_s = wall_s - self._last_wall_s
            if elapsed_s > 0:
                busy_s = max(0.0, cpu_s - self._last_cpu_s)
                self.utilisation = min(1.0, busy_s / (elapsed_s * self._cpus))
                power_w = self._idle_w + (self._tdp_w - self._idle_w) * self.utilisation
                self._total_j += power_w * elapsed_s
                self._last_wall_s, self._last_cpu_s = wall_s, cpu_s
            return _joules(self._total_j)


class NvmlMeter:
    """A GPU's total-energy counter (Volta and newer, millijoules), else its power x Δt.

    The counter ticks every 20-100 ms. While it has not ticked for `tick_window_s`, the power
    draw is integrated meanwhile (as Zeus does) so a short window is not read as zero; when it
    ticks again the counter's own delta replaces that estimate. The reported total never
    decreases: if the counter's delta comes in under the estimate, the total holds until the
    counter catches up. A counter that goes backwards (driver reload, reset) restarts from
    zero: its new value is the energy since the reset. `nvml` is the pynvml module or a fake
    with the same three functions and `NVMLError`."""

    estimated = False

    def __init__(
        self,
        index: int = 0,
        nvml: Any = None,
        clock: Clock = time.monotonic,
        tick_window_s: float = 0.2,
    ):
        if nvml is None:
            import pynvml as nvml  # Imported here: it exists only where the gpu extra is.

            nvml.nvmlInit()
        self._nvml = nvml
        self._handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self._clock = clock
        self._tick_window_s = tick_window_s
        self.device = f"cuda:{index}"
        self._lock = threading.Lock()
        self._last_mj = self._counter_mj()
        self.name = "nvml" if self._last_mj is not None else "nvml-power"
        self._counted_j = Decimal(0)
        self._estimate_j = 0.0
        self._reported_j = Decimal(0)
        self._last_tick_s = self._last_read_s = clock()

    def _counter_mj(self) -> int | None:
        try:
            return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except self._nvml.NVMLError:
            return None

    def _power_w(self) -> float:
        return self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0

    def energy_j(self) -> Decimal:
        with self._lock:
            now_s = self._clock()
            counter_mj = self._counter_mj() if self._last_mj is not None else None
            if counter_mj is None:
                self._estimate_j += self._power_w() * (now_s - self._last_read_s)
            elif counter_mj != self._last_mj:
                delta_mj = counter_mj - self._last_mj if counter_mj > self._last_mj else counter_mj
                self._counted_j += Decimal(delta_mj) / 1000
                self._last_mj, self._last_tick_s, self._estimate_j = counter_mj, now_s, 0.0
            elif now_s - self._last_tick_s > self._tick_window_s:
                self._estimate_j = self._power_w() * (now_s - self._last_tick_s)
            self._last_read_s = now_s
            self._reported_j = max(self._reported_j, self._counted_j + _joules(self._estimate_j))
            return self._reported_j


class RaplMeter:
    """The CPU packages' RAPL counters under /sys/class/powercap (Intel, and AMD's zones of the
    same names): `energy_uj` per package, summed. A counter wraps to zero past its
    `max_energy_range_uj`; a reading below the last one is taken as one wrap."""

    name = "rapl"
    device = "cpu"
    estimated = False

    def __init__(self, root: Path | str = "/sys/class/powercap"):
        self._zones = self.packages(Path(root))
        if not self._zones:
            raise OSError(f"no readable RAPL package under {root}")
        self._ranges_uj = [int((z / "max_energy_range_uj").read_text()) for z in self._zones]
        self._last_uj = [self._read_uj(z) for z in self._zones]
        self._total_uj = 0
        self._lock = threading.Lock()

    @staticmethod
    def packages(root: Path) -> list[Path]:
        """The package zones (`intel-rapl:N`, not their subzones) whose counter is readable."""
        readable = []
        for zone in sorted(root.glob("intel-rapl:*")):
            if zone.name.count(":") != 1:
                continue
            try:
                int((zone / "energy_uj").read_text())
                readable.append(zone)
            except (OSError, ValueError):  # Root-only since 2020 (CVE-2020-8694) on most hosts.
                continue
        return readable

    @staticmethod
    def _read_uj(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())

    def energy_j(self) -> Decimal:
        with self._lock:
            for i, zone in enumerate(self._zones):
                now_uj = self._read_uj(zone)
                delta_uj = now_uj - self._last_uj[i]
                if delta_uj < 0:
                    delta_uj += self._ranges_uj[i] + 1
                self._total_uj += delta_uj
                self._last_uj[i] = now_uj
            return Decimal(self._total_uj) / 1_000_000


class ScriptedMeter:
    """Replays a recorded power trace for tests: `trace` is [(t_s, watts), ...], t_s from the
    meter's creation, each power held until the next point (the first from t=0, the last for
    ever). Deterministic under an injected clock."""

    name = "scripted"
    estimated = True

    def __init__(
        self, trace: list[tuple[float, float]], clock: Clock = time.monotonic, device: str = "cpu"
    ):
        assert trace, "a trace has at least one point"
        assert all(w >= 0 for _, w in trace), "power is never negative"
        times = [t for t, _ in trace]
        assert times == sorted(times), "a trace is in time order"
        self.device = device
        self._clock = clock
        self._start_s = clock()
        self._times = [0.0, *times]
        self._watts = [trace[0][1], *(w for _, w in trace)]
        # Energy from 0 to each point, so a reading is one bisection.
        self._energy_at = [0.0]
        for i in range(1, len(self._times)):
            span_s = self._times[i] - self._times[i - 1]
            self._energy_at.append(self._energy_at[-1] + self._watts[i - 1] * max(0.0, span_s))
        self._lock = threading.Lock()
        self._reported_j = Decimal(0)

    def power_w(self, at_s: float | None = None) -> float:
        """The trace's power at `at_s` (default: now) since the meter's creation."""
        at_s = self._clock() - self._start_s if at_s is None else at_s
        return self._watts[max(0, bisect_right(self._times, at_s) - 1)]

    def energy_j(self) -> Decimal:
        with self._lock:
            at_s = max(0.0, self._clock() - self._start_s)
            i = max(0, bisect_right(self._times, at_s) - 1)
            total_j = self._energy_at[i] + self._watts[i] * (at_s - self._times[i])
            self._reported_j = max(self._reported_j, _joules(total_j))
            return self._reported_j


def create_meter(settings: Settings, device: str, scope: str = "process") -> Meter:
    """The meter named by settings. "auto" picks NVML on a CUDA device; on a CPU device RAPL
    where its counters are readable, else the CPU model; on an unknown device ("auto") NVML
    where a GPU answers, else as on a CPU. "scripted:W" is a constant W watts. `scope` says
    what the CPU model charges: this process ("process", the worker's attribution) or the
    whole host ("host", telemetry); the hardware counters measure their device either way."""
    assert scope in ("process", "host"), scope
    choice = settings.meter
    if choice == "auto" and device == "auto":
        try:
            return NvmlMeter(0)
        except Exception:  # No driver, no library or no GPU: this host meters its CPU.
            device = "cpu"
    if choice == "auto":
        if device.startswith("cuda"):
            choice = "nvml"
        else:
            choice = "rapl" if RaplMeter.packages(Path(settings.rapl_root)) else "modelled-cpu"
    if choice == "nvml":
        index = int(device.split(":")[1]) if ":" in device else 0
        return NvmlMeter(index)
    if choice == "rapl":
        return RaplMeter(settings.rapl_root)
    if choice == "modelled-cpu":
        cpu_s = process_cpu_s if scope == "process" else host_cpu_s
        return ModelledCpuMeter(settings.cpu_tdp_w, settings.cpu_idle_w, cpu_s=cpu_s)
    if choice.startswith("scripted:"):
        return ScriptedMeter([(0.0, float(choice.split(":", 1)[1]))])
    raise ValueError(
        f"unknown meter {settings.meter!r}: use auto, nvml, rapl, modelled-cpu or scripted:W"
    )
