"""`tokenmill audit ...` and the ledger's audit loops: sealing, checkpoints, exports, retention.

An export is what an outside auditor needs to check the log without our database or code:
events.jsonl (position, seq, hash and the body exactly as stored, one event a line),
checkpoints.json (the signed checkpoints in the exported range), and manifest.json (the range,
the hash before its first position, and the operator's public key). tools/verify_export.py
checks it with Python's standard library alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from tokenmill import retention
from tokenmill.ledger import chain, replay
from tokenmill.ledger.verify import verify
from tokenmill.settings import Settings
from tokenmill.streams import Streams

EXPORT_FORMAT = "tokenmill-audit-export/1"
EXPORT_FETCH_ROWS = 10_000


def background(runtime: Any) -> list[Coroutine[Any, Any, None]]:
    """The ledger's audit loops: seal (and checkpoint) the log, apply retention."""
    # A malformed retention setting stops the ledger from starting, not the loop silently.
    streams = Streams(runtime.settings.stream_prefix).all(runtime.settings.region)
    retention.keep_by_stream(runtime.settings, streams)
    return [
        chain.run_sealer(runtime.db, runtime.settings),
        retention.run(runtime.db, runtime.redis, runtime.settings),
    ]


def add_commands(commands: argparse._SubParsersAction) -> None:
    """`tokenmill audit verify|checkpoint|public-key|seal|export|replay`."""
    audit = commands.add_parser("audit", help="verify, sign and export the hash-chained log")
    actions = audit.add_subparsers(dest="audit_command", required=True)
    check = actions.add_parser("verify", help="walk the hash chain and check every checkpoint")
    check.add_argument("--from", dest="position_from", type=int, default=1, metavar="POSITION")
    check.add_argument("--to", dest="position_to", type=int, default=None, metavar="POSITION")
    check.add_argument(
        "--public-key", help="the operator's public key (hex); default: the audit key file's"
    )
    check.add_argument("--json", action="store_true", help="machine-readable output")
    actions.add_parser("seal", help="seal every logged event now (the ledger does it anyway)")
    actions.add_parser("checkpoint", help="seal, then sign the chain's head; print it as JSON")
    actions.add_parser("public-key", help="print the public key checkpoints are signed with")
    export = actions.add_parser("export", help="write events and checkpoints for an auditor")
    export.add_argument("--from", dest="time_from", required=True, type=_utc, metavar="T1")
    export.add_argument("--to", dest="time_to", required=True, type=_utc, metavar="T2")
    export.add_argument("--out", required=True, type=Path, metavar="DIR")
    replay.add_command(actions)


def _utc(text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 date or time") from exc
    return at if at.tzinfo else at.replace(tzinfo=UTC)


async def command(settings: Settings, args: argparse.Namespace) -> tuple[str, bool]:
    """Run one `audit` command; return what to print and whether it succeeded."""
    if args.audit_command == "replay":
        return await replay.command(settings, args)
    if args.audit_command == "public-key":
        return chain.public_key_bytes(_key(settings)).hex(), True
    if args.audit_command == "verify":
        report = await verify(
            settings.database_url,
            _trusted_key(settings, args.public_key),
            args.position_from,
            args.position_to,
            settings.audit_verify_fetch_rows,
        )
        text = json.dumps(report.as_json()) if args.json else report.text()
        return text, report.ok
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        if args.audit_command == "seal":
            sealed = await chain.seal(pool, settings.audit_seal_batch_max)
            return f"sealed {sealed} events", True
        if args.audit_command == "checkpoint":
            key = _key(settings)
            await chain.seal(pool, settings.audit_seal_batch_max)
            async with pool.acquire() as conn:
                checkpoint = await chain.write_checkpoint(conn, key)
            if checkpoint is None:
                return "the chain is empty: nothing to sign yet", False
            return json.dumps(checkpoint.as_json(), indent=2), True
        async with pool.acquire() as conn:
            manifest = await export(conn, args.time_from, args.time_to, args.out)
        return json.dumps(manifest, indent=2), True
    finally:
        await pool.close()


def _key(settings: Settings) -> Any:
    try:
        return chain.load_private_key(chain.audit_key_path(settings))
    except chain.AuditKeyError as exc:
        raise LookupError(f"{exc} (set TOKENMILL_AUDIT_KEY_FILE)") from exc


def _trusted_key(settings: Settings, public_key_hex: str | None) -> bytes | None:
    if public_key_hex:
        try:
            key = bytes.fromhex(public_key_hex)
        except ValueError as exc:
            raise LookupError(f"--public-key {public_key_hex!r} is not hex") from exc
        if len(key) != 32:
            raise LookupError(f"--public-key holds {len(key)} bytes, an Ed25519 key 32")
        return key
    try:
        return chain.public_key_bytes(chain.load_private_key(chain.audit_key_path(settings)))
    except chain.AuditKeyError:
        return None  # Each checkpoint is then checked against the key it names.


async def export(
    conn: asyncpg.Connection, time_from: datetime, time_to: datetime, out: Path
) -> dict[str, object]:
    """Write the chain's rows from the first event that occurred at or after `time_from` to
    the last before `time_to`, every row between included (the chain is seal-ordered, so a
    few may lie outside the window: the verifier only totals the window's)."""
    assert time_to > time_from
    first, last = await conn.fetchrow(
        "SELECT min(c.position), max(c.position) FROM ledger.event_chain c "
        "JOIN ledger.events e ON e.seq = c.event_seq "
        "WHERE e.occurred_at >= $1 AND e.occurred_at < $2",
        time_from,
        time_to,
    )
    if first is None:
        raise LookupError("no sealed event occurred in that window (run `tokenmill audit seal`?)")
    prev_hash = await conn.fetchval(
        "SELECT hash FROM ledger.event_chain WHERE position = $1", first - 1
    )
    events = await _write_events(conn, out / "events.jsonl", first, last)
    signed = [c.as_json() for c in await chain.checkpoints(conn, first, last)]
    (out / "checkpoints.json").write_text(json.dumps(signed, indent=2) + "\n")
    keys = sorted({str(c["public_key"]) for c in signed})
    manifest = {
        "format": EXPORT_FORMAT,
        "from": chain.iso(time_from),
        "to": chain.iso(time_to),
        "first_position": first,
        "last_position": last,
        "prev_hash": (prev_hash or chain.GENESIS_HASH).hex(),
        "events": events,
        "checkpoints": len(signed),
        "public_keys": keys,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    assert events == last - first + 1, "the chain has a gap: run `tokenmill audit verify`"
    return manifest


async def _write_events(conn: asyncpg.Connection, path: Path, first: int, last: int) -> int:
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        for start in range(first, last + 1, EXPORT_FETCH_ROWS):
            rows = await conn.fetch(
                "SELECT c.position, c.event_seq, c.hash, e.body FROM ledger.event_chain c "
                "LEFT JOIN ledger.events e ON e.seq = c.event_seq "
                "WHERE c.position BETWEEN $1 AND $2 ORDER BY c.position",
                start,
                min(start + EXPORT_FETCH_ROWS - 1, last),
            )
            for position, seq, hash_, body in rows:
                line = {"position": position, "seq": seq, "hash": hash_.hex(), "body": body}
                file.write(json.dumps(line, ensure_ascii=False) + "\n")
            written += len(rows)
    return written


def run(settings: Settings, args: argparse.Namespace) -> tuple[str, bool]:
    if args.audit_command == "export":
        prepare_export(args.time_from, args.time_to, args.out)
    return asyncio.run(command(settings, args))


def prepare_export(time_from: datetime, time_to: datetime, out: Path) -> None:
    """Refuse a bad window or a directory holding files (an export is never mixed with an
    older one), and create the directory."""
    if time_to <= time_from:
        raise LookupError("--to must be later than --from")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LookupError(f"{out} is not an empty directory; export into a new one")
    out.mkdir(parents=True, exist_ok=True)
