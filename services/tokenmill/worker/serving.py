"""Runs the batching engine on its own thread and turns jobs into completions.

The event loop hands jobs in (`run`, awaited by each job's handler) and the engine thread steps
the engine while it has work, resolving each job's future when its request finishes. Cancelling
the awaiting task cancels the request within one step.

Energy: the meter is read around every step (`worker/energy.py`, the energy account, which
also says why prefill and decode tokens weigh the same), and a step's joules are split across
the requests in that step in proportion to the tokens each had in it (a prompt chunk counts its
tokens, a decode counts one). Energy used while no step runs is idle energy, billed to no
request and booked as factory overhead. Device time (`compute_s`) is split the same way. The
last request of a step takes the remainder, so a step's shares add up to exactly what was
metered; the energy of a request cancelled or given up meanwhile is counted as unbilled.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from tokenmill.events import EnergyReading, JobCompleted, JobFailed, JobSubmitted, utc_now
from tokenmill.meters import Meter
from tokenmill.money import joules_per_token, to_decimal
from tokenmill.worker.energy import EnergyAccount
from tokenmill.worker.engine import BatchEngine, Request, StepOutput
from tokenmill.worker.metrics import WorkerMetrics, add_step_tokens
from tokenmill.worker.model import SamplingParams

log = logging.getLogger(__name__)

# Why a job stopped before its first token is not billed: it produced nothing.
CANCELLED_BEFORE_OUTPUT = "cancelled before it produced a token"


def elapsed_ms(start: datetime, end: datetime) -> float:
    return max(0.0, (end - start).total_seconds() * 1000)


@dataclass
class _Job:
    job: JobSubmitted
    prompt_ids: list[int]
    params: SamplingParams
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    handed_at: datetime  # Wall clock when the worker handed the job to the engine.
    handed_s: float  # The same moment on the engine's clock.
    energy_j: Decimal = Decimal(0)
    compute_s: float = 0.0
    request: Request | None = field(default=None, repr=False)
    step_runs: list[list[int]] = field(default_factory=list)  # JobCompleted.step_tokens.

    def resolve(self, outcome: JobCompleted | JobFailed) -> None:
        self.loop.call_soon_threadsafe(_set_result, self.future, outcome)


def _set_result(future: asyncio.Future, outcome: object) -> None:
    if not future.done():
        future.set_result(outcome)


def _set_exception(future: asyncio.Future, exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)


class EngineFailed(Exception):
    """An engine step raised; the job was dropped from the engine and can be retried."""


class EngineService:
    """The engine behind a thread, with at most `capacity` jobs in hand at once."""

    def __init__(
        self,
        engine: BatchEngine,
        meter: Meter,
        worker: str,
        on_step: Callable[[list[StepOutput]], None] | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics if metrics is not None else WorkerMetrics(engine)
        self.meter = meter
        self.energy = EnergyAccount(meter)
        self.worker = worker
        config = engine.config
        self.capacity = config.running_max + config.waiting_max
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: deque[_Job] = deque()
        self._cancels: list[str] = []
        self._stops: list[str] = []
        # Called on the engine thread with each step's outputs (the streamed text deltas),
        # before any job of that step is resolved.
        self.on_step = on_step
        self._jobs: dict[str, _Job] = {}
        self._tier_limits: dict[str, int] | None = None  # For the engine thread to apply.
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join()

    async def run(
        self, job: JobSubmitted, stop: asyncio.Event | None = None
    ) -> JobCompleted | JobFailed:
        """Run `job` to its JobCompleted, or to a JobFailed when the model cannot take it.

        Cancelling the caller stops the request within one engine step; nothing is published
        for it. Setting `stop` (its customer cancelled it) ends it within one engine step with
        an outcome: a JobCompleted "cancelled" with the tokens it made, or a JobFailed when it
        made none.
        """
        if stop is not None and stop.is_set():
            return self.failed(job, CANCELLED_BEFORE_OUTPUT)
        runner = self.engine.runner
        messages = [m.model_dump() for m in job.messages] if job.messages else None
        try:
            prompt_ids = await asyncio.to_thread(runner.encode, job.prompt, messages)
            params = SamplingParams(
                max_tokens=job.max_tokens,
                temperature=job.temperature,
                top_p=job.top_p,
                top_k=job.top_k,
                stop=job.stop,
                seed=job.seed,
            )
        except ValueError as exc:
            return self.failed(job, str(exc))
        loop = asyncio.get_running_loop()
        entry = _Job(
            job, prompt_ids, params, loop.create_future(), loop, utc_now(), time.perf_counter()
        )
        with self._lock:
            assert job.request_id not in self._jobs, f"{job.request_id} runs already"
            assert len(self._jobs) < self.capacity, "more jobs in hand than the engine holds"
            self._jobs[job.request_id] = entry
            self._inbox.append(entry)
        self._wake.set()
        try:
            if stop is None:
                return await entry.future
            return await self._until_stopped(entry, stop)
        except asyncio.CancelledError:
            with self._lock:
                self._cancels.append(job.request_id)
            self._wake.set()
            raise

    def limit_tiers(self, running_max: dict[str, int]) -> None:
        """Curtail tiers under the power cap (BatchEngine.limit_tiers), from the next step on."""
        with self._lock:
            self._tier_limits = dict(running_max)
        self._wake.set()

    async def _until_stopped(self, entry: _Job, stop: asyncio.Event) -> JobCompleted | JobFailed:
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({entry.future, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not entry.future.done():
                with self._lock:
                    self._stops.append(entry.job.request_id)
                self._wake.set()
            return await entry.future
        finally:
            stopping.cancel()

    def holds(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._jobs

    def failed(self, job: JobSubmitted, reason: str) -> JobFailed:
        return JobFailed(**job.envelope_for("worker"), worker=self.worker, reason=reason)

    # --- the engine thread ---

    def _loop(self) -> None:
        while not self._closed:
            self._take_inbox()
            if not self.engine.has_work:
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                self._step()
            except Exception as exc:
                # A bug in one step must not strand every job in hand. Their handlers fail
                # without acknowledging, so each job is retried (here or on another worker)
                # and after max_deliveries fails visibly, as any failing handler's would.
                log.exception("engine step failed; giving back every job in hand")
                self._give_back_all(exc)

    def _take_inbox(self) -> None:
        with self._lock:
            if self._tier_limits is not None:
                self.engine.limit_tiers(self._tier_limits)
                self._tier_limits = None
            for request_id in self._cancels:
                self.engine.cancel(request_id)
                cancelled = self._jobs.pop(request_id, None)
                if cancelled is not None:
                    self.energy.unbilled(cancelled.energy_j)
            self._cancels.clear()
            for request_id in self._stops:
                entry = self._jobs.pop(request_id, None)
                if entry is not None:
                    entry.resolve(self._stopped(entry))
            self._stops.clear()
            while self._inbox and self.engine.waiting_room > 0:
                entry = self._inbox.popleft()
                if entry.job.request_id not in self._jobs:
                    continue  # Cancelled before it reached the engine.
                self._add(entry)

    def _add(self, entry: _Job) -> None:
        job = entry.job
        try:
            entry.request = self.engine.add_request(
                job.request_id,
                entry.prompt_ids,
                entry.params,
                tier=job.tier,
                customer_id=job.customer_id,
                arrival_s=entry.handed_s,
            )
        except ValueError as exc:
            # The model refuses this input (no room for a completion, say): retrying cannot
            # help, so the job fails and is never billed.
            del self._jobs[job.request_id]
            entry.resolve(self.failed(job, str(exc)))

    def _step(self) -> None:
        self.energy.step_started()
        started_s = time.perf_counter()
        outputs = self.engine.step()
        duration_s = time.perf_counter() - started_s
        energy_j = self.energy.step_finished(sum(o.step_tokens for o in outputs))
        if self.on_step is not None:
            self.on_step(outputs)
        with self._lock:
            self._split(outputs, energy_j, duration_s)
            self.metrics.on_step(outputs, self._tier_of)
            for output in outputs:
                if output.finished is not None:
                    entry = self._jobs.pop(output.request_id, None)
                    if entry is not None:
                        completed = self._completed(entry, output.finished)
                        self.metrics.on_completed(completed)
                        entry.resolve(completed)

    def _tier_of(self, request_id: str) -> str | None:
        entry = self._jobs.get(request_id)
        return None if entry is None else entry.job.tier

    def _split(self, outputs: list[StepOutput], energy_j: Decimal, duration_s: float) -> None:
        tokens = sum(o.step_tokens for o in outputs)
        if not outputs:
            self.energy.unbilled(energy_j)
        given_j = Decimal(0)
        for index, output in enumerate(outputs):
            if index == len(outputs) - 1:
                share_j = energy_j - given_j
            else:
                share_j = energy_j * output.step_tokens / tokens
            given_j += share_j
            entry = self._jobs.get(output.request_id)
            if entry is not None:
                entry.energy_j += share_j
                entry.compute_s += duration_s * output.step_tokens / tokens
                add_step_tokens(entry.step_runs, output.step_tokens)
            else:
                self.energy.unbilled(share_j)

    def _give_back_all(self, exc: Exception) -> None:
        with self._lock:
            self.engine.abort_all()
            self.energy.step_failed(sum((e.energy_j for e in self._jobs.values()), Decimal(0)))
            for entry in self._jobs.values():
                entry.loop.call_soon_threadsafe(_set_exception, entry.future, EngineFailed(exc))
            self._jobs.clear()
            self._inbox.clear()

    def _stopped(self, entry: _Job) -> JobCompleted | JobFailed:
        """The outcome of a job stopped by its customer: what it made so far, billed."""
        # A job still in the inbox never reached the engine (and is skipped there).
        request = self.engine.stop(entry.job.request_id) if entry.request is not None else None
        if request is None or not request.output_ids:
            # Its prompt's share of energy reaches no completion: overhead, like a cancel's.
            self.energy.unbilled(entry.energy_j)
            return self.failed(entry.job, CANCELLED_BEFORE_OUTPUT)
        return self._completed(entry, request)

    def _completed(self, entry: _Job, request: Request) -> JobCompleted:
        job = entry.job
        assert request.admitted_s is not None and request.first_token_s is not None
        assert request.finished_s is not None and request.finish_reason is not None
        completion_tokens = len(request.output_ids)

        def since_handed_ms(moment_s: float) -> float:
            # From the job's submission to `moment_s` on the engine's clock.
            return elapsed_ms(job.occurred_at, entry.handed_at) + (moment_s - entry.handed_s) * 1000

        finished_at = utc_now()
        tpot_ms = None
        if completion_tokens > 1:
            decode_s = request.finished_s - request.first_token_s
            tpot_ms = decode_s * 1000 / (completion_tokens - 1)
        return JobCompleted(
            **job.envelope_for("worker"),
            occurred_at=finished_at,
            tier=job.tier,
            submitted_at=job.occurred_at,
            worker=self.worker,
            model=self.engine.runner.name,
            device=self.engine.runner.device,
            prompt=job.prompt,
            messages=job.messages,
            max_tokens=job.max_tokens,
            text=request.text,
            finish_reason=request.finish_reason,
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=completion_tokens,
            cached_prompt_tokens=request.cached_prompt_tokens or 0,
            queue_ms=since_handed_ms(request.admitted_s),
            ttft_ms=since_handed_ms(request.first_token_s),
            generation_ms=(request.finished_s - request.admitted_s) * 1000,
            e2e_ms=elapsed_ms(job.occurred_at, finished_at),
            compute_s=to_decimal(round(entry.compute_s, 6)),
            energy=EnergyReading(
                energy_j=entry.energy_j,
                meter=self.meter.name,
                estimated=self.meter.estimated,
                joules_per_token=joules_per_token(
                    entry.energy_j, len(request.prompt_ids) + completion_tokens
                ),
            ),
            tpot_ms=tpot_ms,
            preemptions=request.preemptions,
            step_tokens=tuple((tokens, steps) for tokens, steps in entry.step_runs),
        )
