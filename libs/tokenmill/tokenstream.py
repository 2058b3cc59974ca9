"""Token deltas from a worker to the intakes, and cancel signals from the intakes to workers.

Neither is an event of the contract: they carry nothing the books read (a completion is billed
from its signed `job.completed`), so they are not signed, logged or kept. Both are bounded:

- `<prefix>.tokens.<request_id>`: one Redis stream per request. Each entry is a text delta
  (`o`: its offset in the answer's text, `d`: the text) or the end marker (`end`: JSON with the
  rest of the final text, finish reason and usage, or the error). A worker writes every
  request of an engine step in one pipelined round trip; each stream is capped at
  `token_stream_entries_max` entries and expires `token_stream_ttl_s` after its last write.
  Offsets make readers indifferent to duplicates: a job re-run after a worker died writes its
  text again from offset 0, and a reader takes only what lies past what it already has.
- `<prefix>.cancelled.<request_id>`: a key an intake sets when a job is cancelled, checked by the
  worker that picks the job up (it then does not run it); expires after `cancel_keep_s`.
- `<prefix>.cancels`: a stream, capped at `cancel_stream_entries_max`, that every worker
  follows (XREAD, no group: each worker sees each entry); an entry `cancel: <request_id>` stops
  that request on the worker that holds it, within one engine step.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from redis.asyncio import Redis as RedisClient
from redis.asyncio.client import Pipeline

from tokenmill.settings import Settings


def tokens_key(prefix: str, request_id: str) -> str:
    return f"{prefix}.tokens.{request_id}"


def cancelled_key(prefix: str, request_id: str) -> str:
    return f"{prefix}.cancelled.{request_id}"


def cancels_key(prefix: str) -> str:
    return f"{prefix}.cancels"


@dataclass(frozen=True)
class Delta:
    offset: int  # Characters of the answer before this text.
    text: str


@dataclass(frozen=True)
class End:
    """How a request ended: `text` is the final answer's rest past `offset`, which the deltas
    before it already carried. `error` is set, and the counts are 0, when it produced nothing
    billable (it failed, or was cancelled before its first token)."""

    offset: int
    text: str
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


Entry = Delta | End


def encode(entry: Entry) -> dict[str, str]:
    if isinstance(entry, Delta):
        return {"o": str(entry.offset), "d": entry.text}
    return {"end": json.dumps(asdict(entry), separators=(",", ":"))}


def decode(fields: dict[bytes, bytes]) -> Entry:
    if b"end" in fields:
        return End(**json.loads(fields[b"end"]))
    return Delta(int(fields[b"o"]), fields[b"d"].decode())


def add(pipe: Pipeline, settings: Settings, request_id: str, entries: list[Entry]) -> None:
    """Queue `entries` for one request's stream on `pipe`, bounded and expiring."""
    key = tokens_key(settings.stream_prefix, request_id)
    for entry in entries:
        pipe.xadd(key, encode(entry), maxlen=settings.token_stream_entries_max, approximate=True)
    pipe.expire(key, int(settings.token_stream_ttl_s))


class Text:
    """A reader's copy of an answer assembled from entries in any order or repetition: only
    text past what it holds is taken."""

    def __init__(self) -> None:
        self.text = ""
        self.end: End | None = None

    def take(self, entry: Entry) -> str:
        """Apply `entry`; return the text it adds."""
        if isinstance(entry, End):
            self.end = entry
        if entry.offset > len(self.text):
            # Entries trimmed away (a stream past its cap): the gap cannot be filled from here.
            return ""
        new = entry.text[len(self.text) - entry.offset :]
        self.text += new
        return new


async def partial_text(redis: RedisClient, settings: Settings, request_id: str) -> str:
    """The text a running request has streamed so far (empty when nothing is there)."""
    key = tokens_key(settings.stream_prefix, request_id)
    text = Text()
    for _, fields in await redis.xrange(key, count=settings.token_stream_entries_max):
        text.take(decode(fields))
    return text.text


async def request_cancel(redis: RedisClient, settings: Settings, request_id: str) -> None:
    """Tell the workers, in one round trip: the one that picks the job up skips it, the one
    running it stops it."""
    prefix = settings.stream_prefix
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(cancelled_key(prefix, request_id), b"1", ex=int(settings.cancel_keep_s))
        pipe.xadd(
            cancels_key(prefix),
            {"cancel": request_id},
            maxlen=settings.cancel_stream_entries_max,
            approximate=True,
        )
        await pipe.execute()


async def cancel_requested(redis: RedisClient, settings: Settings, request_id: str) -> bool:
    return bool(await redis.exists(cancelled_key(settings.stream_prefix, request_id)))
