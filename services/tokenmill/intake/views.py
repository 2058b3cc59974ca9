"""How the intake's records look on the wire: job views and OpenAI responses."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import asyncpg

from tokenmill.money import joules_per_token


def money(value: Decimal | None) -> str | None:
    """Exact decimals travel as strings: a JSON number would become a float in most clients."""
    return None if value is None else format(value.normalize(), "f")


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _usage(row: asyncpg.Record) -> dict[str, int] | None:
    if row["prompt_tokens"] is None:
        return None
    return {
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "total_tokens": row["prompt_tokens"] + row["completion_tokens"],
    }


def job(row: asyncpg.Record) -> dict[str, Any]:
    done = row["status"] == "completed"
    return {
        "id": row["request_id"],
        "object": "job",
        "status": row["status"],
        "model": row["model"],
        "tier": row["tier"],
        "region": row["region"],
        "max_tokens": row["max_tokens"],
        "created_at": _iso(row["submitted_at"]),
        "started_at": _iso(row["started_at"]),
        "completed_at": _iso(row["completed_at"]),
        "booked_at": _iso(row["booked_at"]),
        "output": {"text": row["output_text"], "finish_reason": row["finish_reason"]}
        if done
        else None,
        "usage": _usage(row),
        "timings": {
            "queue_ms": _ms(row["queue_ms"]),
            "ttft_ms": _ms(row["ttft_ms"]),
            "total_ms": _ms(row["e2e_ms"]),
        }
        if done
        else None,
        "energy": {
            "joules": money(row["energy_j"]),
            "joules_per_token": money(
                joules_per_token(row["energy_j"], row["prompt_tokens"] + row["completion_tokens"])
            ),
            "meter": row["meter"],
            "estimated": row["energy_estimated"],
        }
        if done
        else None,
        # What the customer is charged. What it cost us to make, and so our margin, is the
        # operator's business: it stays in the ledger's books.
        "billing": {
            "revenue": money(row["revenue"]),
            "currency": row["currency"],
        }
        if row["booked_at"] is not None
        else None,
        "error": row["error"],
    }


def chat_completion(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{row['request_id']}",
        "object": "chat.completion",
        "created": int(row["submitted_at"].timestamp()),
        "model": row["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": row["output_text"]},
                "logprobs": None,
                "finish_reason": row["finish_reason"],
            }
        ],
        "usage": _usage(row),
    }


def text_completion(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": f"cmpl-{row['request_id']}",
        "object": "text_completion",
        "created": int(row["submitted_at"].timestamp()),
        "model": row["model"],
        "choices": [
            {
                "index": 0,
                "text": row["output_text"],
                "logprobs": None,
                "finish_reason": row["finish_reason"],
            }
        ],
        "usage": _usage(row),
    }
