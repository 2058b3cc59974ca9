"""Streams each running request's text to the intakes, one Redis round trip per engine step.

The engine thread hands every step's outputs to the event loop (`on_step`, one thread hop per
step). The loop turns them into each request's visible text and queues it; one writer task
sends everything queued in one pipeline (see `tokenmill.tokenstream`). While a write is in
flight further steps are merged per request, so a slow Redis delays the deltas but never
queues more than one entry per request, nor more round trips than steps.

A request with stop strings streams the text the final answer will have: text that ends inside
what could still become a stop string is held back until the next token settles it, and a stop
string is never sent. The end marker carries the rest of the final answer (the engine decodes
it whole), its finish reason and usage, once the job's outcome is known.

Deltas are best effort: when Redis fails the batch is dropped (logged at most once an outage
interval, and the writer backs off) and readers get the text from the end marker or, failing
that, from the intake's record of the completion.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from redis.asyncio import Redis as RedisClient
from redis.exceptions import RedisError

from tokenmill import tokenstream
from tokenmill.events import JobCompleted, JobFailed, JobSubmitted
from tokenmill.outage import OutageBackoff, stop_if_cancelled
from tokenmill.settings import Settings
from tokenmill.tokenstream import Delta, End, Entry
from tokenmill.worker.engine import StepOutput
from tokenmill.worker.model import first_stop
from tokenmill.worker.serving import CANCELLED_BEFORE_OUTPUT

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    stop: tuple[str, ...]
    raw: str = ""  # Every delta the engine released, stop strings included.
    sent: int = 0  # Characters of `raw` queued for the stream so far.
    pending: list[Entry] = field(default_factory=list)


def visible(raw: str, stop: tuple[str, ...]) -> str:
    """The part of `raw` certain to be in the final answer: cut before a stop string, and
    without a tail that could be the start of one."""
    cut = first_stop(raw, stop)
    if cut is not None:
        return raw[:cut]
    held = max((n for s in stop for n in range(1, len(s)) if raw.endswith(s[:n])), default=0)
    return raw[: len(raw) - held]


class DeltaPublisher:
    def __init__(self, redis: RedisClient, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self._loop = asyncio.get_running_loop()
        self._streams: dict[str, _Stream] = {}
        self._ready = asyncio.Event()
        self._backoff = OutageBackoff.configured("token deltas", settings)

    def open(self, job: JobSubmitted) -> None:
        """Stream `job` from now on (the worker is about to run it)."""
        self._streams[job.request_id] = _Stream(job.stop)

    def forget(self, request_id: str) -> None:
        """Stream nothing more for a job given up unfinished (another worker runs it)."""
        self._streams.pop(request_id, None)

    def on_step(self, outputs: list[StepOutput]) -> None:
        """Called on the engine thread: hand the step's text to the loop."""
        deltas = [(o.request_id, o.text_delta) for o in outputs if o.text_delta]
        if deltas:
            self._loop.call_soon_threadsafe(self._take, deltas)

    def finish(self, request_id: str, outcome: JobCompleted | JobFailed) -> None:
        """Queue the end marker with the job's outcome; the stream is done."""
        stream = self._streams.get(request_id)
        if stream is None:
            return
        if isinstance(outcome, JobFailed):
            # Stopped before its first token: cancelled, not failed, though nothing is billed.
            reason = "cancelled" if outcome.reason == CANCELLED_BEFORE_OUTPUT else None
            end = End(stream.sent, "", reason, error=outcome.reason)
        else:
            sent = stream.raw[: stream.sent]
            if not outcome.text.startswith(sent):
                log.warning("%s: the final text differs from what was streamed", request_id)
            rest = outcome.text[stream.sent :] if outcome.text.startswith(sent) else ""
            end = End(
                stream.sent,
                rest,
                outcome.finish_reason,
                outcome.prompt_tokens,
                outcome.completion_tokens,
                outcome.cached_prompt_tokens,
            )
        stream.pending.append(end)
        self._ready.set()

    def _take(self, deltas: list[tuple[str, str]]) -> None:
        for request_id, text in deltas:
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            stream.raw += text
            shown = visible(stream.raw, stream.stop)
            if len(shown) <= stream.sent:
                continue
            new = shown[stream.sent :]
            last = stream.pending[-1] if stream.pending else None
            if isinstance(last, Delta):
                # Not sent yet: one entry per request per round trip, however many steps ran.
                stream.pending[-1] = Delta(last.offset, last.text + new)
            else:
                stream.pending.append(Delta(stream.sent, new))
            stream.sent = len(shown)
        self._ready.set()

    async def run(self) -> None:
        """Write what is queued, one pipeline at a time, until cancelled."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            batch = {rid: s.pending for rid, s in self._streams.items() if s.pending}
            for request_id, entries in batch.items():
                self._streams[request_id].pending = []
                if isinstance(entries[-1], End):
                    del self._streams[request_id]
            if batch:
                await self._write(batch)

    async def _write(self, batch: dict[str, list[Entry]]) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for request_id, entries in batch.items():
                    tokenstream.add(pipe, self.settings, request_id, entries)
                await pipe.execute()
            self._backoff.answered()
        except RedisError as exc:
            # Dropped, not retried: the completion itself travels as a signed event. Steps
            # that come meanwhile are merged into the next write.
            stop_if_cancelled()
            await self._backoff.failed(exc)
