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


def openai_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _openai_usage(row: asyncpg.Record) -> dict[str, Any] | None:
    if row["prompt_tokens"] is None:
        return None
    cached = row["cached_prompt_tokens"] or 0
    return openai_usage(row["prompt_tokens"], row["completion_tokens"], cached)


def _output(row: asyncpg.Record, done: bool, partial: str | None) -> dict[str, Any] | None:
    if done:
        return {"text": row["output_text"], "finish_reason": row["finish_reason"]}
    if partial is not None:
        return {"text": partial, "finish_reason": None}
    return None


def job(row: asyncpg.Record, partial: str | None = None) -> dict[str, Any]:
    """The job as its customer sees it; `partial` is the text a running job has streamed."""
    # A cancelled job shows what it made, if it made anything.
    done = row["status"] == "completed" or (
        row["status"] == "cancelled" and row["output_text"] is not None
    )
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
        "output": _output(row, done, partial),
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
        "cancel_requested_at": _iso(row["cancel_requested_at"]),
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
        "usage": _openai_usage(row),
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
        "usage": _openai_usage(row),
    }


class Chunks:
    """The chunks of one streamed answer, in OpenAI's shapes: `chat.completion.chunk` for chat,
    `text_completion` for completions. With `include_usage`, every chunk carries `usage: null`
    and a last chunk with no choices carries the usage, as OpenAI's do."""

    def __init__(self, row: asyncpg.Record, include_usage: bool) -> None:
        self.chat = row["api"] == "chat"
        self.include_usage = include_usage
        prefix, kind = (
            ("chatcmpl", "chat.completion.chunk") if self.chat else ("cmpl", "text_completion")
        )
        self._head = {
            "id": f"{prefix}-{row['request_id']}",
            "object": kind,
            "created": int(row["submitted_at"].timestamp()),
            "model": row["model"],
        }

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {**self._head, "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _choice(self, text: str | None, finish_reason: str | None, role: bool = False):
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    def first(self) -> dict[str, Any] | None:
        """Chat's first chunk says who speaks; completions have none."""
        return self._chunk([self._choice(None, None, role=True)]) if self.chat else None

    def text(self, text: str) -> dict[str, Any]:
        return self._chunk([self._choice(text, None)])

    def finish(self, finish_reason: str) -> dict[str, Any]:
        return self._chunk([self._choice(None, finish_reason)])

    def usage(self, prompt_tokens: int, completion_tokens: int, cached: int) -> dict[str, Any]:
        return {
            **self._head,
            "choices": [],
            "usage": openai_usage(prompt_tokens, completion_tokens, cached),
        }


def stream_error(code: str, message: str) -> dict[str, Any]:
    """An error after the stream began, as OpenAI sends one (its clients raise it)."""
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
