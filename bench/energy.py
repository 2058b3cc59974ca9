"""`make bench-energy`: what per-step energy attribution costs, and the default model's J/token.

1. Attribution overhead: the energy account's work around one engine step (two meter readings,
   the locks, the token-weighted split across a batch as large as the concurrency) timed over
   `--repeats` repetitions, beside the mean engine step time of that concurrency's run.
2. J/token of the default model (SmolLM2-135M, CPU) by the process-aware modelled meter, with
   `--concurrency` requests (default 1 and 32) submitted at once to the worker's EngineService,
   each generating up to `--output-tokens`: joules per token (prompt + completion, as GET
   /v1/jobs/{id} shows it) and per output token, with the share of the metered energy that was
   idle.
3. The invariant's measured error over each run: |Σ completions' J + idle J + unbilled J -
   metered J| / metered J.

The modelled meter is an estimate (TDP x this process's CPU utilisation); no GPU, no NVML here.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from decimal import Decimal
from pathlib import Path

from tokenmill.events import ChatMessage, JobCompleted, JobSubmitted
from tokenmill.meters import ModelledCpuMeter
from tokenmill.settings import Settings
from tokenmill.worker.engine import BatchEngine, StepOutput
from tokenmill.worker.main import engine_config
from tokenmill.worker.model import ModelRunner
from tokenmill.worker.serving import EngineService

TOPICS = ("a lighthouse", "bread", "rivers", "a robot painter", "chess", "the moon", "the sky")


def job(index: int, output_tokens: int) -> JobSubmitted:
    return JobSubmitted(
        producer="bench",
        customer_id="cus_bench",
        request_id=f"r{index}",
        region="eu-west",
        tier="standard",
        model="smollm2",
        messages=[
            ChatMessage(role="user", content=f"Write a long essay about {TOPICS[index % 7]}.")
        ],
        max_tokens=output_tokens,
        temperature=0.0,
    )


async def run_concurrent(
    service: EngineService, concurrency: int, requests: int, output_tokens: int
) -> dict:
    """`requests` requests, `concurrency` at a time (a closed loop: each lane submits its next
    request when its last one completed)."""

    async def lane(first: int) -> list:
        return [
            await service.run(job(i, output_tokens)) for i in range(first, requests, concurrency)
        ]

    service.energy.close_interval()
    lanes = await asyncio.gather(*(lane(i) for i in range(concurrency)))
    interval = service.energy.close_interval()
    done = [o for outcomes in lanes for o in outcomes if isinstance(o, JobCompleted)]
    assert len(done) == requests, "every request completes"
    t = interval.totals
    billed_j = sum((o.energy.energy_j for o in done), Decimal(0))
    tokens = sum(o.prompt_tokens + o.completion_tokens for o in done)
    output = sum(o.completion_tokens for o in done)
    error = abs(billed_j + t.idle_j + t.unbilled_j - t.metered_j) / t.metered_j
    return {
        "concurrency": concurrency,
        "requests": requests,
        "seconds": interval.seconds,
        "metered_j": t.metered_j,
        "idle_share": t.idle_j / t.metered_j,
        "j_per_token": billed_j / tokens,
        "j_per_output_token": billed_j / output,
        "tokens": tokens,
        "output_tokens": output,
        "steps": t.steps,
        "step_ms": t.busy_s / t.steps * 1000,
        "invariant_error": error,
    }


def attribution_overhead_s(service: EngineService, batch: int, repeats: int) -> float:
    """Mean seconds of the account's and the split's work around one step of `batch` requests,
    without the step itself (the outputs are made up; none is finished)."""
    outputs = [StepOutput(f"r{i}", 1, (1,), "x", None) for i in range(batch)]
    energy = service.energy
    started_s = time.perf_counter()
    for _ in range(repeats):
        energy.step_started()
        energy_j = energy.step_finished(batch)
        with service._lock:
            service._split(outputs, energy_j, 0.01)
    return (time.perf_counter() - started_s) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument(
        "--requests", type=int, default=8, help="per concurrency: at least this many (8)"
    )
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    settings = Settings.from_env()
    cache = Path(settings.model_cache_dir or Path.home() / ".cache/tokenmill/models")
    runner = ModelRunner.load("smollm2", cache, "cpu")
    engine = BatchEngine(runner, engine_config(settings))
    meter = ModelledCpuMeter(settings.cpu_tdp_w, settings.cpu_idle_w)
    service = EngineService(engine, meter, "bench")
    try:
        print(f"meter {meter.name} (estimated): {settings.cpu_idle_w}-{settings.cpu_tdp_w} W")
        rows = [
            asyncio.run(run_concurrent(service, c, max(c, args.requests), args.output_tokens))
            for c in args.concurrency
        ]
        for r in rows:
            print(
                f"concurrency {r['concurrency']:>3} ({r['requests']} requests): "
                f"{r['j_per_token']:.4f} J/token "
                f"({r['j_per_output_token']:.4f} J/output token), {r['metered_j']:.1f} J metered "
                f"over {r['seconds']:.1f} s, {r['idle_share'] * 100:.1f} % idle, "
                f"{r['steps']} steps of {r['step_ms']:.1f} ms, "
                f"invariant error {float(r['invariant_error']):.1e}"
            )
        for r in rows:
            overhead_s = attribution_overhead_s(service, r["concurrency"], args.repeats)
            print(
                f"attribution per step of {r['concurrency']} requests: "
                f"{overhead_s * 1e6:.1f} µs, {overhead_s * 1000 / r['step_ms'] * 100:.3f} % of "
                f"its {r['step_ms']:.1f} ms engine step"
            )
    finally:
        service.close()


if __name__ == "__main__":
    main()
