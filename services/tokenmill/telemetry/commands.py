"""`tokenmill power cap WATTS|--clear` and `tokenmill power status`: the operator's power cap,
the same writes as `PUT|DELETE /admin/v1/power/cap` (tokenmill.powercap)."""

from __future__ import annotations

import argparse
import json

from faststream.redis import RedisBroker
from redis.asyncio import Redis as RedisClient

from tokenmill import powercap
from tokenmill.settings import Settings
from tokenmill.signing import SigningKeys
from tokenmill.streams import Streams

SOURCE = "cli"


def add_commands(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("power", help="the facility power cap").add_subparsers(
        dest="power_command", required=True
    )
    cap = sub.add_parser(
        "cap", help="set the facility power budget in watts (or --clear it); tiers are shed, "
        "free first, while the measured power is over it"
    )  # fmt: skip
    which = cap.add_mutually_exclusive_group(required=True)
    which.add_argument("watts", nargs="?", default=None, help="the budget, in watts")
    which.add_argument("--clear", action="store_true", help="remove the cap")
    cap.add_argument("--reason", default="", help="why, for the event log")
    status = sub.add_parser("status", help="the cap, the measured power and what is shed")
    for command in (cap, status):
        command.add_argument("--json", action="store_true", help="machine-readable output")


def check(args: argparse.Namespace, settings: Settings) -> None:
    """Refuse bad input before anything is connected to (raises powercap.CapError)."""
    if args.power_command == "cap" and not args.clear:
        args.cap_w = powercap.parse_cap_w(args.watts, settings.power_cap_w_max)


async def command(settings: Settings, args: argparse.Namespace) -> str:
    redis = RedisClient.from_url(settings.redis_url)
    try:
        if args.power_command == "cap":
            cap_w = None if args.clear else args.cap_w
            event = powercap.cap_event(cap_w, SOURCE, args.reason, settings.region)
            broker = RedisBroker(settings.redis_url)
            await broker.connect()
            try:
                keys = SigningKeys.parse(settings.signing_keys)
                streams = Streams(settings.stream_prefix)
                await powercap.set_cap(redis, broker, streams, keys, event)
            finally:
                await broker.stop()
        found = await powercap.status(redis, settings.stream_prefix)
    finally:
        await redis.aclose()
    return json.dumps(found, indent=2, sort_keys=True) if args.json else powercap.status_text(found)
