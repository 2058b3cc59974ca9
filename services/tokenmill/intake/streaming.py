"""Answers streamed as server-sent events, in OpenAI's format, from the workers' token deltas.

One reader per intake process (`TokenFollower`) follows the token stream of every answer being
streamed with a single blocking XREAD over all of them, and hands each entry to its stream's
queue: an intake holds one Redis connection for its streams, not one per client. Each SSE
answer (`events`) turns entries into chunks: the role, the text as it comes, the finish reason,
the usage when asked for, then `[DONE]`. A job that finished before its stream began (an
Idempotency-Key replay) is answered from its record; so is one whose end marker never came
(Redis lost it, or the job failed before a worker could stream it), which the stream notices
by reading the record when no entry came for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis.asyncio import Redis as RedisClient
from redis.exceptions import RedisError

from tokenmill import tokenstream
from tokenmill.intake import views
from tokenmill.outage import OutageBackoff, stop_if_cancelled
from tokenmill.settings import Settings
from tokenmill.tokenstream import End, Entry, Text

log = logging.getLogger(__name__)

# How long the shared XREAD blocks: a stream that begins waits at most this for its first read.
BLOCK_MS = 100
# Entries taken per stream and read.
READ_COUNT = 256
# With no entry for this long, a stream reads the job's record (has it ended without a marker?).
RECORD_CHECK_S = 2.0
FINISHED = ("completed", "failed", "cancelled")


class TooManyStreams(Exception):
    """This intake streams `streams_open_max` answers already."""


@dataclass
class _Follow:
    queue: asyncio.Queue[Entry] = field(default_factory=asyncio.Queue)
    last_id: bytes | str = "0-0"


class TokenFollower:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Its own client: a blocking read holds its connection while it waits.
        self._redis = RedisClient.from_url(settings.redis_url)
        self._follows: dict[str, _Follow] = {}
        self._changed = asyncio.Event()

    @property
    def open(self) -> int:
        return len(self._follows)

    @contextlib.contextmanager
    def follow(self, request_id: str):
        """The queue of `request_id`'s entries from the start of its stream, while the block
        runs. Raises TooManyStreams at the intake's bound."""
        key = tokenstream.tokens_key(self.settings.stream_prefix, request_id)
        if len(self._follows) >= self.settings.streams_open_max:
            raise TooManyStreams(f"{len(self._follows)} answers are streaming from this intake")
        assert key not in self._follows, f"{request_id} is streamed twice by one intake"
        follow = self._follows[key] = _Follow()
        self._changed.set()
        try:
            yield follow.queue
        finally:
            del self._follows[key]

    async def run(self) -> None:
        backoff = OutageBackoff.configured("token streams", self.settings)
        try:
            while True:
                if not self._follows:
                    self._changed.clear()
                    await self._changed.wait()
                    continue
                streams = {key: f.last_id for key, f in self._follows.items()}
                try:
                    found = await self._redis.xread(streams, count=READ_COUNT, block=BLOCK_MS)
                    backoff.answered()
                except RedisError as exc:
                    stop_if_cancelled()
                    await backoff.failed(exc)
                    continue
                for key, entries in found:
                    follow = self._follows.get(key.decode())
                    for entry_id, fields in entries if follow is not None else ():
                        follow.last_id = entry_id
                        follow.queue.put_nowait(tokenstream.decode(fields))
        finally:
            await self._redis.aclose()


@dataclass(frozen=True)
class Answer:
    """What one SSE answer needs from the route."""

    row: asyncpg.Record  # The job's record when the stream began.
    include_usage: bool
    read_record: Callable[[], Awaitable[asyncpg.Record]]
    # Called when the client hangs up before the end.
    on_hang_up: Callable[[], None] | None


def sse(data: dict[str, Any] | str) -> str:
    body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {body}\n\n"


async def events(answer: Answer, follower: TokenFollower, idle_s: float) -> AsyncIterator[str]:
    """The answer's events, as `text/event-stream` lines."""
    chunks = views.Chunks(answer.row, answer.include_usage)
    text = Text()
    row = answer.row
    try:
        first = chunks.first()
        if first is not None:
            yield sse(first)
        if row["status"] not in FINISHED:
            try:
                with follower.follow(row["request_id"]) as queue:
                    async for new in _follow(queue, text, answer.read_record, idle_s):
                        yield sse(chunks.text(new))
            except TooManyStreams as exc:
                # Others began streaming since the route checked: the job runs on regardless.
                message = f"{exc}; read the job at /v1/jobs/{row['request_id']}"
                yield sse(views.stream_error("too_many_streams", message))
                yield sse("[DONE]")
                return
            if text.end is None:
                row = await answer.read_record()
        for event in _ending(chunks, text, row):
            yield sse(event)
        yield sse("[DONE]")
    except (asyncio.CancelledError, GeneratorExit):
        # The server stops a response whose client went away (Starlette cancels it, or
        # closes the generator): the client hung up before the end. A failure of our own
        # (an exception) is not the client's doing and stops nothing.
        if answer.on_hang_up is not None and text.end is None:
            answer.on_hang_up()
        raise


async def _follow(
    queue: asyncio.Queue[Entry],
    text: Text,
    read_record: Callable[[], Awaitable[asyncpg.Record]],
    idle_s: float,
) -> AsyncIterator[str]:
    """The new text of each entry until the end marker, the job's record says it ended, or
    nothing came for `idle_s` (then the text stops where it is)."""
    loop = asyncio.get_running_loop()
    heard_s = loop.time()
    while text.end is None:
        idle_left_s = heard_s + idle_s - loop.time()
        try:
            async with asyncio.timeout(max(0.0, min(RECORD_CHECK_S, idle_left_s))):
                entry = await queue.get()
        except TimeoutError:
            if (await read_record())["status"] in FINISHED or idle_left_s <= RECORD_CHECK_S:
                return
            continue
        heard_s = loop.time()
        new = text.take(entry)
        if new:
            yield new


def _ending(chunks: views.Chunks, text: Text, row: asyncpg.Record) -> list[dict[str, Any]]:
    """The last chunks: the rest of the text, the finish reason and the usage, from the end
    marker, else from the job's record; an error chunk for a job that failed or did not end
    in time."""
    end = text.end
    if end is None:
        if row["status"] not in FINISHED:
            return [
                views.stream_error(
                    "timeout",
                    f"job {row['request_id']} is still {row['status']}; it will complete and "
                    f"can be read at /v1/jobs/{row['request_id']}",
                )
            ]
        if row["output_text"] is None:
            reason = "cancelled" if row["status"] == "cancelled" else None
            end = End(0, "", reason, error=row["error"] or "the job failed")
        else:
            end = End(
                0,
                row["output_text"],
                row["finish_reason"],
                row["prompt_tokens"],
                row["completion_tokens"],
                row["cached_prompt_tokens"] or 0,
            )
    if end.finish_reason is None:
        return [views.stream_error("generation_failed", end.error or "the job failed")]
    rest = text.take(end)
    out = [chunks.text(rest)] if rest else []
    out.append(chunks.finish(end.finish_reason))
    if chunks.include_usage:
        out.append(chunks.usage(end.prompt_tokens, end.completion_tokens, end.cached_tokens))
    return out
