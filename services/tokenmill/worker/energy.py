"""The worker's energy account: every joule its meter counts is either a step's (split across
the requests in it) or idle, per device and interval.

The engine thread reads the meter at the start and end of each step (`step_started`,
`step_finished`). What the meter counted since the previous reading when a step starts is
idle energy: the engine waited for work, or took jobs in. What it counted during the step is
attributed: `serving` splits it across the step's requests by tokens. A share that reaches no
completion (its request was cancelled, given back after a failed step, or left the step) is
also counted as `unbilled_j`, so the ledger books it as overhead with the idle energy, as it
does a step that raised (`step_failed`) and the energy its given-back jobs had.

Per interval, exactly: metered_j = attributed_j + idle_j (the readings telescope). Over a
closed interval in which every request completed: Σ completions' J + idle_j = metered_j.

Prefill and decode tokens weigh the same (one token, one unit of the step's energy). On this
platform's CPU path a step's time is dominated by its matmuls, whose work is linear in the
tokens processed whether they are prompt or output tokens; attention over the cached
context, the part that differs, is a small share at these context lengths. On a GPU a decode
step is memory-bound and a prefill chunk compute-bound, so a decode token costs more per
token there than a prefill token in the same step; equal weights then favour long-prompt
requests a little. Equal weights are the choice that needs no calibration per device and
model, and that a customer can check against their token counts.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from tokenmill.events import EnergyInterval, utc_now
from tokenmill.meters import Meter


@dataclass(frozen=True)
class Totals:
    metered_j: Decimal = Decimal(0)
    attributed_j: Decimal = Decimal(0)
    idle_j: Decimal = Decimal(0)
    unbilled_j: Decimal = Decimal(0)
    tokens: int = 0
    steps: int = 0
    busy_s: float = 0.0  # Wall time in engine steps.

    def __add__(self, other: Totals) -> Totals:
        return Totals(
            self.metered_j + other.metered_j,
            self.attributed_j + other.attributed_j,
            self.idle_j + other.idle_j,
            self.unbilled_j + other.unbilled_j,
            self.tokens + other.tokens,
            self.steps + other.steps,
            self.busy_s + other.busy_s,
        )


@dataclass(frozen=True)
class Interval:
    """What the account counted from `start` to `end` (wall clock)."""

    start: datetime
    end: datetime
    totals: Totals

    @property
    def seconds(self) -> float:
        return max(0.0, (self.end - self.start).total_seconds())

    def merged(self, later: Interval) -> Interval:
        """This interval and the one right after it, as one (a publish failed meanwhile)."""
        return Interval(self.start, later.end, self.totals + later.totals)

    def event(self, meter: Meter, worker: str, region: str) -> EnergyInterval:
        t = self.totals
        return EnergyInterval(
            producer="worker",
            customer_id="",
            request_id="",
            region=region,
            worker=worker,
            meter=meter.name,
            device=meter.device,
            estimated=meter.estimated,
            interval_start=self.start,
            interval_end=self.end,
            metered_j=t.metered_j,
            attributed_j=t.attributed_j,
            idle_j=t.idle_j,
            unbilled_j=t.unbilled_j,
            tokens=t.tokens,
            steps=t.steps,
        )


class EnergyAccount:
    """Thread-safe: the engine thread reports steps, the event loop closes intervals."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self._lock = threading.Lock()
        self._last_j = meter.energy_j()
        self._start = self._last_at = utc_now()
        self._open = Totals()
        self._in_step = False
        self._step_started_s = 0.0
        self.lifetime = Totals()  # Since the worker started: Prometheus counters read it.

    def _read(self) -> Decimal:
        """Joules since the last reading; the caller holds the lock."""
        now_j = self.meter.energy_j()
        delta_j = now_j - self._last_j
        assert delta_j >= 0, "meters count up"
        self._last_j, self._last_at = now_j, utc_now()
        return delta_j

    def _count(self, totals: Totals) -> None:
        self._open = self._open + totals
        self.lifetime = self.lifetime + totals

    def step_started(self) -> None:
        with self._lock:
            idle_j = self._read()
            self._count(Totals(metered_j=idle_j, idle_j=idle_j))
            self._in_step = True
            self._step_started_s = time.perf_counter()

    def step_finished(self, tokens: int) -> Decimal:
        """The step's joules, for the caller to split across its requests."""
        with self._lock:
            step_j = self._read()
            busy_s = time.perf_counter() - self._step_started_s
            self._count(Totals(step_j, step_j, tokens=tokens, steps=1, busy_s=busy_s))
            self._in_step = False
            return step_j

    def unbilled(self, energy_j: Decimal) -> None:
        """Attributed joules that will reach no completion (a cancelled request's)."""
        if energy_j > 0:
            with self._lock:
                self._count(Totals(unbilled_j=energy_j))

    def step_failed(self, given_back_j: Decimal) -> None:
        """The step raised and its jobs were given back with `given_back_j` between them: the
        step's joules and theirs reach no completion."""
        with self._lock:
            step_j = self._read()
            self._count(
                Totals(step_j, attributed_j=step_j, unbilled_j=step_j + given_back_j, steps=1)
            )
            self._in_step = False

    def close_interval(self) -> Interval:
        """End the open interval now and start the next. While a step runs it ends at the
        step's start instead, so the step's joules fall whole into the next interval."""
        with self._lock:
            if not self._in_step:
                idle_j = self._read()
                self._count(Totals(metered_j=idle_j, idle_j=idle_j))
            closed = Interval(self._start, self._last_at, self._open)
            self._start, self._open = self._last_at, Totals()
            return closed

    def totals(self) -> Totals:
        with self._lock:
            return self.lifetime


def gauges(meter: Meter, worker: str, region: str, last: Interval, lifetime: Totals) -> dict:
    """What the intake's /metrics shows of this worker's energy (JSON): counters since the
    worker started, and the last interval's power, tokens per joule and utilisation (the
    share of its wall time the engine spent in steps)."""
    seconds = last.seconds
    t = last.totals
    return {
        "worker": worker,
        "region": region,
        "device": meter.device,
        "meter": meter.name,
        "estimated": meter.estimated,
        "joules_total": {
            "metered": str(lifetime.metered_j),
            "attributed": str(lifetime.attributed_j),
            "idle": str(lifetime.idle_j),
            "unbilled": str(lifetime.unbilled_j),
        },
        "tokens_total": lifetime.tokens,
        "watts": float(t.metered_j) / seconds if seconds > 0 else 0.0,
        "tokens_per_joule": t.tokens / float(t.metered_j) if t.metered_j > 0 else 0.0,
        "utilisation": min(1.0, t.busy_s / seconds) if seconds > 0 else 0.0,
    }
