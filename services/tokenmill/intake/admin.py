"""The operator's key commands, `tokenmill keys list|revoke`: never SQL by hand."""

from __future__ import annotations

import argparse
import json
from typing import Any

import asyncpg

from tokenmill.intake.keys import KeyRecord, list_keys, revoke_key
from tokenmill.settings import Settings


def add_commands(keys: argparse._SubParsersAction) -> None:
    listing = keys.add_parser("list", help="list API keys (never the keys themselves)")
    listing.add_argument("--prefix", default="", help="only keys that start with this")
    listing.add_argument("--customer", default=None, help="only this customer's keys")
    revoke = keys.add_parser("revoke", help="revoke a key: every intake refuses it within 1 s")
    revoke.add_argument("key", help="the key's id (key_...), its prefix (tm_...), or the key")
    for command in (listing, revoke):
        command.add_argument("--json", action="store_true", help="machine-readable output")


async def command(settings: Settings, args: argparse.Namespace) -> str:
    """Run `keys list` or `keys revoke`; raise LookupError for a key that cannot be named."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        if args.keys_command == "list":
            keys = await list_keys(conn, args.prefix, args.customer)
            if args.json:
                return json.dumps([as_json(key) for key in keys], indent=2)
            return "\n".join(map(_line, keys)) if keys else "no keys"
        key, now = await revoke_key(conn, args.key)
    finally:
        await conn.close()
    if args.json:
        return json.dumps({**as_json(key), "revoked_now": now}, indent=2)
    if not now:
        return f"{_line(key)}: already revoked, nothing changed"
    return f"{_line(key)}: every intake refuses it within {settings.key_revocation_s_max:g} s"


def _line(key: KeyRecord) -> str:
    state = f"revoked {key.revoked_at.isoformat()}" if key.revoked_at else "active"
    return (
        f"{key.key_id}  {key.key_prefix}...  {key.customer_id} ({key.customer_name})  "
        f"created {key.created_at.isoformat()}  {state}"
    )


def as_json(key: KeyRecord) -> dict[str, Any]:
    return {
        "key_id": key.key_id,
        "key_prefix": key.key_prefix,
        "customer_id": key.customer_id,
        "customer_name": key.customer_name,
        "created_at": key.created_at.isoformat(),
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }
