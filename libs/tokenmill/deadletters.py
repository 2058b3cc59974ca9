"""`tokenmill dlq`: look at the entries consumers gave up on, and send them back.

A dead letter keeps the original entry's body and headers, where it came from and why it was
given up. Replaying one re-publishes its body to its original stream (every group of that
stream sees it again; consumers deduplicate on the event id, so a replay is idempotent) and
deletes it from the dead letters in the same transaction.

A replay never makes an event trusted that was not: an entry whose signature does not verify
with today's keys is refused, unless the operator passes `--resign` to vouch for it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from faststream.redis import RedisBroker
from redis.asyncio import Redis as RedisClient

from tokenmill.settings import Settings
from tokenmill.signing import SIGNATURE_HEADER, SigningKeys
from tokenmill.streams import Streams, publish

# Entries read per round trip, and shown per stream by `list` unless told otherwise.
PAGE_SIZE_MAX = 100
LIST_LIMIT_DEFAULT = 20


@dataclass(frozen=True)
class DeadLetter:
    id: str
    dead_letter_stream: str
    stream: str
    group: str
    entry_id: str
    reason: str
    failed_at: str
    data: bytes
    headers: dict[str, str]

    @classmethod
    def from_entry(cls, dead_letter_stream: str, entry_id: bytes, fields: dict) -> DeadLetter:
        text = {k.decode(): v.decode(errors="replace") for k, v in fields.items() if k != b"data"}
        return cls(
            id=entry_id.decode(),
            dead_letter_stream=dead_letter_stream,
            stream=text.get("stream", ""),
            group=text.get("group", ""),
            entry_id=text.get("entry_id", ""),
            reason=text.get("reason", ""),
            failed_at=text.get("failed_at", ""),
            data=fields.get(b"data", b""),
            # Dead letters written before headers were kept have none: they count as unsigned.
            headers=json.loads(text.get("headers") or "{}"),
        )

    def summary(self) -> dict[str, str]:
        return {
            "id": self.id,
            "stream": self.stream,
            "group": self.group,
            "entry_id": self.entry_id,
            "reason": self.reason,
            "failed_at": self.failed_at,
        }

    def details(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "headers": self.headers,
            "data": self.data.decode(errors="replace"),
        }


def dead_letter_streams(settings: Settings, stream: str | None) -> list[str]:
    """The dead-letter streams to look at: one stream's, or every stream's of this region."""
    streams = [stream] if stream else Streams(settings.stream_prefix).all(settings.region)
    return [Streams.dead_letters(name) for name in streams]


async def entries(redis: RedisClient, dead_letter_stream: str) -> AsyncIterator[DeadLetter]:
    """Every entry of `dead_letter_stream`, oldest first, read one page at a time."""
    start = "-"
    while True:
        page = await redis.xrange(dead_letter_stream, min=start, count=PAGE_SIZE_MAX)
        for entry_id, fields in page:
            yield DeadLetter.from_entry(dead_letter_stream, entry_id, fields)
        if len(page) < PAGE_SIZE_MAX:
            return
        start = "(" + page[-1][0].decode()


async def list_dead_letters(
    redis: RedisClient, streams: list[str], limit: int
) -> list[dict[str, Any]]:
    """Per dead-letter stream: how many entries it holds and the oldest `limit` of them."""
    listing = []
    for name in streams:
        shown = await redis.xrange(name, count=limit)
        listing.append(
            {
                "dead_letter_stream": name,
                "count": await redis.xlen(name),
                "entries": [DeadLetter.from_entry(name, i, f).summary() for i, f in shown],
            }
        )
    return listing


async def find(redis: RedisClient, streams: list[str], dead_letter_id: str) -> DeadLetter | None:
    for name in streams:
        for entry_id, fields in await redis.xrange(name, min=dead_letter_id, max=dead_letter_id):
            return DeadLetter.from_entry(name, entry_id, fields)
    return None


async def replay_one(
    redis: RedisClient, broker: RedisBroker, keys: SigningKeys, letter: DeadLetter, resign: bool
) -> str | None:
    """Send `letter` back to its stream and delete it; return why it was refused, or None."""
    refusal = keys.refusal(letter.data, letter.headers.get(SIGNATURE_HEADER))
    if refusal is not None and not resign:
        return f"{refusal}: not replayed (pass --resign to vouch for it and sign it anew)"
    if not letter.stream:
        return "the dead letter does not say which stream it came from"
    headers = {k: v for k, v in letter.headers.items() if k != SIGNATURE_HEADER}
    # One transaction: the entry is back on its stream exactly when it left the dead letters.
    async with redis.pipeline(transaction=True) as pipe:
        await publish(broker, letter.stream, letter.data.decode(), headers, keys, pipeline=pipe)
        pipe.xdel(letter.dead_letter_stream, letter.id)
        await pipe.execute()
    return None


async def replay(
    redis: RedisClient,
    broker: RedisBroker,
    keys: SigningKeys,
    streams: list[str],
    ids: list[str] | None,
    resign: bool,
) -> list[dict[str, str]]:
    """Replay the dead letters named by `ids`, or all of them when `ids` is None."""
    outcomes = []
    async for letter in _selected(redis, streams, ids):
        refusal = await replay_one(redis, broker, keys, letter, resign)
        outcome = "replayed" if refusal is None else f"refused: {refusal}"
        outcomes.append({"id": letter.id, "stream": letter.stream, "outcome": outcome})
    return outcomes


async def _selected(
    redis: RedisClient, streams: list[str], ids: list[str] | None
) -> AsyncIterator[DeadLetter]:
    if ids is None:
        for name in streams:
            async for letter in entries(redis, name):
                yield letter
        return
    for dead_letter_id in ids:
        letter = await find(redis, streams, dead_letter_id)
        if letter is None:
            raise LookupError(f"no dead letter {dead_letter_id} in {', '.join(streams)}")
        yield letter


def add_commands(commands: argparse._SubParsersAction) -> None:
    """`tokenmill dlq list|show|replay`."""
    dlq = commands.add_parser("dlq", help="inspect and replay dead-lettered stream entries")
    actions = dlq.add_subparsers(dest="dlq_command", required=True)
    listing = actions.add_parser("list", help="count and list dead letters per stream")
    listing.add_argument("--limit", type=int, default=LIST_LIMIT_DEFAULT)
    show = actions.add_parser("show", help="one dead letter with its body and headers")
    show.add_argument("id")
    again = actions.add_parser("replay", help="re-publish dead letters to their stream")
    which = again.add_mutually_exclusive_group()
    which.add_argument("ids", nargs="*", default=[], metavar="ID")
    which.add_argument("--all", action="store_true", help="every dead letter of the streams")
    again.add_argument(
        "--resign",
        action="store_true",
        help="sign entries whose signature does not verify anew (vouch for them)",
    )
    for action in (listing, show, again):
        action.add_argument("--stream", help="only this stream's dead letters (full name)")
        action.add_argument("--json", action="store_true", help="machine-readable output")


async def command(settings: Settings, args: argparse.Namespace) -> tuple[str, bool]:
    """Run one `dlq` command against `settings`' servers; return what to print, and whether
    everything asked for was done (a refused replay is not)."""
    redis = RedisClient.from_url(settings.redis_url)
    streams = dead_letter_streams(settings, args.stream)
    try:
        if args.dlq_command == "list":
            result: Any = await list_dead_letters(redis, streams, args.limit)
            return _render(result, args.json, _list_text), True
        if args.dlq_command == "show":
            letter = await find(redis, streams, args.id)
            if letter is None:
                raise LookupError(f"no dead letter {args.id} in {', '.join(streams)}")
            return _render(letter.details(), args.json, _show_text), True
        if not args.all and not args.ids:
            raise LookupError("name the dead letters to replay, or pass --all")
        broker = RedisBroker(settings.redis_url)
        await broker.connect()
        try:
            keys = SigningKeys.parse(settings.signing_keys)
            ids = None if args.all else args.ids
            result = await replay(redis, broker, keys, streams, ids, args.resign)
        finally:
            await broker.stop()
        done = all(outcome["outcome"] == "replayed" for outcome in result)
        return _render(result, args.json, _replay_text), done
    finally:
        await redis.aclose()


def _render(result: Any, as_json: bool, as_text) -> str:
    return json.dumps(result, indent=2, sort_keys=True) if as_json else as_text(result)


def _list_text(listing: list[dict[str, Any]]) -> str:
    lines = []
    for stream in listing:
        lines.append(f"{stream['dead_letter_stream']}: {stream['count']} dead letters")
        lines += [
            f"  {e['id']}  {e['group']:<9} {e['failed_at']}  {e['reason']}"
            f"  (was {e['stream']} {e['entry_id']})"
            for e in stream["entries"]
        ]
        if stream["count"] > len(stream["entries"]):
            lines.append(f"  ... {stream['count'] - len(stream['entries'])} more (--limit)")
    return "\n".join(lines)


def _show_text(details: dict[str, Any]) -> str:
    return "\n".join(f"{name}: {value}" for name, value in details.items())


def _replay_text(outcomes: list[dict[str, str]]) -> str:
    if not outcomes:
        return "no dead letters to replay"
    return "\n".join(f"{o['id']} ({o['stream']}): {o['outcome']}" for o in outcomes)
