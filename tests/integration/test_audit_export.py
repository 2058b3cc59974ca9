"""`tokenmill audit export` and the standalone verifier an auditor runs on it; the audit CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.conftest import REDIS_URL
from tests.integration.audit_helpers import audit_db, audit_pool, log_events, template_db
from tokenmill.events import UsageBooked
from tokenmill.ledger import audit, chain

__all__ = ["audit_db", "audit_pool", "template_db"]  # Fixtures, used by name.

ROOT = Path(__file__).resolve().parents[2]
VERIFIER = ROOT / "tools" / "verify_export.py"
SEED_HEX = "11" * 32
KEY = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(SEED_HEX))
PUBLIC_HEX = chain.public_key_bytes(KEY).hex()
NOVEMBER = datetime(2026, 11, 1, tzinfo=UTC)


def _booked(customer: str, revenue: str, at: datetime) -> UsageBooked:
    return UsageBooked(
        producer="ledger",
        customer_id=customer,
        request_id=f"req_{customer}_{revenue}_{at.day}",
        region="eu-west",
        occurred_at=at,
        tier="standard",
        prompt_tokens=10,
        completion_tokens=20,
        energy_j=Decimal("1.5"),
        cost=Decimal("0.0001"),
        revenue=Decimal(revenue),
        currency="USD",
        price_version="v1",
    )


async def _log(conn: asyncpg.Connection, events: list[UsageBooked]) -> None:
    for event in events:
        await conn.execute(
            "INSERT INTO ledger.events (event_id, event_type, stream, customer_id, request_id, "
            "occurred_at, body) VALUES ($1, $2, 'tm.booked', $3, $4, $5, $6)",
            event.event_id,
            event.type,
            event.customer_id,
            event.request_id,
            event.occurred_at,
            event.canonical_json(),
        )


def _verifier(*args: str) -> subprocess.CompletedProcess:
    # -I: isolated, as an auditor's bare Python would run it, with none of our packages.
    return subprocess.run(
        [sys.executable, "-I", str(VERIFIER), *args], capture_output=True, text=True, timeout=60
    )


async def _exported(pool: asyncpg.Pool, out: Path) -> dict:
    async with pool.acquire() as conn:
        await log_events(conn, 5)
        await _log(
            conn,
            [
                _booked("cus_a", "0.10", NOVEMBER + timedelta(days=1)),
                _booked("cus_a", "0.0000425", NOVEMBER + timedelta(days=2)),
                _booked("cus_b", "1.25", NOVEMBER + timedelta(days=3)),
                _booked("cus_b", "9.99", NOVEMBER - timedelta(days=60)),  # before the window
            ],
        )
        await log_events(conn, 3)
        await chain.seal(pool, 4)
        await chain.write_checkpoint(conn, KEY)
        await log_events(conn, 2)
        await chain.seal(pool, 4)
        window = (NOVEMBER - timedelta(days=40), datetime.now(UTC) + timedelta(days=1))
        audit.prepare_export(*window, out)
        return await audit.export(conn, *window, out)


async def test_the_offline_verifier_checks_an_export_and_totals_its_charges(
    audit_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    manifest = await _exported(audit_pool, tmp_path / "export")
    assert manifest["events"] == 14 and manifest["checkpoints"] == 1

    done = _verifier(str(tmp_path / "export"), "--public-key", PUBLIC_HEX, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["events"] == 14 and result["last_signed_position"] == 12
    assert result["unsigned_tail_events"] == 2
    charges = {(c["customer_id"], c["period"]): c for c in result["charges"]}
    assert charges[("cus_a", "2026-11")]["revenue"] == "0.1000425"
    assert charges[("cus_b", "2026-11")]["requests"] == 1
    assert ("cus_b", "2026-09") not in charges, "exported, but it occurred before the window"


async def test_one_byte_changed_in_an_export_is_found(
    audit_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    await _exported(audit_pool, tmp_path / "export")
    events = (tmp_path / "export" / "events.jsonl").read_bytes()
    at = events.index(b'revenue\\":\\"1.25') + len(b'revenue\\":\\"')
    changed = tmp_path / "changed"
    shutil.copytree(tmp_path / "export", changed)
    (changed / "events.jsonl").write_bytes(events[:at] + b"7" + events[at + 1 :])
    done = _verifier(str(changed), "--public-key", PUBLIC_HEX)
    assert done.returncode == 1
    assert "FAILED" in done.stdout and "was altered" in done.stdout, done.stdout

    forged = tmp_path / "forged"
    shutil.copytree(tmp_path / "export", forged)
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()
    done = _verifier(str(forged), "--public-key", other)
    assert done.returncode == 1 and "not the operator's key" in done.stdout


def _cli(url: str, key_file: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'libs'}:{ROOT / 'services'}",
        "TOKENMILL_DATABASE_URL": url,
        "TOKENMILL_REDIS_URL": REDIS_URL,
        "TOKENMILL_STREAM_PREFIX": f"tmtest.cli{os.getpid()}",
        "TOKENMILL_AUDIT_KEY_FILE": str(key_file),
    }
    return subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", "audit", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


async def test_the_audit_commands(audit_db: str, audit_pool: asyncpg.Pool, tmp_path: Path) -> None:
    key_file = tmp_path / "audit.key"
    key_file.write_text(SEED_HEX + "\n")
    async with audit_pool.acquire() as conn:
        await log_events(conn, 3)
    assert _cli(audit_db, key_file, "public-key").stdout.strip() == PUBLIC_HEX
    signed = _cli(audit_db, key_file, "checkpoint")
    assert signed.returncode == 0, signed.stderr
    assert json.loads(signed.stdout)["position"] == 3
    checked = _cli(audit_db, key_file, "verify", "--json")
    assert json.loads(checked.stdout)["ok"] and json.loads(checked.stdout)["checkpoints_verified"]
    assert _cli(audit_db, key_file, "verify").stdout.startswith("OK: 3 events")

    bad = _cli(audit_db, key_file, "verify", "--public-key", "zz")
    assert bad.returncode != 0 and "--public-key 'zz' is not hex" in bad.stderr
    out = str(tmp_path / "never")
    backwards = _cli(
        audit_db, key_file, "export", "--from", "2026-12-01", "--to", "2026-11-01", "--out", out
    )
    assert backwards.returncode != 0 and "--to must be later than --from" in backwards.stderr
    nonsense = _cli(audit_db, key_file, "export", "--from", "soon", "--to", "later", "--out", out)
    assert nonsense.returncode == 2 and "not an ISO 8601 date" in nonsense.stderr
    assert not (tmp_path / "never").exists(), "a refused export writes nothing"
