"""The batching engine on tiny random-weight models (fast): its forward pass against
transformers', and the scheduler's join/leave, prefix cache, priority, preemption, bounded queue,
cancellation and seeds."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tokenmill.worker.engine import BatchEngine, EngineConfig, QueueFull
from tokenmill.worker.llama import LlamaForward, SeqBatch
from tokenmill.worker.model import ModelRunner, SamplingParams

VOCAB = 96
EOS = 95
BLOCK = 4
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    eos_token_id=EOS,
)


class CharTokenizer:
    """Token i is the character chr(32 + i); the last id is the end of sequence."""

    eos_token_id = EOS

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[min(ord(c) - 32, EOS - 1) for c in text])

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(chr(32 + i) for i in ids if i != EOS)


def tiny(model_class=LlamaForCausalLM, config_class=LlamaConfig, seed=0) -> ModelRunner:
    torch.manual_seed(seed)
    model = model_class(config_class(**SMALL)).eval()
    return ModelRunner("tiny", "cpu", model, CharTokenizer(), 0.0)


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return tiny()


def engine(runner: ModelRunner, blocks: int = 64, **overrides) -> BatchEngine:
    per_block = LlamaForward.bytes_per_block(runner.model, BLOCK)
    config = EngineConfig(kv_cache_bytes=blocks * per_block, block_size=BLOCK, **overrides)
    return BatchEngine(runner, config)


def prompt(seed: int, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, EOS, (length,), generator=generator).tolist()


def run_all(eng: BatchEngine, steps_max: int = 10_000) -> dict:
    """Step until idle; the finished requests by id, and the order their first token came."""
    finished, first_tokens = {}, []
    for _ in range(steps_max):
        if not eng.has_work:
            return {"finished": finished, "first": first_tokens}
        for output in eng.step():
            if output.new_token_ids and output.request_id not in first_tokens:
                first_tokens.append(output.request_id)
            if output.finished is not None:
                finished[output.request_id] = output.finished
    raise AssertionError("the engine did not become idle")


def solo(runner: ModelRunner, ids: list[int], params: SamplingParams) -> list[int]:
    eng = engine(runner)
    eng.add_request("solo", ids, params)
    return run_all(eng)["finished"]["solo"].output_ids


GREEDY = SamplingParams(max_tokens=12)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_ragged_batch_logits_match_transformers(family):
    runner = tiny() if family == "llama" else tiny(Qwen2ForCausalLM, Qwen2Config)
    if family == "qwen2":
        assert runner.model.model.layers[0].self_attn.q_proj.bias is not None
    forward = LlamaForward(runner.model, num_blocks=32, block_size=BLOCK)
    prompts = [prompt(1, 13), prompt(2, 1), prompt(3, 7)]
    token_ids, batch, next_block = [], [], 0
    for ids in prompts:
        blocks = torch.arange(next_block, next_block + -(-len(ids) // BLOCK))
        next_block += len(blocks)
        positions = torch.arange(len(ids))
        slots = blocks[positions // BLOCK] * BLOCK + positions % BLOCK
        batch.append(SeqBatch(0, len(ids), slots, wants_logits=True))
        token_ids += ids
    ours = forward.step(token_ids, batch)
    with torch.inference_mode():
        for row, ids in enumerate(prompts):
            reference = runner.model(input_ids=torch.tensor([ids])).logits[0, -1]
            assert (ours[row] - reference).abs().max() < 1e-4


def test_requests_join_and_leave_between_steps_without_changing_outputs(runner):
    a, b, c = prompt(1, 9), prompt(2, 3), prompt(3, 17)
    eng = engine(runner)
    eng.add_request("a", a, GREEDY)
    eng.step()
    eng.step()
    eng.add_request("b", b, replace(GREEDY, max_tokens=3))
    eng.step()
    eng.add_request("c", c, GREEDY)
    finished = run_all(eng)["finished"]
    assert finished["a"].output_ids == solo(runner, a, GREEDY)
    assert finished["b"].output_ids == solo(runner, b, replace(GREEDY, max_tokens=3))
    assert finished["c"].output_ids == solo(runner, c, GREEDY)
    assert finished["b"].finish_reason == "length" and len(finished["b"].output_ids) == 3
    assert eng.pool.available == eng.pool.num_blocks


def test_chunked_prefill_shares_steps_with_decodes(runner):
    long = prompt(4, 40)
    eng = engine(runner, step_tokens_max=8, running_max=4)
    eng.add_request("short", prompt(5, 3), GREEDY)
    eng.step()
    eng.add_request("long", long, GREEDY)
    outputs = {o.request_id: o for o in eng.step()}
    # The decode keeps going while the 40-token prompt is taken 7 tokens at a time.
    assert outputs["short"].step_tokens == 1 and outputs["short"].new_token_ids
    assert outputs["long"].step_tokens == 7 and not outputs["long"].new_token_ids
    assert run_all(eng)["finished"]["long"].output_ids == solo(runner, long, GREEDY)


def test_a_cached_prefix_is_reused_and_gives_the_same_output(runner):
    shared = prompt(6, 18)
    first, second = shared + prompt(7, 3), shared + prompt(8, 5)
    eng = engine(runner)
    eng.add_request("first", first, GREEDY)
    done = run_all(eng)["finished"]
    assert done["first"].cached_prompt_tokens == 0
    eng.add_request("second", second, GREEDY)
    done = run_all(eng)["finished"]
    # 18 shared tokens fill 4 whole blocks of 4.
    assert done["second"].cached_prompt_tokens == 16
    assert done["second"].output_ids == solo(runner, second, GREEDY)
    assert eng.prefix_hit_tokens_total == 16


def test_unreferenced_cached_blocks_are_evicted_least_recently_used_first(runner):
    eng = engine(runner, blocks=12)
    shared = prompt(9, 16)
    eng.add_request("first", shared + [1], replace(GREEDY, max_tokens=2))
    run_all(eng)
    # Another prompt needs 11 of the 12 blocks: three of the prefix's four cached blocks give
    # way, its tail first, so its head is still there to share.
    eng.add_request("other", prompt(10, 40), replace(GREEDY, max_tokens=2))
    run_all(eng)
    eng.add_request("again", shared + [2], replace(GREEDY, max_tokens=2))
    assert run_all(eng)["finished"]["again"].cached_prompt_tokens == BLOCK
    # One that needs every block evicts the whole prefix.
    eng.add_request("all", prompt(10, 44), replace(GREEDY, max_tokens=2))
    run_all(eng)
    eng.add_request("third", shared + [3], replace(GREEDY, max_tokens=2))
    assert run_all(eng)["finished"]["third"].cached_prompt_tokens == 0


def test_a_fully_cached_prompt_still_computes_its_last_position(runner):
    ids = prompt(11, 16)
    eng = engine(runner)
    eng.add_request("one", ids, GREEDY)
    run_all(eng)
    eng.add_request("two", ids, GREEDY)
    two = run_all(eng)["finished"]["two"]
    assert two.cached_prompt_tokens == 12
    assert two.output_ids == solo(runner, ids, GREEDY)


def test_premium_is_admitted_first_then_standard_then_free_round_robin_by_customer(runner):
    eng = engine(runner, running_max=1, step_tokens_max=64, waiting_max=6)
    params = replace(GREEDY, max_tokens=1)
    for request_id, tier, customer in [
        ("free-a1", "free", "a"),
        ("free-a2", "free", "a"),
        ("free-a3", "free", "a"),
        ("free-b1", "free", "b"),
        ("standard", "standard", "c"),
        ("premium", "premium", "d"),
    ]:
        eng.add_request(request_id, prompt(12, 5), params, tier=tier, customer_id=customer)
    with pytest.raises(QueueFull):
        eng.add_request("overflow", prompt(13, 5), params)
    order = run_all(eng)["first"]
    assert order == ["premium", "standard", "free-a1", "free-b1", "free-a2", "free-a3"]


def test_premium_preempts_a_running_free_request_which_resumes_with_its_tokens(runner):
    free_ids, premium_ids = prompt(14, 20), prompt(15, 20)
    long = replace(GREEDY, max_tokens=30)
    # 16 blocks of 4: the free request grows to 13 blocks, so the premium one cannot fit.
    eng = engine(runner, blocks=16)
    eng.add_request("free", free_ids, long, tier="free", customer_id="a")
    for _ in range(25):
        eng.step()
    eng.add_request("premium", premium_ids, long, tier="premium", customer_id="b")
    done = run_all(eng)
    assert done["finished"]["free"].preemptions >= 1
    assert done["finished"]["premium"].preemptions == 0
    assert done["finished"]["free"].output_ids == solo(runner, free_ids, long)
    assert done["finished"]["premium"].output_ids == solo(runner, premium_ids, long)


def test_running_requests_preempt_the_least_important_when_blocks_run_out(runner):
    params = replace(GREEDY, max_tokens=24)
    eng = engine(runner, blocks=14)
    ids = {name: prompt(16 + i, 8) for i, name in enumerate(["s1", "s2", "f1"])}
    eng.add_request("f1", ids["f1"], params, tier="free", customer_id="x")
    eng.add_request("s1", ids["s1"], params, tier="standard", customer_id="y")
    eng.add_request("s2", ids["s2"], params, tier="standard", customer_id="z")
    done = run_all(eng)["finished"]
    assert done["f1"].preemptions >= 1
    for name, request in done.items():
        assert request.output_ids == solo(runner, ids[name], params), name


def test_cancel_stops_a_request_within_one_step_and_frees_its_blocks(runner):
    eng = engine(runner)
    eng.add_request("gone", prompt(19, 9), replace(GREEDY, max_tokens=50))
    eng.add_request("stays", prompt(20, 9), GREEDY)
    eng.step()
    eng.cancel("gone")
    outputs = eng.step()
    assert [o.request_id for o in outputs] == ["stays"]
    run_all(eng)
    assert eng.pool.available == eng.pool.num_blocks and not eng.has_work


def test_same_seed_same_tokens_whatever_the_batch_mates(runner):
    ids = prompt(21, 6)
    sampled = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=20, seed=42)
    eng = engine(runner)
    eng.add_request("alone", ids, sampled)
    alone = run_all(eng)["finished"]["alone"].output_ids
    eng.add_request("mate1", prompt(22, 11), replace(sampled, seed=1))
    eng.add_request("crowd", ids, sampled)
    eng.add_request("mate2", prompt(23, 3), replace(sampled, seed=None))
    assert run_all(eng)["finished"]["crowd"].output_ids == alone


def test_stop_strings_and_eos_end_a_request_with_stop(runner):
    ids = prompt(24, 6)
    full = solo(runner, ids, replace(GREEDY, max_tokens=8))
    text = CharTokenizer().decode(full)
    stop = text[3:5]
    eng = engine(runner)
    eng.add_request("cut", ids, replace(GREEDY, max_tokens=8, stop=(stop,)))
    cut = run_all(eng)["finished"]["cut"]
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]


def test_a_request_larger_than_the_cache_is_refused(runner):
    eng = engine(runner, blocks=4)
    with pytest.raises(ValueError, match="KV cache"):
        eng.add_request("huge", prompt(25, 10), replace(GREEDY, max_tokens=20))
    assert not eng.has_work


def test_streamed_text_adds_up_to_the_final_text(runner):
    eng = engine(runner)
    eng.add_request("s", prompt(26, 5), GREEDY)
    deltas, final = [], None
    while eng.has_work:
        for output in eng.step():
            deltas.append(output.text_delta)
            final = output.finished or final
    assert "".join(deltas) == final.text


def test_a_step_budget_below_the_running_limit_is_refused():
    with pytest.raises(ValueError, match="engine_step_tokens_max"):
        EngineConfig(kv_cache_bytes=1 << 20, step_tokens_max=8, running_max=16)


def test_a_curtailed_tier_runs_at_most_its_limit_and_every_request_still_finishes(runner):
    """The power cap's worker side: a shed tier gets fewer places in the batch, the others keep
    theirs, and nothing accepted is dropped; lifting the limit gives the places back."""
    eng = engine(runner, running_max=8, step_tokens_max=64)
    params = replace(GREEDY, max_tokens=6)
    free = [f"free-{i}" for i in range(4)]
    for i, request_id in enumerate(free):
        eng.add_request(request_id, prompt(40 + i, 5), params, tier="free", customer_id=str(i))
    eng.add_request("premium", prompt(50, 5), params, tier="premium", customer_id="p")
    eng.limit_tiers({"free": 1})
    free_running_max, finished = 0, {}
    while eng.has_work:
        for output in eng.step():
            if output.finished is not None:
                finished[output.request_id] = output.finished
        free_running_max = max(free_running_max, sum(r.tier == "free" for r in eng.running))
    assert free_running_max == 1
    assert set(finished) == {*free, "premium"}

    eng.limit_tiers({})
    for i, request_id in enumerate(free):
        eng.add_request(request_id, prompt(40 + i, 5), params, tier="free", customer_id=str(i))
    eng.step()
    assert sum(r.tier == "free" for r in eng.running) == 4


def test_a_limited_tier_does_not_preempt_for_a_place_it_may_not_take(runner):
    eng = engine(runner, running_max=1, step_tokens_max=64)
    params = replace(GREEDY, max_tokens=8)
    eng.add_request("free", prompt(60, 5), params, tier="free", customer_id="a")
    eng.step()
    eng.add_request("standard-1", prompt(61, 5), params, tier="standard", customer_id="b")
    eng.add_request("standard-2", prompt(62, 5), params, tier="standard", customer_id="c")
    eng.limit_tiers({"standard": 1})
    eng.step()  # standard-1 outranks free: free is preempted for it.
    assert [r.request_id for r in eng.running] == ["standard-1"]
    preemptions = eng.preemptions_total
    eng.step()  # standard-2 may not run beside standard-1: nobody is preempted for it.
    assert eng.preemptions_total == preemptions
    assert set(run_all(eng)["finished"]) == {"free", "standard-1", "standard-2"}


def test_a_tier_limit_below_one_is_refused(runner):
    with pytest.raises(AssertionError):
        engine(runner).limit_tiers({"free": 0})
