"""The operator's reports: revenue, cost and margin per group, and the factory's unit economics.

Read from ledger.request_usage over [from, to) by the requests' submission time: revenue is
what the requests were charged, credits what was given back for them, cost what they cost to
make (energy at the tariff and PUE, plus amortised compute), margin = revenue - credits - cost.
The factory's totals add the tokens, the energy (J and kWh) and cost and revenue per million
tokens: the unit economics the platform exists to show.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Literal

import asyncpg

from tokenmill.money import JOULES_PER_KWH, TOKENS_PER_MILLION

GroupBy = Literal["tier", "customer", "model", "day"]
GROUP_BY: tuple[GroupBy, ...] = ("tier", "customer", "model", "day")
# Whitelisted SQL for each grouping: never interpolated from input.
_GROUP_SQL: dict[GroupBy, str] = {
    "tier": "u.tier",
    "customer": "u.customer_id",
    "model": "u.model",
    "day": "to_char(u.submitted_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
}
PER_MTOK_PLACES = Decimal("0.000001")
KWH_PLACES = Decimal("0.000001")


@dataclass(frozen=True)
class Figures:
    requests: int
    tokens: int
    energy_j: Decimal
    revenue: Decimal
    credits: Decimal
    cost: Decimal

    @property
    def margin(self) -> Decimal:
        return self.revenue - self.credits - self.cost

    def per_mtok(self, amount: Decimal) -> Decimal | None:
        if self.tokens == 0:
            return None
        return (amount * TOKENS_PER_MILLION / self.tokens).quantize(PER_MTOK_PLACES)

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "tokens": self.tokens,
            "energy_j": format(self.energy_j, "f"),
            "energy_kwh": format((self.energy_j / JOULES_PER_KWH).quantize(KWH_PLACES), "f"),
            "revenue": format(self.revenue, "f"),
            "credits": format(self.credits, "f"),
            "cost": format(self.cost, "f"),
            "margin": format(self.margin, "f"),
            "revenue_per_mtok": _maybe(self.per_mtok(self.revenue)),
            "cost_per_mtok": _maybe(self.per_mtok(self.cost)),
        }


def _maybe(value: Decimal | None) -> str | None:
    return None if value is None else format(value, "f")


@dataclass(frozen=True)
class Report:
    start: date
    end: date  # inclusive
    group_by: GroupBy
    currency: str | None
    groups: list[tuple[str, Figures]]
    totals: Figures

    def as_json(self) -> dict[str, Any]:
        return {
            "object": "report",
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "group_by": self.group_by,
            "currency": self.currency,
            "groups": [{"group": key, **fig.as_json()} for key, fig in self.groups],
            "totals": self.totals.as_json(),
        }


def _figures(row: asyncpg.Record) -> Figures:
    return Figures(
        requests=row["requests"],
        tokens=row["tokens"],
        energy_j=row["energy_j"],
        revenue=row["revenue"],
        credits=row["credits"],
        cost=row["cost"],
    )


async def report(
    conn: asyncpg.Connection | asyncpg.Pool,
    start: date,
    end: date,
    group_by: GroupBy,
    groups_max: int,
) -> Report:
    """The report over the days `start` to `end`, both included. Raises ValueError for a
    range that is backwards or has more than `groups_max` groups."""
    if start > end:
        raise ValueError(f"from {start} is after to {end}")
    key = _GROUP_SQL[group_by]
    bounds = tuple(_utc(day) for day in (start, date.fromordinal(end.toordinal() + 1)))
    rows = await conn.fetch(
        f"SELECT {key} AS grp, count(*) AS requests, "
        "coalesce(sum(u.prompt_tokens + u.completion_tokens), 0)::bigint AS tokens, "
        "coalesce(sum(u.energy_j), 0) AS energy_j, coalesce(sum(u.revenue), 0) AS revenue, "
        "coalesce(sum(c.amount), 0) AS credits, coalesce(sum(u.cost), 0) AS cost, "
        "min(u.currency) AS currency, count(DISTINCT u.currency) AS currencies "
        "FROM ledger.request_usage u "
        # A credit's period is its request's (migration 0009): only the range's months.
        "LEFT JOIN (SELECT request_id, sum(amount) AS amount FROM ledger.credits "
        "           WHERE period BETWEEN ledger.billing_period($1) AND ledger.billing_period($2) "
        "           GROUP BY request_id) c ON c.request_id = u.request_id "
        "WHERE u.submitted_at >= $1 AND u.submitted_at < $2 "
        f"GROUP BY ROLLUP ({key}) ORDER BY grp NULLS LAST LIMIT $3",
        *bounds,
        groups_max + 2,
    )
    if len(rows) > groups_max + 1:
        raise ValueError(f"more than {groups_max} groups by {group_by}: narrow from and to")
    totals = rows[-1] if rows and rows[-1]["grp"] is None else None
    groups = [(row["grp"], _figures(row)) for row in rows if row["grp"] is not None]
    if totals is not None and totals["currencies"] > 1:
        raise ValueError("the range holds more than one currency; report each separately")
    empty = Figures(0, 0, Decimal(0), Decimal(0), Decimal(0), Decimal(0))
    return Report(
        start=start,
        end=end,
        group_by=group_by,
        currency=totals["currency"] if totals is not None else None,
        groups=groups,
        totals=_figures(totals) if totals is not None else empty,
    )


def _utc(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def report_text(rep: Report) -> str:
    """A table a person reads: one row per group, then the factory's totals (amounts to six
    places here; --json has them exact)."""
    columns = ("requests", "tokens", "revenue", "credits", "cost", "margin")
    out = [
        f"report {rep.start} to {rep.end} by {rep.group_by} ({rep.currency or 'no usage'})",
        f"{'group':<24}" + "".join(f"{name:>14}" for name in columns),
    ]
    for key, fig in [*rep.groups, ("total", rep.totals)]:
        cells = (fig.requests, fig.tokens, *map(_q, (fig.revenue, fig.credits, fig.cost)))
        out.append(f"{key:<24}" + "".join(f"{cell:>14}" for cell in (*cells, _q(fig.margin))))
    t = rep.totals.as_json()
    out += [
        f"energy {rep.totals.energy_j:.1f} J ({t['energy_kwh']} kWh); per million tokens: "
        f"revenue {t['revenue_per_mtok']}, cost {t['cost_per_mtok']}",
    ]
    return "\n".join(out)


def _q(value: Decimal) -> str:
    return format(value.quantize(PER_MTOK_PLACES), "f")


@dataclass(frozen=True)
class EnergyRow:
    """The requests of one model and tier: their joules per token processed and billed."""

    model: str
    tier: str
    requests: int
    tokens: int
    energy_j: Decimal
    energy_cost: Decimal
    carbon_g: Decimal | None

    @property
    def joules_per_token(self) -> Decimal | None:
        return self.energy_j / self.tokens if self.tokens else None

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "tier": self.tier,
            "requests": self.requests,
            "tokens": self.tokens,
            "energy_j": str(self.energy_j),
            "joules_per_token": _maybe(self.joules_per_token),
            "energy_cost": str(self.energy_cost),
            "carbon_g": _maybe(self.carbon_g),
        }


@dataclass(frozen=True)
class DeviceEnergy:
    """What one worker's device metered over the range, from its energy intervals."""

    worker: str
    device: str
    meter: str
    estimated: bool
    metered_j: Decimal
    attributed_j: Decimal
    idle_j: Decimal
    unbilled_j: Decimal
    overhead_cost: Decimal


@dataclass(frozen=True)
class EnergyReport:
    """Energy over the days `start` to `end`: what the meters counted (workers' intervals by
    their start), what steps used and what was idle, and per model and tier the requests'
    joules per token (requests by submission)."""

    start: date
    end: date
    devices: list[DeviceEnergy]
    rows: list[EnergyRow]

    def _sum(self, name: str) -> Decimal:
        return sum((getattr(d, name) for d in self.devices), Decimal(0))

    @property
    def metered_j(self) -> Decimal:
        return self._sum("metered_j")

    @property
    def attributed_j(self) -> Decimal:
        return self._sum("attributed_j")

    @property
    def idle_j(self) -> Decimal:
        return self._sum("idle_j")

    def as_json(self) -> dict[str, Any]:
        return {
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "metered_j": str(self.metered_j),
            "attributed_j": str(self.attributed_j),
            "idle_j": str(self.idle_j),
            "unbilled_j": str(self._sum("unbilled_j")),
            "overhead_cost": str(self._sum("overhead_cost")),
            "devices": [
                {k: str(v) if isinstance(v, Decimal) else v for k, v in vars(d).items()}
                for d in self.devices
            ],
            "by_model_and_tier": [row.as_json() for row in self.rows],
        }


async def energy_report(
    conn: asyncpg.Connection | asyncpg.Pool, start: date, end: date, groups_max: int = 1000
) -> EnergyReport:
    """The energy report over the days `start` to `end`, both included. Raises ValueError for
    a backwards range or more than `groups_max` devices or model-tier groups."""
    if start > end:
        raise ValueError(f"from {start} is after to {end}")
    bounds = (_utc(start), _utc(date.fromordinal(end.toordinal() + 1)))
    devices = await conn.fetch(
        "SELECT worker, device, meter, bool_and(estimated) AS estimated, "
        "sum(metered_j) AS metered_j, sum(attributed_j) AS attributed_j, sum(idle_j) AS idle_j, "
        "sum(unbilled_j) AS unbilled_j, sum(overhead_cost) AS overhead_cost "
        "FROM ledger.energy_intervals WHERE interval_start >= $1 AND interval_start < $2 "
        "GROUP BY worker, device, meter ORDER BY worker, device, meter LIMIT $3",
        *bounds,
        groups_max + 1,
    )
    rows = await conn.fetch(
        "SELECT model, tier, count(*) AS requests, "
        "sum(prompt_tokens + completion_tokens)::bigint AS tokens, sum(energy_j) AS energy_j, "
        "sum(energy_cost) AS energy_cost, sum(carbon_g) AS carbon_g "
        "FROM ledger.request_usage WHERE submitted_at >= $1 AND submitted_at < $2 "
        "GROUP BY model, tier ORDER BY model, tier LIMIT $3",
        *bounds,
        groups_max + 1,
    )
    if len(devices) > groups_max or len(rows) > groups_max:
        raise ValueError(f"more than {groups_max} groups: narrow from and to")
    return EnergyReport(
        start, end, [DeviceEnergy(**dict(d)) for d in devices], [EnergyRow(**dict(r)) for r in rows]
    )


def energy_report_text(rep: EnergyReport) -> str:
    """The energy report as a person reads it (joules to three places; --json is exact)."""
    share = (rep.idle_j / rep.metered_j * 100) if rep.metered_j else Decimal(0)
    out = [
        f"energy {rep.start} to {rep.end}",
        f"metered {rep.metered_j:.3f} J = attributed {rep.attributed_j:.3f} J "
        f"+ idle {rep.idle_j:.3f} J ({share:.1f} % idle)",
        f"{'worker':<20}{'device':<10}{'meter':<14}{'metered J':>14}{'idle J':>14}"
        f"{'unbilled J':>14}",
    ]
    for d in rep.devices:
        meter = d.meter + ("*" if d.estimated else "")
        out.append(
            f"{d.worker:<20}{d.device:<10}{meter:<14}{d.metered_j:>14.3f}{d.idle_j:>14.3f}"
            f"{d.unbilled_j:>14.3f}"
        )
    out.append(
        f"{'model':<20}{'tier':<10}{'requests':>10}{'tokens':>12}{'J':>14}{'J/token':>12}"
        f"{'energy cost':>14}{'g CO2e':>12}"
    )
    for r in rep.rows:
        jpt = "-" if r.joules_per_token is None else f"{r.joules_per_token:.6f}"
        carbon = "-" if r.carbon_g is None else f"{r.carbon_g:.6f}"
        out.append(
            f"{r.model:<20}{r.tier:<10}{r.requests:>10}{r.tokens:>12}{r.energy_j:>14.3f}{jpt:>12}"
            f"{_q(r.energy_cost):>14}{carbon:>12}"
        )
    if any(d.estimated for d in rep.devices):
        out.append("* estimated: a modelled meter, not a measurement")
    return "\n".join(out)
