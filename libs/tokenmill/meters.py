"""Energy meters behind one interface: a cumulative joule counter per device.

Every meter answers `energy_j()`, the joules it has counted since it was created, as an exact
decimal that never decreases. Callers take differences: a job's energy is the counter after it
minus the counter before it; a telemetry sample is the difference over its window.
"""

from __future__ import annotations

import threading
import time
from decimal import Decimal
from typing import Protocol

import psutil

from tokenmill.money import to_decimal
from tokenmill.settings import Settings


class Meter(Protocol):
    name: str
    device: str
    estimated: bool

    def energy_j(self) -> Decimal: ...


class ModelledCpuMeter:
    """Estimates CPU energy as idle power plus (TDP - idle) x utilisation, integrated over time.

    Used where no hardware counter can be read (RAPL is root-only or absent on most VMs), and
    labelled estimated so the books never present a model as a measurement.
    """

    name = "modelled-cpu"
    device = "cpu"
    estimated = True

    def __init__(self, tdp_w: float, idle_w: float):
        assert 0 <= idle_w <= tdp_w, (idle_w, tdp_w)
        self._tdp_w = tdp_w
        self._idle_w = idle_w
        self._cpus = psutil.cpu_count() or 1
        self._lock = threading.Lock()
        self._total_j = 0.0
        self._last_wall_s = time.monotonic()
        self._last_busy_s = self._busy_s()

    @staticmethod
    def _busy_s() -> float:
        times = psutil.cpu_times()
        return sum(times) - times.idle - getattr(times, "iowait", 0.0)

    def energy_j(self) -> Decimal:
        with self._lock:
            wall_s, busy_s = time.monotonic(), self._busy_s()
            elapsed_s = wall_s - self._last_wall_s
            if elapsed_s > 0:
                busy_delta_s = max(0.0, busy_s - self._last_busy_s)
                utilisation = min(1.0, busy_delta_s / (elapsed_s * self._cpus))
                power_w = self._idle_w + (self._tdp_w - self._idle_w) * utilisation
                self._total_j += power_w * elapsed_s
            self._last_wall_s, self._last_busy_s = wall_s, busy_s
            return to_decimal(round(self._total_j, 6))


class NvmlMeter:
    """Reads the GPU's total-energy counter (Volta and newer), else integrates its power draw."""

    name = "nvml"
    estimated = False

    def __init__(self, index: int = 0):
        import pynvml  # Imported here: the package exists only where the gpu extra is installed.

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.device = f"cuda:{index}"
        self._lock = threading.Lock()
        self._has_counter = self._try_counter_mj() is not None
        self._base_mj = self._try_counter_mj() or 0
        self._integrated_j = 0.0
        self._last_wall_s = time.monotonic()
        if not self._has_counter:
            self.name = "nvml-power"

    def _try_counter_mj(self) -> int | None:
        try:
            return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except self._nvml.NVMLError:
            return None

    def energy_j(self) -> Decimal:
        with self._lock:
            if self._has_counter:
                counter_mj = self._try_counter_mj()
                assert counter_mj is not None
                return Decimal(max(0, counter_mj - self._base_mj)) / 1000
            wall_s = time.monotonic()
            power_w = self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0
            self._integrated_j += power_w * (wall_s - self._last_wall_s)
            self._last_wall_s = wall_s
            return to_decimal(round(self._integrated_j, 6))


class ScriptedMeter:
    """Counts a fixed number of joules per reading: deterministic energy for tests."""

    name = "scripted"
    device = "cpu"
    estimated = True

    def __init__(self, step_j: Decimal):
        assert step_j >= 0, "a cumulative counter never decreases"
        self._step_j = step_j
        self._total_j = Decimal(0)
        self._lock = threading.Lock()

    def energy_j(self) -> Decimal:
        with self._lock:
            self._total_j += self._step_j
            return self._total_j


def create_meter(settings: Settings, device: str) -> Meter:
    """The meter named by settings. "auto" picks NVML on a CUDA device, the CPU model on a CPU
    device, and on an unknown device ("auto") NVML where a GPU answers, else the CPU model."""
    choice = settings.meter
    if choice == "auto" and device == "auto":
        try:
            return NvmlMeter(0)
        except Exception:  # No driver, no library or no GPU: this host meters its CPU.
            return ModelledCpuMeter(settings.cpu_tdp_w, settings.cpu_idle_w)
    if choice == "auto":
        choice = "nvml" if device.startswith("cuda") else "modelled-cpu"
    if choice == "nvml":
        index = int(device.split(":")[1]) if ":" in device else 0
        return NvmlMeter(index)
    if choice == "modelled-cpu":
        return ModelledCpuMeter(settings.cpu_tdp_w, settings.cpu_idle_w)
    if choice.startswith("scripted:"):
        return ScriptedMeter(Decimal(choice.split(":", 1)[1]))
    raise ValueError(
        f"unknown meter {settings.meter!r}: use auto, nvml, modelled-cpu or scripted:J"
    )
