"""`make bench-engine`: the batching engine in the style of `vllm bench serve`, beside
`transformers.generate` on the same prompts in the same run.

Every part drives a `BatchEngine` directly from this thread (no Redis, no HTTP), with greedy
decoding and a fixed seed for the prompts and the arrival times, so every run does the same work.
Times are on the engine's clock: a request's TTFT runs from its arrival (its scheduled arrival
under `--request-rate`, the moment a slot freed in a closed loop) to its first token, so queueing
in front of the engine counts; TPOT is the mean time between its later tokens. A request that ends
at EOS before `--output-tokens` counts the tokens it made.

Parts (`--parts`, all by default; each runs alone in a few minutes on two cores):

- `throughput`: at each `--concurrency` (closed loop: c requests in flight, a finished one
  replaced by the next, `--requests` in all; or open loop with `--request-rate`), output tokens/s,
  TTFT and TPOT p50/p90/p99, and goodput. Beside it, on the same prompts: `transformers.generate`
  one request at a time (on the first `--baseline-requests`), and as static padded batches of c
  (left padding; a batch admits nobody until its longest request ends).
- `prefix`: every prompt starts with one `--shared-prefix`-token system prompt; TTFT p50 one
  request at a time with prefix caching off and on (the first request fills the cache).
- `qos`: free requests arrive (Poisson) at `--qos-overload` times the requests/s the engine
  serves (measured first, closed loop at its running limit) while premium ones arrive every
  `--qos-premium-interval-s`; premium TTFT p99 beside premium TTFT p99 on an idle engine (the
  same premium arrivals alone); TTFT p50/p99 by tier.

Goodput is the requests per second that met their tier's objectives (TIER_SLOS): TTFT within the
tier's SLA objective from Settings (premium 2 s, standard 10 s; the ones that earn customers a
credit when missed), free 30 s; and TPOT within premium 200 ms, standard 500 ms, free 1 s. The
throughput part's requests are standard.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from bench.stats import percentile
from tokenmill.events import Tier
from tokenmill.settings import Settings
from tokenmill.worker.engine import BatchEngine, EngineConfig, Request
from tokenmill.worker.model import ModelRunner, SamplingParams

TOPICS = (
    "a lighthouse keeper",
    "the history of bread",
    "how rivers form",
    "a robot learning to paint",
    "the rules of chess",
    "a journey to the moon",
    "why the sky is blue",
    "a market in winter",
)
FILLER = "river stone lamp paper garden winter copper violin harbor meadow signal ladder".split()
_SETTINGS = Settings()
# Per tier: (TTFT objective ms, TPOT objective ms).
TIER_SLOS: dict[str, tuple[float, float]] = {
    "premium": (_SETTINGS.slo_ttft_ms_premium, 200.0),
    "standard": (_SETTINGS.slo_ttft_ms_standard, 500.0),
    "free": (30_000.0, 1000.0),
}


@dataclass
class Result:
    """What one run did, request by request."""

    wall_s: float
    done: list[Request] = field(default_factory=list)

    @property
    def output_tokens(self) -> int:
        return sum(len(r.output_ids) for r in self.done)

    @property
    def tokens_s(self) -> float:
        return self.output_tokens / self.wall_s

    def ttft_ms(self, tier: str | None = None) -> list[float]:
        return [_ttft_ms(r) for r in self.done if tier is None or r.tier == tier]

    def tpot_ms(self) -> list[float]:
        return [_tpot_ms(r) for r in self.done if len(r.output_ids) > 1]

    def goodput_s(self) -> float:
        good = 0
        for request in self.done:
            ttft_slo_ms, tpot_slo_ms = TIER_SLOS[request.tier]
            tpot_ok = len(request.output_ids) < 2 or _tpot_ms(request) <= tpot_slo_ms
            good += _ttft_ms(request) <= ttft_slo_ms and tpot_ok
        return good / self.wall_s


def _ttft_ms(request: Request) -> float:
    assert request.first_token_s is not None
    return (request.first_token_s - request.arrival_s) * 1000


def _tpot_ms(request: Request) -> float:
    assert request.finished_s is not None and request.first_token_s is not None
    return (request.finished_s - request.first_token_s) * 1000 / (len(request.output_ids) - 1)


def percentiles(values: list[float]) -> str:
    """p50/p90/p99 in one column (nearest rank)."""
    if not values:
        return "-"
    return "/".join(f"{percentile(values, q):.0f}" for q in (0.5, 0.9, 0.99))


# --- workloads ---


def prompts(
    runner: ModelRunner, count: int, input_tokens: int = 0, prefix_tokens: int = 0, seed: int = 0
) -> list[list[int]]:
    """`count` distinct chat prompts of about `input_tokens` tokens (at least the bare request),
    all starting with one system prompt `prefix_tokens` long when that is set."""
    rng = random.Random(seed)
    system = []
    if prefix_tokens:
        words = " ".join(f"rule {i}: be brief." for i in range(prefix_tokens))
        text = runner.tokenizer.decode(runner.encode(words, None)[:prefix_tokens])
        system = [{"role": "system", "content": text}]
    batch = []
    for index in range(count):
        ask = f"Request {index}. Write a long essay about {TOPICS[index % len(TOPICS)]}."
        ids = runner.encode(None, system + [{"role": "user", "content": ask}])
        filler = max(0, input_tokens - len(ids))
        if filler:
            words = " ".join(rng.choice(FILLER) for _ in range(filler))
            ask = f"{words}. {ask}"
            ids = runner.encode(None, system + [{"role": "user", "content": ask}])
        batch.append(ids)
    return batch


def poisson_arrivals_s(rate_s: float, count: int, rng: random.Random) -> list[float]:
    offsets_s, at_s = [], 0.0
    for _ in range(count):
        at_s += rng.expovariate(rate_s)
        offsets_s.append(at_s)
    return offsets_s


# --- the engine ---


def run_engine(
    engine: BatchEngine,
    batch: list[list[int]],
    params: SamplingParams,
    concurrency: int = 0,
    arrivals_s: list[float] | None = None,
    tiers: list[Tier] | None = None,
    until_tier_done: Tier | None = None,
) -> Result:
    """Closed loop at `concurrency`, or open loop at the offsets `arrivals_s`. An arrival the
    engine's waiting queue has no room for waits here, in order, as a job waits in Redis in
    front of a full worker. With `until_tier_done`, stop once every request of that tier ended."""
    assert (concurrency > 0) != (arrivals_s is not None)
    tiers = tiers or ["standard"] * len(batch)
    pending = deque(range(len(batch)))
    watched = sum(t == until_tier_done for t in tiers)
    result = Result(wall_s=0.0)
    started_s = time.perf_counter()
    in_flight = 0
    while pending or engine.has_work:
        now_s = time.perf_counter()
        while pending and engine.waiting_room > 0:
            index = pending[0]
            if arrivals_s is None and in_flight >= concurrency:
                break
            arrival_s = now_s if arrivals_s is None else started_s + arrivals_s[index]
            if arrival_s > now_s:
                break
            pending.popleft()
            engine.add_request(f"r{index}", batch[index], params, tiers[index], arrival_s=arrival_s)
            in_flight += 1
        if not engine.has_work:
            time.sleep(max(0.0, started_s + arrivals_s[pending[0]] - now_s))  # type: ignore[index]
            continue
        for output in engine.step():
            if output.finished is not None:
                result.done.append(output.finished)
                in_flight -= 1
                watched -= output.finished.tier == until_tier_done
        if until_tier_done is not None and watched == 0:
            break
    result.wall_s = time.perf_counter() - started_s
    return result


STEP_TOKENS_MAX = [_SETTINGS.engine_step_tokens_max]  # --step-tokens sets it for every engine.


def new_engine(runner: ModelRunner, **overrides) -> BatchEngine:
    # The worker's defaults (Settings), with the KV cache large enough for every part.
    config = dict(
        kv_cache_bytes=_SETTINGS.engine_kv_cache_mib << 20,
        block_size=_SETTINGS.engine_block_size,
        step_tokens_max=STEP_TOKENS_MAX[0],
        running_max=_SETTINGS.engine_running_max,
        waiting_max=_SETTINGS.engine_waiting_max,
    )
    return BatchEngine(runner, EngineConfig(**{**config, **overrides}))


# --- transformers.generate ---


class _FirstToken(BaseStreamer):
    """Notes when `generate` hands over its first new tokens (its first call is the prompt)."""

    def __init__(self) -> None:
        self.calls, self.first_s = 0, 0.0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_s = time.perf_counter()

    def end(self) -> None:
        pass


def hf_generate(
    runner: ModelRunner, batch: list[list[int]], max_tokens: int
) -> tuple[int, float, float]:
    """One `transformers.generate` call on `batch` (left-padded): output tokens (up to and
    including each row's first EOS), seconds, and seconds to the first tokens."""
    width = max(len(ids) for ids in batch)
    pad = runner.tokenizer.pad_token_id
    pad = pad if pad is not None else min(runner.eos_token_ids)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
    streamer = _FirstToken()
    started_s = time.perf_counter()
    with torch.inference_mode():
        out = runner.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
            eos_token_id=sorted(runner.eos_token_ids),
            streamer=streamer,
        )
    elapsed_s = time.perf_counter() - started_s
    tokens = 0
    for row in out[:, width:].tolist():
        ends = [i for i, token in enumerate(row) if token in runner.eos_token_ids]
        tokens += ends[0] + 1 if ends else len(row)
    return tokens, elapsed_s, streamer.first_s - started_s


def hf_one_at_a_time(runner: ModelRunner, batch: list[list[int]], max_tokens: int):
    """Output tokens/s and each request's TTFT (ms)."""
    runs = [hf_generate(runner, [ids], max_tokens) for ids in batch]
    tokens_s = sum(r[0] for r in runs) / sum(r[1] for r in runs)
    return tokens_s, [r[2] * 1000 for r in runs]


def hf_static(runner: ModelRunner, batch: list[list[int]], max_tokens: int, size: int) -> float:
    """Output tokens/s of static padded batches of `size` over `batch`, one after another."""
    runs = [
        hf_generate(runner, batch[i : i + size], max_tokens) for i in range(0, len(batch), size)
    ]
    return sum(r[0] for r in runs) / sum(r[1] for r in runs)


# --- the parts ---


def throughput(runner: ModelRunner, args: argparse.Namespace, params: SamplingParams) -> None:
    base = prompts(runner, args.baseline_requests, args.input_tokens, seed=args.seed)
    hf_tokens_s, hf_ttft_ms = hf_one_at_a_time(runner, base, args.output_tokens)
    print(
        f"transformers.generate one at a time ({len(base)} requests): {hf_tokens_s:.1f} tok/s, "
        f"TTFT p50/p90/p99 {percentiles(hf_ttft_ms)} ms"
    )
    mode = f"request rate {args.request_rate}/s" if args.request_rate else "closed loop"
    print(f"engine, {mode}; ratios against transformers.generate:")
    header = ("conc", "reqs", "tok/s", "x1by1", "static", "x stat", "TTFT p50/90/99 ms")
    print("{:>4} {:>5} {:>7} {:>6} {:>7} {:>6} {:>18} {:>18} {:>8}".format(
        *header, "TPOT p50/90/99 ms", "goodput"))  # fmt: skip
    for concurrency in args.concurrency:
        count = args.requests or max(8, 2 * concurrency)
        batch = prompts(runner, count, args.input_tokens, seed=args.seed)
        engine = new_engine(runner, running_max=max(concurrency, 1), waiting_max=max(count, 1))
        arrivals_s = None
        if args.request_rate:
            arrivals_s = poisson_arrivals_s(args.request_rate, count, random.Random(args.seed))
        result = run_engine(
            engine, batch, params, 0 if arrivals_s else concurrency, arrivals_s=arrivals_s
        )
        static_s = (
            hf_static(runner, batch, args.output_tokens, concurrency)
            if concurrency > 1 and args.static
            else float("nan")
        )
        print(
            f"{concurrency:>4} {count:>5} {result.tokens_s:>7.1f} "
            f"{result.tokens_s / hf_tokens_s:>5.2f}x {static_s:>7.1f} "
            f"{result.tokens_s / static_s:>5.2f}x {percentiles(result.ttft_ms()):>18} "
            f"{percentiles(result.tpot_ms()):>18} {result.goodput_s():>6.2f}/s"
        )


def shared_prefix(runner: ModelRunner, args: argparse.Namespace, params: SamplingParams) -> None:
    batch = prompts(runner, args.prefix_requests + 1, prefix_tokens=args.shared_prefix)
    print(f"shared prefix of {args.shared_prefix} tokens, prompts of {len(batch[0])} tokens:")
    ttft_p50_ms = {}
    for caching in (False, True):
        result = run_engine(new_engine(runner, prefix_caching=caching), batch, params, 1)
        ttft = [_ttft_ms(r) for r in result.done if r.request_id != "r0"]  # r0 fills the cache.
        ttft_p50_ms[caching] = statistics.median(ttft)
        print(f"  prefix caching {'on ' if caching else 'off'}: TTFT p50/p90/p99 "
              f"{percentiles(ttft)} ms")  # fmt: skip
    print(f"  TTFT p50 off / on: {ttft_p50_ms[False] / ttft_p50_ms[True]:.1f}x (target >= 3x)")


def qos(runner: ModelRunner, args: argparse.Namespace, params: SamplingParams) -> None:
    calibrate = prompts(runner, _SETTINGS.engine_running_max, args.input_tokens, seed=args.seed)
    served = run_engine(new_engine(runner), calibrate, params, _SETTINGS.engine_running_max)
    served_s = len(served.done) / served.wall_s
    premium_count = args.qos_premium
    span_s = premium_count * args.qos_premium_interval_s
    rng = random.Random(args.seed)
    free_at_s = poisson_arrivals_s(args.qos_overload * served_s, int(
        args.qos_overload * served_s * span_s * 1.2) + 1, rng)  # fmt: skip
    premium_at_s = [(i + 0.5) * args.qos_premium_interval_s for i in range(premium_count)]
    print(
        f"tiered QoS: the engine serves {served_s:.2f} requests/s; free arrive at "
        f"{args.qos_overload * served_s:.1f}/s, premium every {args.qos_premium_interval_s} s "
        f"({premium_count} of them)"
    )
    premium = prompts(runner, premium_count, args.input_tokens, seed=args.seed + 1)
    idle = run_engine(new_engine(runner), premium, params, arrivals_s=premium_at_s,
                      tiers=["premium"] * premium_count)  # fmt: skip
    print(f"  idle engine, premium alone: TTFT p50/p90/p99 {percentiles(idle.ttft_ms())} ms")
    free = prompts(runner, len(free_at_s), args.input_tokens, seed=args.seed + 2)
    merged = sorted(
        [(at, ids, "premium") for at, ids in zip(premium_at_s, premium, strict=True)]
        + [(at, ids, "free") for at, ids in zip(free_at_s, free, strict=True)],
        key=lambda item: item[0],
    )
    # Two places for the overflow: the worker's own (the engine's bounded waiting queue, and
    # jobs left in Redis in arrival order beyond it), and a waiting queue holding every
    # arrival, where the engine's scheduler alone decides who goes first.
    places = [("engine queue for all", len(merged))]
    if args.qos_worker_queue:
        places.append(("worker-sized queue", _SETTINGS.engine_waiting_max))
    for label, waiting_max in places:
        loaded = run_engine(
            new_engine(runner, waiting_max=waiting_max),
            [ids for _, ids, _ in merged],
            params,
            arrivals_s=[at for at, _, _ in merged],
            tiers=[tier for _, _, tier in merged],
            until_tier_done="premium",
        )
        ratio = percentile(loaded.ttft_ms("premium"), 0.99) / percentile(idle.ttft_ms(), 0.99)
        print(
            f"  overloaded, {label} (waiting_max {waiting_max}): premium TTFT p50/p90/p99 "
            f"{percentiles(loaded.ttft_ms('premium'))} ms, free "
            f"{percentiles(loaded.ttft_ms('free'))} ms ({len(loaded.ttft_ms('free'))} free "
            f"served); premium p99 loaded / idle {ratio:.2f}x (target <= 1.5x)"
        )


PARTS = {"throughput": throughput, "prefix": shared_prefix, "qos": qos}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    STEP_TOKENS_MAX[0] = args.step_tokens
    runner = ModelRunner.load(args.model, Path(args.model_cache))
    params = SamplingParams(max_tokens=args.output_tokens)
    print(
        f"{runner.name} on {runner.device}, {torch.get_num_threads()} torch threads, greedy, "
        f"seed {args.seed}, prompts of about {args.input_tokens} tokens, up to "
        f"{args.output_tokens} output tokens, {args.step_tokens} tokens a step; TTFT/TPOT in "
        f"ms; goodput in requests/s meeting {TIER_SLOS} (TTFT ms, TPOT ms)"
    )
    run_engine(new_engine(runner), prompts(runner, 2), SamplingParams(max_tokens=2), 2)  # Warm.
    for part in args.parts:
        started_s = time.perf_counter()
        PARTS[part](runner, args, params)
        print(f"  ({part}: {time.perf_counter() - started_s:.0f} s)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.engine", description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=list(PARTS))
    parser.add_argument("--model", default="smollm2")
    parser.add_argument(
        "--model-cache", default=str(Path.home() / ".cache" / "tokenmill" / "models")
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=0, help="per concurrency; 0: 2 c, >= 8")
    parser.add_argument("--request-rate", type=float, default=0.0, help="per s; 0: closed loop")
    parser.add_argument("--input-tokens", type=int, default=0, help="0: the bare request")
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--baseline-requests", type=int, default=4)
    parser.add_argument("--no-static", dest="static", action="store_false")
    parser.add_argument("--shared-prefix", type=int, default=512, help="tokens")
    parser.add_argument("--prefix-requests", type=int, default=6)
    parser.add_argument("--qos-overload", type=float, default=10.0)
    parser.add_argument("--qos-premium", type=int, default=12)
    parser.add_argument("--qos-premium-interval-s", type=float, default=1.5)
    # Also the worker's bounded queue with the overflow waiting in arrival order (as in Redis):
    # premium then waits behind the free backlog, which takes about overload x span to drain.
    parser.add_argument("--qos-worker-queue", action="store_true")
    # On a shared host, one intra-op thread per process often beats two that wait on each
    # other; 0 keeps torch's default.
    parser.add_argument("--threads", type=int, default=0)
    # The engine's token budget per step (TOKENMILL_ENGINE_STEP_TOKENS_MAX): a smaller one
    # bounds how long a step runs, which a newly arrived premium request waits out.
    parser.add_argument("--step-tokens", type=int, default=_SETTINGS.engine_step_tokens_max)
    args = parser.parse_args()
    if min(args.concurrency) < 1 or args.output_tokens < 1 or args.baseline_requests < 1:
        parser.error("concurrency, output tokens and baseline requests must be at least 1")
    return args


if __name__ == "__main__":
    main()
