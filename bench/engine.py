"""`make bench-engine`: output tokens per second of the batching engine at several concurrencies,
beside the one-at-a-time path it replaced (`ModelRunner.generate`), on the same prompts in the
same run.

Closed loop: at concurrency c the engine holds c requests at once and a finished one is replaced
by the next until `--requests` (default: 2 c, at least 4) have run. The one-at-a-time path
serves one request after another whatever the concurrency, so its throughput is measured once,
on the first `--baseline-requests` prompts, and every row is compared with it. Greedy decoding
with a fixed prompt set, so every run does the same work; a request that ends at EOS before
`--output-tokens` counts the tokens it made.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from tokenmill.worker.engine import BatchEngine, EngineConfig
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


def prompts(runner: ModelRunner, count: int, prefix_tokens: int = 0) -> list[list[int]]:
    """`count` chat prompts; with `prefix_tokens`, all start with one system prompt that long."""
    system = []
    if prefix_tokens:
        words = " ".join(f"rule {i}: be brief." for i in range(prefix_tokens))
        text = runner.tokenizer.decode(runner.encode(words, None)[:prefix_tokens])
        system = [{"role": "system", "content": text}]
    return [
        runner.encode(
            None, system + [{"role": "user", "content": f"Write a long essay about {topic}."}]
        )
        for topic in (TOPICS[i % len(TOPICS)] for i in range(count))
    ]


def one_at_a_time(runner: ModelRunner, batch: list[list[int]], params: SamplingParams) -> float:
    started_s = time.perf_counter()
    tokens = sum(runner.generate(ids, params).completion_tokens for ids in batch)
    return tokens / (time.perf_counter() - started_s)


def batched(
    runner: ModelRunner,
    batch: list[list[int]],
    params: SamplingParams,
    concurrency: int,
    prefix_caching: bool = True,
) -> tuple[float, list[float]]:
    """Output tokens per second and every request's time to first token (ms)."""
    config = EngineConfig(
        kv_cache_bytes=256 << 20, running_max=concurrency, prefix_caching=prefix_caching
    )
    engine = BatchEngine(runner, config)
    queue = list(enumerate(batch))
    added_s: dict[str, float] = {}
    ttft_ms: list[float] = []
    tokens, in_flight = 0, 0
    started_s = time.perf_counter()
    while queue or in_flight:
        while queue and in_flight < concurrency:
            index, ids = queue.pop(0)
            engine.add_request(f"r{index}", ids, params)
            added_s[f"r{index}"] = time.perf_counter()
            in_flight += 1
        for output in engine.step():
            if output.new_token_ids and output.request_id in added_s:
                ttft_ms.append((time.perf_counter() - added_s.pop(output.request_id)) * 1000)
            if output.finished is not None:
                tokens += len(output.finished.output_ids)
                in_flight -= 1
    return tokens / (time.perf_counter() - started_s), ttft_ms


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runner = ModelRunner.load(args.model, Path(args.model_cache))
    params = SamplingParams(max_tokens=args.output_tokens)
    print(
        f"{runner.name} on {runner.device}, {torch.get_num_threads()} torch threads, "
        f"greedy, up to {args.output_tokens} output tokens a request"
    )
    warm = prompts(runner, 1)[0]
    runner.generate(warm, SamplingParams(max_tokens=2))
    baseline = one_at_a_time(runner, prompts(runner, args.baseline_requests), params)
    print(f"one at a time (ModelRunner.generate): {baseline:.1f} tok/s")
    header = ("concurrency", "requests", "engine tok/s", "ratio", "TTFT p50 ms")
    print("{:>11} {:>8} {:>12} {:>6} {:>11}".format(*header))
    for concurrency in args.concurrency:
        count = args.requests or max(4, 2 * concurrency)
        rate, ttft_ms = batched(runner, prompts(runner, count), params, concurrency)
        print(
            f"{concurrency:>11} {count:>8} {rate:>12.1f} {rate / baseline:>5.1f}x "
            f"{statistics.median(ttft_ms):>11.0f}"
        )
    if args.shared_prefix:
        shared_prefix(runner, args, params)


def shared_prefix(runner: ModelRunner, args: argparse.Namespace, params: SamplingParams) -> None:
    """TTFT with every prompt starting with one long system prompt, prefix caching on and off,
    one request at a time so that queueing does not blur it."""
    batch = prompts(runner, args.baseline_requests + 1, args.shared_prefix)
    print(f"shared prefix of {args.shared_prefix} tokens, prompts of {len(batch[0])} tokens:")
    for caching in (False, True):
        _, ttft_ms = batched(runner, batch, params, 1, prefix_caching=caching)
        # The first request fills the cache; the others can hit it.
        print(
            f"  prefix caching {'on ' if caching else 'off'}: TTFT p50 "
            f"{statistics.median(ttft_ms[1:]):.0f} ms"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.engine", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument(
        "--model-cache", default=str(Path.home() / ".cache" / "tokenmill" / "models")
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=0, help="per concurrency; 0: 2 c")
    parser.add_argument("--baseline-requests", type=int, default=4)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--shared-prefix", type=int, default=0, help="tokens; 0: skip")
    # On a shared host, one intra-op thread per process often beats two that wait on each
    # other; 0 keeps torch's default.
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if min(args.concurrency) < 1 or args.output_tokens < 1 or args.baseline_requests < 1:
        parser.error("concurrency, output tokens and baseline requests must be at least 1")
    return args


if __name__ == "__main__":
    main()
