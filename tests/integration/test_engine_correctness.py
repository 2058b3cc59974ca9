"""The batching engine against transformers with the real default model (SmolLM2-135M-Instruct,
float32 on the CPU): logits of a ragged batch with a cached prefix, greedy decoding token for
token, seeds across batch mates, and preemption."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tokenmill.worker.engine import BatchEngine, EngineConfig
from tokenmill.worker.llama import LlamaForward
from tokenmill.worker.model import ModelRunner, SamplingParams

SYSTEM = (
    "You are a careful assistant for a small bakery. Answer in one short sentence, "
    "mention prices in euros, and never invent opening hours."
)
QUESTIONS = ["What bread do you sell?", "Is there anything without gluten?", "Hi"]
# float32 over 30 layers: transformers' eager attention and ours differ by rounding only.
LOGITS_ABS_DIFF_MAX = 2e-3


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    cache = os.environ.get("TOKENMILL_MODEL_CACHE") or Path.home() / ".cache/tokenmill/models"
    return ModelRunner.load("smollm2", Path(cache))


def chat(runner: ModelRunner, question: str) -> list[int]:
    return runner.encode(
        None, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    )


def engine(runner: ModelRunner, blocks: int = 256, **overrides) -> BatchEngine:
    per_block = LlamaForward.bytes_per_block(runner.model, 16)
    return BatchEngine(runner, EngineConfig(kv_cache_bytes=blocks * per_block, **overrides))


def run_all(eng: BatchEngine) -> dict:
    finished = {}
    while eng.has_work:
        for output in eng.step():
            if output.finished is not None:
                finished[output.request_id] = output.finished
    return finished


def test_ragged_batch_with_a_cached_prefix_matches_transformers_logits(runner):
    prompts = [chat(runner, q) for q in QUESTIONS] + [runner.encode("Once upon a time", None)]
    eng = engine(runner)
    eng.add_request("warm", prompts[0], SamplingParams(max_tokens=1))
    run_all(eng)
    captured = []
    step = eng.forward.step
    eng.forward.step = lambda ids, batch: captured.append(step(ids, batch)) or captured[-1]
    requests = [
        eng.add_request(f"r{i}", ids, SamplingParams(max_tokens=1)) for i, ids in enumerate(prompts)
    ]
    eng.step()
    # Every prompt shares the chat template's system part with the warm-up, whole blocks of it
    # cached; the raw prompt shares nothing.
    assert [r.cached_prompt_tokens > 0 for r in requests] == [True, True, True, False]
    with torch.inference_mode():
        for row, ids in enumerate(prompts):
            reference = runner.model(input_ids=torch.tensor([ids])).logits[0, -1]
            assert (captured[0][row] - reference).abs().max() < LOGITS_ABS_DIFF_MAX


def test_greedy_batch_equals_transformers_generate_token_for_token(runner):
    prompts = [chat(runner, q) for q in QUESTIONS]
    eng = engine(runner, step_tokens_max=64)
    for i, ids in enumerate(prompts):
        eng.add_request(f"r{i}", ids, SamplingParams(max_tokens=16))
    finished = run_all(eng)
    with torch.inference_mode():
        for i, ids in enumerate(prompts):
            generated = runner.model.generate(
                torch.tensor([ids]), max_new_tokens=16, do_sample=False, top_p=None, top_k=None
            )[0, len(ids) :].tolist()
            assert finished[f"r{i}"].output_ids == generated


def test_same_seed_same_text_with_different_batch_mates(runner):
    ids = chat(runner, QUESTIONS[0])
    sampled = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, seed=1234)
    alone = engine(runner)
    alone.add_request("a", ids, sampled)
    crowd = engine(runner)
    crowd.add_request("mate", chat(runner, QUESTIONS[1]), replace(sampled, seed=7))
    crowd.add_request("a", ids, sampled)
    crowd.add_request("mate2", runner.encode("Once upon a time", None), replace(sampled, seed=None))
    assert run_all(alone)["a"].text == run_all(crowd)["a"].text


def test_a_preempted_request_resumes_to_the_same_greedy_output(runner):
    free_ids, premium_ids = chat(runner, QUESTIONS[0]), chat(runner, QUESTIONS[1])
    params = SamplingParams(max_tokens=24, stop=("zzzz",))
    expected = {}
    for name, ids in (("free", free_ids), ("premium", premium_ids)):
        solo = engine(runner)
        solo.add_request(name, ids, params)
        expected[name] = run_all(solo)[name].output_ids
    # Room for one request's prompt and completion, not for two.
    blocks = -(-(max(len(free_ids), len(premium_ids)) + 24) // 16) + 1
    eng = engine(runner, blocks=blocks, prefix_caching=False)
    eng.add_request("free", free_ids, params, tier="free", customer_id="a")
    for _ in range(10):
        eng.step()
    eng.add_request("premium", premium_ids, params, tier="premium", customer_id="b")
    finished = run_all(eng)
    assert finished["free"].preemptions >= 1
    assert {name: r.output_ids for name, r in finished.items()} == expected
