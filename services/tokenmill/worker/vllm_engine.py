"""vLLM behind the engine interface the worker drives (`BatchEngine`'s), for GPU hosts.

Selected with TOKENMILL_ENGINE=vllm. tokenmill never depends on vLLM: it is imported only here,
only when selected, and selecting it where it is not installed stops the worker at start with
an error that says so. Everything around the engine stays the same: the stream, leases,
metering, the energy split, the completion event and the metrics.

What differs from the built-in engine:

- vLLM schedules by its own priority policy (`scheduling_policy="priority"`): premium before
  standard before free, but it does not preempt a running request for a more important one once
  its batch is full, and it has no round-robin between customers of a tier.
- A request's tokens in a step (the energy split's weights) are derived from what vLLM reports:
  its whole uncached prompt on the step that yields its first token (vLLM may have spread that
  prefill over several steps), then one per token. Steps that yield nothing for a request are
  not seen, so their energy goes to the requests that did yield tokens in them.
- `kv_cache_usage_perc` is not read (NaN): vLLM's offline engine keeps it to its own loggers.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from tokenmill.events import Tier
from tokenmill.settings import Settings
from tokenmill.worker.engine import EngineConfig, QueueFull, Request, StepOutput
from tokenmill.worker.model import ModelRunner, SamplingParams
from tokenmill.worker.scheduler import TIER_RANK

log = logging.getLogger(__name__)


class EngineUnavailable(RuntimeError):
    """The configured engine cannot run on this host."""


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise EngineUnavailable(
            "TOKENMILL_ENGINE=vllm, but vLLM is not installed here (pip install vllm, on a host "
            "with a CUDA GPU); TOKENMILL_ENGINE=tokenmill runs the built-in engine anywhere"
        ) from exc
    return vllm


class VllmRunner:
    """The part of `ModelRunner` the worker uses, over vLLM's tokenizer and model config."""

    # Same prompts as the built-in engine: one encoding, shared, not a copy.
    encode = ModelRunner.encode
    clamp_max_tokens = ModelRunner.clamp_max_tokens

    def __init__(self, name: str, tokenizer: Any, max_model_len: int) -> None:
        self.name = name
        self.device = "cuda"
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len


@dataclass
class _Pool:
    num_blocks: int
    usage: float = math.nan


class VllmEngine:
    """vLLM's `LLMEngine`, stepped by the worker's engine thread like `BatchEngine`."""

    def __init__(
        self, llm: Any, vllm: Any, runner: VllmRunner, config: EngineConfig, num_blocks: int = 0
    ) -> None:
        self.llm = llm
        self.vllm = vllm
        self.runner = runner
        self.config = config
        self.pool = _Pool(num_blocks)
        self._requests: dict[str, Request] = {}
        self.preemptions_total = 0  # vLLM does not report its preemptions per request.
        self.prefix_queried_tokens_total = 0
        self.prefix_hit_tokens_total = 0

    @classmethod
    def load(cls, settings: Settings) -> VllmEngine:
        from tokenmill.worker.main import engine_config  # The worker's limits, as for ours.
        from tokenmill.worker.model import _resolve_source

        vllm = import_vllm()
        config = engine_config(settings)
        model_dir, name = _resolve_source(settings.model, settings.model_cache_path)
        llm = vllm.LLMEngine.from_engine_args(
            vllm.EngineArgs(
                model=str(model_dir),
                max_num_seqs=config.running_max,
                max_num_batched_tokens=max(config.step_tokens_max, 2048),
                enable_prefix_caching=config.prefix_caching,
                scheduling_policy="priority",
            )
        )
        runner = VllmRunner(name, llm.get_tokenizer(), llm.model_config.max_model_len)
        # Where this version of vLLM keeps it, if it does; only logged.
        blocks = getattr(getattr(llm, "cache_config", None), "num_gpu_blocks", None) or 0
        return cls(llm, vllm, runner, config, blocks)

    # --- requests in and out ---

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        tier: Tier = "standard",
        customer_id: str = "",
        arrival_s: float | None = None,
    ) -> Request:
        if self.waiting_room <= 0:
            raise QueueFull(f"{len(self._requests)} requests in hand already")
        max_tokens = self.runner.clamp_max_tokens(len(prompt_ids), params.max_tokens)
        request = Request(
            request_id=request_id,
            customer_id=customer_id,
            tier=tier,
            prompt_ids=list(prompt_ids),
            params=params,
            max_tokens=max_tokens,
            generator=None,
            arrival_s=time.perf_counter() if arrival_s is None else arrival_s,
        )
        self.llm.add_request(
            request_id,
            {"prompt_token_ids": request.prompt_ids},
            self.sampling_params(params, max_tokens),
            priority=priority_of(tier),
        )
        self._requests[request_id] = request
        return request

    def sampling_params(self, params: SamplingParams, max_tokens: int) -> Any:
        return self.vllm.SamplingParams(
            max_tokens=max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k or -1,  # vLLM's "every token".
            stop=list(params.stop),
            seed=params.seed,
        )

    def cancel(self, request_id: str) -> None:
        if self._requests.pop(request_id, None) is not None:
            self.llm.abort_request([request_id])

    def stop(self, request_id: str) -> Request | None:
        """End a request now as "cancelled", keeping the tokens it made (BatchEngine.stop);
        None if the engine does not hold it."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        self.llm.abort_request([request_id])
        request.finish_reason = "cancelled"
        request.finished_s = time.perf_counter()
        return request

    def limit_tiers(self, running_max: dict[str, int]) -> None:
        """vLLM schedules its own batch and cannot bound one tier's running requests, so under
        a power cap this engine sheds only through the intake's refusal of new requests."""
        if running_max:
            log.info("power cap: vLLM cannot limit %s in its batch", ", ".join(running_max))

    def abort_all(self) -> None:
        if self._requests:
            self.llm.abort_request(list(self._requests))
        self._requests.clear()

    @property
    def has_work(self) -> bool:
        return bool(self._requests)

    @property
    def waiting_room(self) -> int:
        return self.config.running_max + self.config.waiting_max - len(self._requests)

    @property
    def running(self) -> list[Request]:
        """Requests past their first token (vLLM's own split is not exposed)."""
        return [r for r in self._requests.values() if r.first_token_s is not None]

    @property
    def waiting(self) -> list[Request]:
        return [r for r in self._requests.values() if r.first_token_s is None]

    # --- one step ---

    def step(self) -> list[StepOutput]:
        outputs = []
        now_s = time.perf_counter()
        for out in self.llm.step():
            request = self._requests.get(out.request_id)
            if request is None:
                continue  # Cancelled meanwhile.
            outputs.append(self._translate(request, out, now_s))
        return outputs

    def _translate(self, request: Request, out: Any, now_s: float) -> StepOutput:
        completion = out.outputs[0]
        known = len(request.output_ids)
        new = tuple(completion.token_ids[known:])
        step_tokens = len(new)
        if request.first_token_s is None:
            cached = min(out.num_cached_tokens or 0, len(request.prompt_ids) - 1)
            request.cached_prompt_tokens = cached
            request.admitted_s = request.first_token_s = now_s
            self.prefix_queried_tokens_total += len(request.prompt_ids) - 1
            self.prefix_hit_tokens_total += cached
            step_tokens += len(request.prompt_ids) - cached - 1
        request.ids.extend(new)
        delta = completion.text[len(request.text) :]
        request.text = completion.text
        finished = None
        if out.finished:
            request.finish_reason = "length" if completion.finish_reason == "length" else "stop"
            request.finished_s = now_s
            finished = self._requests.pop(request.request_id)
        return StepOutput(request.request_id, max(step_tokens, 1), new, delta, finished)


def priority_of(tier: Tier) -> int:
    """vLLM runs lower priority values first; tokenmill ranks the more important tier higher."""
    return max(TIER_RANK.values()) - TIER_RANK[tier]
