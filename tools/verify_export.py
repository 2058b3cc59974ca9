#!/usr/bin/env python3
"""Check a tokenmill audit export offline, with Python's standard library alone (3.9+).

    python3 verify_export.py EXPORT_DIR --public-key HEX [--json]

An export (`tokenmill audit export --from T1 --to T2 --out DIR`) holds:

- manifest.json: the window, the chain positions exported, the hash before the first one;
- events.jsonl: one event a line, {"position", "seq", "hash", "body"}, body being the event's
  canonical JSON exactly as the ledger logged it;
- checkpoints.json: the operator's signed checkpoints in the exported range.

This script recomputes every hash, hash = SHA-256(previous hash || body as UTF-8), checks that
positions follow each other, that each checkpoint names the hash the chain has at its position
and carries a valid Ed25519 signature (RFC 8032) by the operator's public key over the
canonical JSON of {"head_hash", "position", "signed_at"}, and then totals the charges: the
revenue of every usage.booked event that occurred in the window, per customer, calendar month
(UTC) and currency, with the number of requests, to compare with the invoices issued.

Get the operator's public key from the operator by another channel than the export
(`tokenmill audit public-key`); without --public-key the key named in the export is used and
the result says so: an export signed by whoever made it proves nothing about who that was.
Events after the last checkpoint are chained but not yet covered by a signature: the result
counts them.

Exit status: 0 when everything holds, 1 at the first problem (printed with its line).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from datetime import datetime
from decimal import Decimal
from pathlib import Path

FORMAT = "tokenmill-audit-export/1"

# --- Ed25519 signature verification, after RFC 8032 section 6 (the reference code) ---------
# Pure Python and slow (milliseconds a signature), which is fine for a few checkpoints. Points
# are in extended coordinates (X, Y, Z, T) with x = X/Z, y = Y/Z, x*y = T/Z.

_P = 2**255 - 19
_Q = 2**252 + 27742317777372353535851937790883648493  # the group order
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _add(a: tuple, b: tuple) -> tuple:
    x = (a[1] - a[0]) * (b[1] - b[0]) % _P
    y = (a[1] + a[0]) * (b[1] + b[0]) % _P
    c = 2 * a[3] * b[3] * _D % _P
    d = 2 * a[2] * b[2] % _P
    e, f, g, h = y - x, d - c, d + c, y + x
    return (e * f, g * h, f * g, e * h)


def _mul(scalar: int, point: tuple) -> tuple:
    result = (0, 1, 1, 0)  # the neutral element
    while scalar > 0:
        if scalar & 1:
            result = _add(result, point)
        point = _add(point, point)
        scalar >>= 1
    return result


def _equal(a: tuple, b: tuple) -> bool:
    return (a[0] * b[2] - b[0] * a[2]) % _P == 0 and (a[1] * b[2] - b[1] * a[2]) % _P == 0


def _recover_x(y: int, sign: int) -> int | None:
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P)
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P != 0:
        return None
    return _P - x if (x & 1) != sign else x


def _decompress(data: bytes) -> tuple | None:
    if len(data) != 32:
        return None
    y = int.from_bytes(data, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    x = _recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % _P)


_GY = 4 * pow(5, _P - 2, _P) % _P
_GX = _recover_x(_GY, 0)
_BASE = (_GX, _GY, 1, _GX * _GY % _P)


def ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when `signature` is `public_key`'s Ed25519 signature of `message` (RFC 8032)."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    a = _decompress(public_key)
    r = _decompress(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if a is None or r is None or s >= _Q:
        return False
    digest = hashlib.sha512(signature[:32] + public_key + message).digest()
    h = int.from_bytes(digest, "little") % _Q
    return _equal(_mul(s, _BASE), _add(r, _mul(h, a)))


# --- the export ----------------------------------------------------------------------------


class Broken(Exception):
    """The export does not hold: the message says where and why."""


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _checkpoint_message(checkpoint: dict) -> bytes:
    facts = {k: checkpoint[k] for k in ("head_hash", "position", "signed_at")}
    return json.dumps(facts, sort_keys=True, separators=(",", ":")).encode()


def _check_checkpoint(checkpoint: dict, chain_hash: str, key_hex: str, line_no: int) -> None:
    where = f"checkpoint at position {checkpoint['position']} (events.jsonl line {line_no})"
    if checkpoint["public_key"] != key_hex:
        raise Broken(f"{where} is signed by {checkpoint['public_key']}, not the operator's key")
    signature = bytes.fromhex(checkpoint["signature"])
    if not ed25519_verify(bytes.fromhex(key_hex), _checkpoint_message(checkpoint), signature):
        raise Broken(f"{where}: bad signature")
    if checkpoint["head_hash"] != chain_hash:
        raise Broken(f"{where} signed hash {checkpoint['head_hash']}, the chain has {chain_hash}")


def verify_export(directory: Path, public_key_hex: str | None) -> dict:
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise Broken(f"manifest.json: format {manifest.get('format')!r}, expected {FORMAT!r}")
    key_hex = public_key_hex or _the_only_key(manifest)
    checkpoints: dict[int, list[dict]] = {}
    for checkpoint in json.loads((directory / "checkpoints.json").read_text(encoding="utf-8")):
        checkpoints.setdefault(checkpoint["position"], []).append(checkpoint)
    window = (_time(manifest["from"]), _time(manifest["to"]))
    charges: dict[tuple[str, str, str], list] = {}
    booked: set[str] = set()
    prev = bytes.fromhex(manifest["prev_hash"])
    position, verified, last_signed = manifest["first_position"] - 1, 0, None
    with open(directory / "events.jsonl", "rb") as lines:
        for line_no, raw in enumerate(lines, 1):
            try:
                row = json.loads(raw)
            except ValueError as exc:
                raise Broken(f"events.jsonl line {line_no}: not JSON ({exc})") from exc
            position += 1
            if row.get("position") != position:
                raise Broken(f"events.jsonl line {line_no}: position {row.get('position')}, "
                             f"expected {position}: rows missing or reordered")  # fmt: skip
            body = row["body"]
            if body is None:
                raise Broken(f"line {line_no} (position {position}): the event's body is gone")
            prev = hashlib.sha256(prev + body.encode("utf-8")).digest()
            if prev.hex() != row["hash"]:
                raise Broken(
                    f"events.jsonl line {line_no} (position {position}, seq {row.get('seq')}): "
                    "the hash does not follow from the previous one and the body: "
                    "the event or the chain was altered"
                )
            for checkpoint in checkpoints.pop(position, []):
                _check_checkpoint(checkpoint, row["hash"], key_hex, line_no)
                last_signed = position
            _add_charge(json.loads(body), window, charges, booked, line_no)
            verified += 1
    if position != manifest["last_position"] or verified != manifest["events"]:
        expected = f"{manifest['last_position']} and {manifest['events']}"
        raise Broken(f"events.jsonl ends at position {position} after {verified} events; "
                     f"the manifest says {expected}")  # fmt: skip
    if checkpoints:
        raise Broken(f"checkpoints at positions {sorted(checkpoints)} lie outside the events")
    return {
        "ok": True,
        "events": verified,
        "positions": [manifest["first_position"], position],
        "last_signed_position": last_signed,
        "unsigned_tail_events": position - (last_signed or manifest["first_position"] - 1),
        "public_key": key_hex,
        "public_key_source": "--public-key" if public_key_hex else "the export itself",
        "charges": [
            {"customer_id": c, "period": p, "currency": cur, "requests": n, "revenue": str(total)}
            for (c, p, cur), (n, total) in sorted(charges.items())
        ],
    }


def _the_only_key(manifest: dict) -> str:
    keys = manifest.get("public_keys") or []
    if len(keys) != 1:
        raise Broken(f"the export names {len(keys)} public keys; pass --public-key")
    return keys[0]


def _add_charge(event: dict, window: tuple, charges: dict, booked: set, line_no: int) -> None:
    """Add a usage.booked event of the window to its customer's month."""
    if event.get("type") != "usage.booked":
        return
    occurred = _time(event["occurred_at"])
    if not window[0] <= occurred < window[1]:
        return
    if event["request_id"] in booked:
        raise Broken(f"events.jsonl line {line_no}: request {event['request_id']} booked twice")
    booked.add(event["request_id"])
    key = (event["customer_id"], occurred.strftime("%Y-%m"), event["currency"])
    requests, revenue = charges.get(key, [0, Decimal(0)])
    charges[key] = [requests + 1, revenue + Decimal(event["revenue"])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--public-key", help="the operator's Ed25519 public key, hex")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    try:
        result = verify_export(args.export_dir, args.public_key)
    except (Broken, KeyError, ValueError, OSError) as exc:
        print(f"FAILED: {exc}" if isinstance(exc, Broken) else f"FAILED: {exc!r}")
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"OK: {result['events']} events at positions {result['positions'][0]}.."
        f"{result['positions'][1]}; signed up to position {result['last_signed_position']} "
        f"by {result['public_key']} (key from {result['public_key_source']}); "
        f"{result['unsigned_tail_events']} events after the last checkpoint"
    )
    for charge in result["charges"]:
        print(
            f"  {charge['customer_id']} {charge['period']}: {charge['requests']} requests, "
            f"{charge['revenue']} {charge['currency']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
