"""Energy tariffs as the operator sets them (`tokenmill tariffs set|list`): a new version of the
cost rates of a device class, with its energy price per kWh, PUE, device-hour rate, optional
carbon intensity (g CO2e/kWh) and optional time-of-use hours (UTC) that price some hours of
the day apart. Checked before anything is written.

A tariff version takes effect from its effective time and never reprices usage sent before
it: one that would take effect in the past is refused, as a price plan's is.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg

from tokenmill.ledger.prices import PriceError, parse_price, parse_time
from tokenmill.settings import Settings

DEVICE_CLASSES = ("cpu", "cuda")
HOURS_MAX = 24


@dataclass(frozen=True)
class Hours:
    """Within [hour_from, hour_to) UTC the energy price is `energy_price_per_kwh`."""

    hour_from: int
    hour_to: int
    energy_price_per_kwh: Decimal


@dataclass(frozen=True)
class Tariff:
    device_class: str
    version: str
    effective_from: datetime
    currency: str
    energy_price_per_kwh: Decimal
    pue: Decimal
    compute_price_per_hour: Decimal
    carbon_g_per_kwh: Decimal | None
    hours: tuple[Hours, ...]

    def as_json(self) -> dict[str, object]:
        def text(v: object) -> object:
            return str(v) if isinstance(v, Decimal) else v

        fields = {k: text(v) for k, v in vars(self).items() if k != "hours"}
        fields["effective_from"] = self.effective_from.isoformat()
        fields["hours"] = [{k: text(v) for k, v in vars(h).items()} for h in self.hours]
        return fields


def _nonnegative(text: str, what: str) -> Decimal:
    value = parse_price(text, what)
    if value < 0:
        raise PriceError(400, "bad_price", f"{what}: {text!r} is negative")
    return value


def parse_hours(text: str) -> tuple[Hours, ...]:
    """Time-of-use hours from "FROM-TO:PRICE,...", hours UTC (0-24), e.g. "17-21:0.30"."""
    hours = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        span, sep, price = part.partition(":")
        start, dash, end = span.partition("-")
        try:
            hour_from, hour_to = int(start), int(end)
        except ValueError:
            hour_from = hour_to = -1
        if not sep or not dash or not 0 <= hour_from < hour_to <= HOURS_MAX:
            raise PriceError(
                400,
                "bad_hours",
                f"--hours: {part!r} is not FROM-TO:PRICE with 0 <= FROM < TO <= 24",
            )
        hours.append(Hours(hour_from, hour_to, _nonnegative(price, "--hours")))
    hours.sort(key=lambda h: h.hour_from)
    for earlier, later in zip(hours, hours[1:], strict=False):
        if later.hour_from < earlier.hour_to:
            raise PriceError(
                400,
                "bad_hours",
                f"--hours: {earlier.hour_from}-{earlier.hour_to} and "
                f"{later.hour_from}-{later.hour_to} overlap",
            )
    return tuple(hours)


def tariff_from_args(args: argparse.Namespace) -> Tariff:
    pue = parse_price(args.pue, "--pue")
    if pue < 1:
        raise PriceError(400, "bad_pue", f"--pue: {args.pue!r} is below 1 (no facility uses less)")
    return Tariff(
        device_class=args.device_class,
        version=args.version,
        effective_from=parse_time(args.effective, "--effective"),
        currency=args.currency,
        energy_price_per_kwh=_nonnegative(args.energy_price, "--energy-price"),
        pue=pue,
        compute_price_per_hour=_nonnegative(args.compute_price, "--compute-price"),
        carbon_g_per_kwh=None if args.carbon is None else _nonnegative(args.carbon, "--carbon"),
        hours=parse_hours(args.hours or ""),
    )


async def add_tariff(conn: asyncpg.Connection, tariff: Tariff) -> Tariff:
    """Write `tariff` and its hours in one transaction; refuse one effective in the past or at
    the time of an existing version."""
    async with conn.transaction():
        if tariff.effective_from < await conn.fetchval("SELECT now()"):
            raise PriceError(
                409,
                "effective_in_the_past",
                f"--effective {tariff.effective_from.isoformat()} is in the past: it would "
                "reprice usage already sent; give an effective time from now on",
            )
        inserted = await conn.fetchval(
            "INSERT INTO ledger.cost_rates (version, device_class, energy_price_per_kwh, pue, "
            "compute_price_per_hour, currency, effective_from, carbon_g_per_kwh) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING RETURNING 1",
            tariff.version, tariff.device_class, tariff.energy_price_per_kwh, tariff.pue,
            tariff.compute_price_per_hour, tariff.currency, tariff.effective_from,
            tariff.carbon_g_per_kwh,
        )  # fmt: skip
        if inserted is None:
            raise PriceError(
                409,
                "tariff_exists",
                f"{tariff.device_class} already has a tariff from "
                f"{tariff.effective_from.isoformat()}",
            )
        await conn.executemany(
            "INSERT INTO ledger.tariff_hours (device_class, effective_from, hour_from, hour_to, "
            "energy_price_per_kwh) VALUES ($1, $2, $3, $4, $5)",
            [
                (
                    tariff.device_class,
                    tariff.effective_from,
                    h.hour_from,
                    h.hour_to,
                    h.energy_price_per_kwh,
                )
                for h in tariff.hours
            ],  # fmt: skip
        )
    return tariff


async def list_tariffs(conn: asyncpg.Connection) -> list[Tariff]:
    rates = await conn.fetch(
        "SELECT * FROM ledger.cost_rates ORDER BY device_class, effective_from"
    )
    hours = await conn.fetch("SELECT * FROM ledger.tariff_hours ORDER BY hour_from")
    return [
        Tariff(
            r["device_class"],
            r["version"],
            r["effective_from"],
            r["currency"],
            r["energy_price_per_kwh"],
            r["pue"],
            r["compute_price_per_hour"],
            r["carbon_g_per_kwh"],
            tuple(
                Hours(h["hour_from"], h["hour_to"], h["energy_price_per_kwh"])
                for h in hours
                if (h["device_class"], h["effective_from"])
                == (r["device_class"], r["effective_from"])
            ),
        )  # fmt: skip
        for r in rates
    ]


def add_commands(commands: argparse._SubParsersAction) -> None:
    tariffs = commands.add_parser(
        "tariffs", help="energy price, PUE, carbon intensity and time-of-use hours"
    ).add_subparsers(dest="tariffs_command", required=True)
    put = tariffs.add_parser("set", help="add a tariff version for a device class")
    put.add_argument("--device-class", required=True, choices=DEVICE_CLASSES)
    put.add_argument("--version", required=True)
    put.add_argument("--effective", required=True, help="ISO 8601 time, e.g. 2026-12-01T00:00:00Z")
    put.add_argument("--energy-price", required=True, help="per kWh at the wall")
    put.add_argument("--pue", required=True, help="power usage effectiveness, 1 or more")
    put.add_argument("--compute-price", required=True, help="device time, per hour")
    put.add_argument("--carbon", help="grid carbon intensity, g CO2e per kWh")
    put.add_argument("--hours", help="time-of-use prices per kWh, UTC: FROM-TO:PRICE,...")
    put.add_argument("--currency", default="USD")
    listing = tariffs.add_parser("list", help="every tariff version with its hours")
    for command in (put, listing):
        command.add_argument("--json", action="store_true", help="machine-readable output")


async def command(settings: Settings, args: argparse.Namespace) -> str:
    """Run `tariffs set` or `tariffs list`; raise PriceError for bad input."""
    tariff = tariff_from_args(args) if args.tariffs_command == "set" else None
    conn = await asyncpg.connect(settings.database_url)
    try:
        found = [await add_tariff(conn, tariff)] if tariff else await list_tariffs(conn)
    finally:
        await conn.close()
    if args.json:
        return json.dumps([t.as_json() for t in found], indent=2)
    return "\n".join(map(_line, found)) if found else "no tariffs"


def _line(t: Tariff) -> str:
    hours = ", ".join(f"{h.hour_from}-{h.hour_to}h {h.energy_price_per_kwh}" for h in t.hours)
    carbon = "carbon unknown" if t.carbon_g_per_kwh is None else f"{t.carbon_g_per_kwh} g/kWh"
    return (
        f"{t.device_class} {t.version} from {t.effective_from.isoformat()}: "
        f"{t.energy_price_per_kwh} {t.currency}/kWh x PUE {t.pue}"
        + (f" (hours UTC: {hours})" if hours else "")
        + f", {t.compute_price_per_hour} {t.currency}/h, {carbon}"
    )
