"""The vLLM adapter without vLLM: the engine setting's guard, and the adapter's translation of
vLLM's step outputs driven by a scripted stand-in for `vllm.LLMEngine` (vLLM's interface, not
ours), through the same EngineService the worker runs."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from tests.unit.test_engine import CharTokenizer
from tests.unit.test_serving import job, step_meter
from tokenmill.events import JobCompleted
from tokenmill.settings import Settings
from tokenmill.worker.engine import EngineConfig
from tokenmill.worker.main import build_engine
from tokenmill.worker.model import SamplingParams
from tokenmill.worker.serving import EngineService
from tokenmill.worker.vllm_engine import EngineUnavailable, VllmEngine, VllmRunner, priority_of


def test_selecting_vllm_where_it_is_not_installed_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # Makes `import vllm` fail, installed or not.
    with pytest.raises(EngineUnavailable, match="vLLM is not installed"):
        build_engine(Settings(engine="vllm"))


def test_an_unknown_engine_is_refused_by_name():
    with pytest.raises(ValueError, match="TOKENMILL_ENGINE is 'tgi'"):
        build_engine(Settings(engine="tgi"))


def test_premium_runs_first_in_vllm_order():
    assert priority_of("premium") < priority_of("standard") < priority_of("free")


class ScriptedLLM:
    """One token per step for every request, the letter "a", until its max_tokens; reports
    `cached` prompt tokens from the prefix cache."""

    def __init__(self, cached: int) -> None:
        self.cached = cached
        self.live: dict[str, dict] = {}
        self.priorities: dict[str, int] = {}
        self.aborted: list[str] = []

    def add_request(self, request_id, prompt, params, priority=0):
        self.live[request_id] = {"params": params, "tokens": []}
        self.priorities[request_id] = priority

    def abort_request(self, request_ids):
        for request_id in request_ids:
            self.live.pop(request_id, None)
            self.aborted.append(request_id)

    def step(self):
        outputs = []
        for request_id, state in list(self.live.items()):
            state["tokens"].append(65)
            finished = len(state["tokens"]) >= state["params"]["max_tokens"]
            completion = SimpleNamespace(
                token_ids=list(state["tokens"]),
                text="a" * len(state["tokens"]),
                finish_reason="length" if finished else None,
            )
            outputs.append(
                SimpleNamespace(
                    request_id=request_id,
                    outputs=[completion],
                    finished=finished,
                    num_cached_tokens=self.cached,
                )
            )
            if finished:
                del self.live[request_id]
        return outputs


def adapter(cached: int = 0) -> VllmEngine:
    fake_vllm = SimpleNamespace(SamplingParams=lambda **kw: kw)
    runner = VllmRunner("tiny", CharTokenizer(), max_model_len=512)
    config = EngineConfig(kv_cache_bytes=1, running_max=2, waiting_max=2)
    return VllmEngine(ScriptedLLM(cached), fake_vllm, runner, config)


def test_step_outputs_carry_tokens_text_and_the_prompt_on_the_first_step():
    engine = adapter(cached=4)
    engine.add_request("r1", list(range(10)), SamplingParams(max_tokens=3), tier="premium")
    first, second, third = (engine.step() for _ in range(3))
    # Its uncached prompt (10 - 4) is counted on the step of its first token, with that token.
    assert first[0].step_tokens == 10 - 4 - 1 + 1 and first[0].text_delta == "a"
    assert second[0].step_tokens == 1 and second[0].finished is None
    done = third[0].finished
    assert done is not None and done.finish_reason == "length" and done.text == "aaa"
    assert done.cached_prompt_tokens == 4 and len(done.output_ids) == 3
    assert engine.prefix_hit_tokens_total == 4 and not engine.has_work
    assert engine.llm.priorities == {"r1": priority_of("premium")}


def test_a_cancelled_request_is_aborted_in_vllm_and_frees_its_room():
    engine = adapter()
    engine.add_request("r1", [1, 2, 3], SamplingParams(max_tokens=5))
    assert engine.waiting_room == 3
    engine.cancel("r1")
    assert engine.llm.aborted == ["r1"] and engine.waiting_room == 4 and not engine.has_work


def test_a_stopped_request_keeps_its_tokens_and_is_aborted_in_vllm():
    engine = adapter()
    engine.add_request("r1", [1, 2, 3], SamplingParams(max_tokens=5))
    engine.step()
    engine.step()
    stopped = engine.stop("r1")
    assert stopped is not None and stopped.finish_reason == "cancelled"
    assert stopped.text == "aa" and len(stopped.output_ids) == 2
    assert engine.llm.aborted == ["r1"] and not engine.has_work
    assert engine.stop("r1") is None


async def test_the_worker_serves_a_job_through_the_adapter():
    service = EngineService(adapter(), step_meter(), "worker-test")  # type: ignore[arg-type]
    try:
        outcome = await service.run(job("j1", "hello there", max_tokens=4, tier="premium"))
    finally:
        service.close()
    assert isinstance(outcome, JobCompleted)
    assert outcome.text == "aaaa" and outcome.completion_tokens == 4
    assert outcome.prompt_tokens == len("hello there") and outcome.finish_reason == "length"
    assert sum(t * s for t, s in outcome.step_tokens) == outcome.prompt_tokens - 1 + 4
