"""Runs jobs on the model one at a time and meters each one's energy and device time."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime

from tokenmill.events import EnergyReading, JobCompleted, JobFailed, JobSubmitted, utc_now
from tokenmill.meters import Meter
from tokenmill.money import to_decimal
from tokenmill.worker.model import ModelRunner, SamplingParams


class JobAbandoned(Exception):
    """The job was stopped between two tokens; it has no outcome and nothing is published."""


def elapsed_ms(start: datetime, end: datetime) -> float:
    return max(0.0, (end - start).total_seconds() * 1000)


class Engine:
    """One job at a time: the energy counted between a job's start and end is that job's alone.

    The continuous-batching engine replaces this and splits each step's energy across the
    requests in the step.
    """

    def __init__(self, runner: ModelRunner, meter: Meter, worker: str):
        self.runner = runner
        self.meter = meter
        self.worker = worker
        self._busy = threading.Lock()

    def run(
        self, job: JobSubmitted, stop: threading.Event | None = None
    ) -> JobCompleted | JobFailed:
        """Run `job` to a JobCompleted, or to a JobFailed when the model cannot take it.

        Setting `stop` (from another thread) abandons the job after its current token with
        JobAbandoned: the worker lost the job to another, or is shutting down.
        """
        messages = [m.model_dump() for m in job.messages] if job.messages else None
        try:
            prompt_ids = self.runner.encode(job.prompt, messages)
            params = SamplingParams(
                max_tokens=job.max_tokens,
                temperature=job.temperature,
                top_p=job.top_p,
                stop=job.stop,
                seed=job.seed,
            )
            with self._busy:
                started_at = utc_now()
                energy_before_j = self.meter.energy_j()
                generation = self.runner.generate(prompt_ids, params, _stopper(stop))
                energy_after_j = self.meter.energy_j()
                finished_at = utc_now()
        except ValueError as exc:
            # The model refuses this input (a prompt that fills its whole context, say):
            # retrying cannot help, so the job fails and is never billed.
            return self.failed(job, str(exc))
        assert energy_after_j >= energy_before_j, "meters count up"
        assert generation.completion_tokens <= job.max_tokens, generation
        queue_ms = elapsed_ms(job.occurred_at, started_at)
        return JobCompleted(
            **job.envelope_for("worker"),
            occurred_at=finished_at,
            tier=job.tier,
            submitted_at=job.occurred_at,
            worker=self.worker,
            model=self.runner.name,
            device=self.runner.device,
            prompt=job.prompt,
            messages=job.messages,
            max_tokens=job.max_tokens,
            text=generation.text,
            finish_reason=generation.finish_reason,
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            queue_ms=queue_ms,
            ttft_ms=queue_ms + generation.ttft_s * 1000,
            generation_ms=generation.generation_s * 1000,
            e2e_ms=elapsed_ms(job.occurred_at, finished_at),
            compute_s=to_decimal(round(generation.generation_s, 6)),
            energy=EnergyReading(
                energy_j=energy_after_j - energy_before_j,
                meter=self.meter.name,
                estimated=self.meter.estimated,
            ),
        )

    def failed(self, job: JobSubmitted, reason: str) -> JobFailed:
        return JobFailed(
            **job.envelope_for("worker"),
            worker=self.worker,
            reason=reason,
        )


def _stopper(stop: threading.Event | None) -> Callable[[int], None] | None:
    """An `on_token` hook that aborts the generation once `stop` is set."""
    if stop is None:
        return None

    def check(_token: int) -> None:
        if stop.is_set():
            raise JobAbandoned("stopped between tokens")

    return check
