"""The continuous-batching engine: many requests share every forward pass.

Each `step()` schedules work for one forward pass and runs it:

1. Priority: while a waiting request outranks the least important running one and the engine
   is full (running slots or KV blocks), that running request is preempted: its blocks are
   released (their named prefix stays cached) and it goes back to the head of its tier's
   queue keeping every token it made; it is recomputed when it comes back.
2. Running requests get their tokens first: one per decode, then the rest of the step's token
   budget goes to prompt chunks (chunked prefill), so a long prompt never stalls decodes for
   more than one chunk. A request that needs a block when none is left preempts the least
   important running request not yet scheduled (itself, if that is the least important).
3. Waiting requests are admitted in queue order (tier, then customer round-robin) while slots,
   budget and blocks last; each first takes the cached blocks of its longest cached prefix.

The step returns one `StepOutput` per request it touched: the new token ids, the text they
added, how many tokens the request had in the step (the energy split uses it) and, at the end,
the finished request. Nothing here is thread-safe: one thread drives the engine (see
`serving.py`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tokenmill.events import Tier
from tokenmill.worker.kvcache import BlockPool, BlockTable, OutOfBlocks
from tokenmill.worker.llama import LlamaForward, SeqBatch
from tokenmill.worker.model import ModelRunner, SamplingParams, first_stop, sample_token
from tokenmill.worker.scheduler import TIER_RANK, FairQueue


class QueueFull(Exception):
    """The waiting queue is at its bound: the caller keeps the request (in Redis) for later."""


@dataclass(frozen=True)
class EngineConfig:
    kv_cache_bytes: int
    block_size: int = 16
    step_tokens_max: int = 256  # Prefill chunks and decodes together, per forward pass.
    running_max: int = 32
    waiting_max: int = 64
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        if min(self.block_size, self.running_max, self.waiting_max) < 1:
            raise ValueError(f"block size, running and waiting limits must be positive: {self}")
        # Every running request needs at least its decode token in a step.
        if self.step_tokens_max < self.running_max:
            raise ValueError(
                f"engine_step_tokens_max ({self.step_tokens_max}) must be at least "
                f"engine_running_max ({self.running_max})"
            )


@dataclass
class Request:
    """One request in the engine, waiting or running."""

    request_id: str
    customer_id: str
    tier: Tier
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens clamped to the model's context.
    generator: torch.Generator | None
    arrival_s: float
    ids: list[int] = field(init=False)  # Prompt then completion.
    table: BlockTable = field(default_factory=BlockTable)
    computed: int = 0  # Positions whose KV is in the cache.
    cached_prompt_tokens: int | None = None  # Known once first admitted.
    preemptions: int = 0
    admission: int = 0  # Order of the latest admission: among equals, the newest yields.
    admitted_s: float | None = None
    first_token_s: float | None = None
    finished_s: float | None = None
    finish_reason: str | None = None
    text: str = ""  # Streamed so far; the final text replaces it when finished.
    _read_offset: int = 0
    _prefix_offset: int = 0

    def __post_init__(self) -> None:
        self.ids = list(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.ids[len(self.prompt_ids) :]

    @property
    def remaining(self) -> int:
        """Positions still to run before the next token can be sampled."""
        return len(self.ids) - self.computed


@dataclass(frozen=True)
class StepOutput:
    """What one step did for one request. The text deltas of a request that ends on a stop
    string include the stop string; the finished request's `text` (cut before it) is the
    answer."""

    request_id: str
    step_tokens: int  # Tokens this request had in the step (prompt chunk or decode).
    new_token_ids: tuple[int, ...]
    text_delta: str
    finished: Request | None  # Set once, on the step that finishes the request.


class BatchEngine:
    """Requests, the KV block pool, the model's batched forward pass, and the scheduler."""

    def __init__(self, runner: ModelRunner, config: EngineConfig) -> None:
        self.runner = runner
        self.config = config
        block_bytes = LlamaForward.bytes_per_block(runner.model, config.block_size)
        num_blocks = config.kv_cache_bytes // block_bytes
        if num_blocks < 2:
            raise ValueError(
                f"a KV cache of {config.kv_cache_bytes} bytes holds {num_blocks} blocks of "
                f"{block_bytes} bytes; it needs at least 2"
            )
        self.forward = LlamaForward(runner.model, num_blocks, config.block_size)
        self.pool = BlockPool(num_blocks, config.block_size, config.prefix_caching)
        self.waiting: FairQueue[Request] = FairQueue()
        self.running: list[Request] = []
        self._cancelled: set[str] = set()
        # Tiers curtailed under the power cap: at most this many of their requests running.
        self._tier_running_max: dict[str, int] = {}
        self._admissions = 0
        self.preemptions_total = 0
        self.prefix_queried_tokens_total = 0
        self.prefix_hit_tokens_total = 0

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
        """Queue a request; ValueError if it can never run, QueueFull if the queue is full."""
        if len(self.waiting) >= self.config.waiting_max:
            raise QueueFull(f"{len(self.waiting)} requests wait already")
        max_tokens = self.runner.clamp_max_tokens(len(prompt_ids), params.max_tokens)
        positions = len(prompt_ids) + max_tokens
        if positions > self.pool.num_blocks * self.config.block_size:
            raise ValueError(
                f"prompt and completion need {positions} positions; this worker's KV cache "
                f"holds {self.pool.num_blocks * self.config.block_size}"
            )
        request = Request(
            request_id=request_id,
            customer_id=customer_id,
            tier=tier,
            prompt_ids=list(prompt_ids),
            params=params,
            max_tokens=max_tokens,
            generator=self.runner.generator(params),
            arrival_s=time.perf_counter() if arrival_s is None else arrival_s,
        )
        self.waiting.push(request)
        return request

    def cancel(self, request_id: str) -> None:
        """Stop a request at the start of the next step; it produces no further output."""
        self._cancelled.add(request_id)

    def stop(self, request_id: str) -> Request | None:
        """End a request now as "cancelled", keeping the tokens it made, and free its blocks;
        None if the engine does not hold it (it finished already)."""
        request = self.waiting.remove(request_id)
        if request is None:
            request = next((r for r in self.running if r.request_id == request_id), None)
            if request is None:
                return None
            self.running.remove(request)
        self.pool.release(request.table)
        request.finish_reason = "cancelled"
        request.finished_s = time.perf_counter()
        # It ended before any stop string or EOS (either would have finished it).
        request.text = self.runner.decode(request.output_ids)
        return request

    def abort_all(self) -> None:
        """Drop every request, waiting or running, and release its blocks (after a failed step,
        whose state cannot be trusted)."""
        while self.waiting:
            self.pool.release(self.waiting.pop().table)
        for request in self.running:
            self.pool.release(request.table)
        self.running.clear()
        self._cancelled.clear()

    def limit_tiers(self, running_max: dict[str, int]) -> None:
        """Admit a tier's waiting requests only while fewer than `running_max[tier]` of its
        requests run (tiers not named: no limit). Running requests are never stopped for it,
        and at least one may always run, so accepted work keeps completing."""
        assert all(limit >= 1 for limit in running_max.values()), running_max
        self._tier_running_max = dict(running_max)

    @property
    def tier_running_max(self) -> dict[str, int]:
        return dict(self._tier_running_max)

    def _may_admit(self, request: Request) -> bool:
        limit = self._tier_running_max.get(request.tier)
        return limit is None or sum(r.tier == request.tier for r in self.running) < limit

    @property
    def has_work(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    @property
    def waiting_room(self) -> int:
        return self.config.waiting_max - len(self.waiting)

    # --- one step ---

    def step(self) -> list[StepOutput]:
        self._drop_cancelled()
        scheduled = self._schedule()
        if not scheduled:
            return []
        token_ids: list[int] = []
        batch: list[SeqBatch] = []
        for request, count in scheduled:
            token_ids.extend(request.ids[request.computed : request.computed + count])
            batch.append(self._seq_batch(request, count))
        logits = self.forward.step(token_ids, batch)
        outputs, row = [], 0
        now_s = time.perf_counter()
        for (request, count), seq in zip(scheduled, batch, strict=True):
            request.computed += count
            self.pool.seal_full_blocks(request.table, request.ids, request.computed)
            new: tuple[int, ...] = ()
            delta = ""
            if seq.wants_logits:
                new = (sample_token(logits[row], request.params, request.generator),)
                row += 1
                delta = self._append(request, new[0], now_s)
            finished = request if request.finish_reason is not None else None
            if finished is not None:
                self._finish(request, now_s)
            outputs.append(StepOutput(request.request_id, count, new, delta, finished))
        assert row == logits.shape[0]
        return outputs

    def _seq_batch(self, request: Request, count: int) -> SeqBatch:
        end = request.computed + count
        size = self.config.block_size
        blocks = torch.tensor(request.table.blocks, dtype=torch.long)
        positions = torch.arange(end)
        slots = blocks[positions // size] * size + positions % size
        return SeqBatch(request.computed, count, slots, wants_logits=end == len(request.ids))

    def _append(self, request: Request, token: int, now_s: float) -> str:
        """Add a sampled token; set the finish reason if it ends the request; return the text
        it adds to the stream."""
        request.ids.append(token)
        if request.first_token_s is None:
            request.first_token_s = now_s
        completion = request.output_ids
        stop = request.params.stop
        if token in self.runner.eos_token_ids:
            request.finish_reason = "stop"
        elif stop and first_stop(self.runner.decode(completion), stop) is not None:
            request.finish_reason = "stop"
        elif len(completion) >= request.max_tokens:
            request.finish_reason = "length"
        return self._stream_text(request)

    def _stream_text(self, request: Request) -> str:
        """The text the newest token completes. A token can end inside a multi-byte character,
        so text is released only once it decodes cleanly (the incremental method of
        transformers' TextStreamer)."""
        completion = [t for t in request.output_ids if t not in self.runner.eos_token_ids]
        before = self.runner.decode(completion[request._prefix_offset : request._read_offset])
        after = self.runner.decode(completion[request._prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        request._prefix_offset, request._read_offset = request._read_offset, len(completion)
        delta = after[len(before) :]
        request.text += delta
        return delta

    def _finish(self, request: Request, now_s: float) -> None:
        """The authoritative text (decoded whole, cut before a stop string), and the request's
        blocks back to the pool."""
        text = self.runner.decode(request.output_ids)
        cut = first_stop(text, request.params.stop)
        request.text = text if cut is None else text[:cut]
        request.finished_s = now_s
        self.pool.release(request.table)
        self.running.remove(request)
        assert 0 < len(request.output_ids) <= request.max_tokens

    def _drop_cancelled(self) -> None:
        for request_id in self._cancelled:
            request = self.waiting.remove(request_id)
            if request is None:
                request = next((r for r in self.running if r.request_id == request_id), None)
                if request is not None:
                    self.running.remove(request)
            if request is not None:
                self.pool.release(request.table)
        self._cancelled.clear()

    # --- scheduling ---

    def _schedule(self) -> list[tuple[Request, int]]:
        self._preempt_for_priority()
        budget = self.config.step_tokens_max
        scheduled: list[tuple[Request, int]] = []
        # Decodes first, then prompt chunks; most important first within each.
        for request in sorted(self.running, key=lambda r: (r.remaining > 1, -_rank(r))):
            if request not in self.running or budget == 0:
                continue  # Preempted meanwhile to make room for a more important one.
            count = min(request.remaining, budget)
            if self._grow(request, count, scheduled):
                scheduled.append((request, count))
                budget -= count
        while budget > 0 and len(self.running) < self.config.running_max and self.waiting:
            head = self.waiting.peek()
            # Head-of-line: nothing less important jumps the queue (nor a tier shed after it).
            if not self._may_admit(head):
                break
            count = self._admit(head, budget)
            if count == 0:
                break
            scheduled.append((self.running[-1], count))
            budget -= count
        return scheduled

    def _preempt_for_priority(self) -> None:
        """Make room for a waiting request that outranks running ones, least important first."""
        while self.running and self.waiting:
            head = self.waiting.peek()
            victim = min(self.running, key=_priority)
            if _rank(victim) >= _rank(head) or not self._may_admit(head):
                return
            first_chunk = min(len(head.ids), self.config.step_tokens_max)
            blocks_needed = -(-first_chunk // self.pool.block_size)
            full = len(self.running) >= self.config.running_max
            if not full and self.pool.available >= blocks_needed:
                return
            self._preempt(victim)

    def _grow(self, request: Request, count: int, scheduled: list) -> bool:
        """Blocks for `count` more positions of a running request, preempting less important
        unscheduled requests (or the request itself) when the pool is empty."""
        busy = {r.request_id for r, _ in scheduled}
        while True:
            try:
                self.pool.grow(request.table, request.computed + count)
                return True
            except OutOfBlocks:
                idle = [r for r in self.running if r.request_id not in busy and r is not request]
                victim = min(idle, key=_priority, default=None)
                if victim is None or _priority(victim) > _priority(request):
                    self._preempt(request)
                    return False
                self._preempt(victim)

    def _admit(self, request: Request, budget: int) -> int:
        """Move the head of the queue into the running batch with its first chunk; 0 if the
        pool cannot hold that chunk."""
        # At least one position is always computed, for the logits of the next token.
        cached = self.pool.match_prefix(request.table, request.ids, len(request.ids) - 1)
        request.computed = cached
        count = min(request.remaining, budget)
        try:
            self.pool.grow(request.table, request.computed + count)
        except OutOfBlocks:
            # It waits without holding blocks, so its cached prefix stays evictable.
            self.pool.release(request.table)
            request.computed = 0
            return 0
        # Counted once admitted: only blocks actually reused are billed as cached.
        self.prefix_queried_tokens_total += len(request.ids) - 1
        self.prefix_hit_tokens_total += cached
        if request.cached_prompt_tokens is None:
            request.cached_prompt_tokens = min(cached, len(request.prompt_ids))
        self.waiting.pop()
        if request.admitted_s is None:
            request.admitted_s = time.perf_counter()
        self._admissions += 1
        request.admission = self._admissions
        self.running.append(request)
        return count

    def _preempt(self, request: Request) -> None:
        """Free a running request's KV; it keeps its tokens and recomputes them when resumed."""
        self.pool.release(request.table)
        request.computed = 0
        request.preemptions += 1
        self.preemptions_total += 1
        self.running.remove(request)
        self.waiting.push_front(request)


def _rank(request: Request) -> int:
    return TIER_RANK[request.tier]


def _priority(request: Request) -> tuple[int, int]:
    """Higher is more important: tier first, then earlier admission."""
    return (_rank(request), -request.admission)
