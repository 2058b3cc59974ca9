"""What a client may ask for, checked before anything is written. Pure validation."""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Literal, Protocol

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)
from pydantic_core import PydanticCustomError

from tokenmill.events import ChatMessage, canonical_json
from tokenmill.settings import Settings

Api = Literal["jobs", "chat", "completions"]
# The seed reaches torch, whose generators take a 64-bit seed; JSON integers have no bound.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# Postgres text cannot hold NUL, and a lone surrogate (a JSON "\ud800" escape) cannot be
# encoded as UTF-8 for it or for the event log: either would fail only when written.
_UNWRITABLE = re.compile("[\x00\ud800-\udfff]")


def _writable(text: str) -> str:
    if _UNWRITABLE.search(text):
        raise PydanticCustomError(
            "unwritable_text", "must not contain NUL characters or unpaired surrogates"
        )
    return text


def _as_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


# Strict: a JSON number or boolean is never taken for text, nor text for a number.
Text = Annotated[StrictStr, AfterValidator(_writable)]


class InvalidRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class TokenCounter(Protocol):
    """The model's tokenizer, as far as intake needs it (tokenmill.tokenizer.Tokenizer)."""

    context_tokens: int

    def count(self, prompt: str | None, messages: list[dict[str, str]] | None) -> int: ...


class Message(BaseModel):
    """A chat message as a client sends it: the event's ChatMessage, checked strictly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: Text

    def for_model(self) -> ChatMessage:
        return ChatMessage(role=self.role, content=self.content)


class StreamOptions(BaseModel):
    """OpenAI's stream_options; fields we do not use are ignored, as at the top level."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    # A last chunk with the usage (prompt, completion and cached tokens), after the choices.
    include_usage: StrictBool = False


class GenerationRequest(BaseModel):
    """The body of POST /v1/jobs, /v1/completions and /v1/chat/completions.

    Unknown fields are ignored, as OpenAI clients send optional fields we do not use; they are
    never stored. Known fields are strict: `max_tokens: true` or `"4"` is a client bug to
    report, not a number to guess.
    """

    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    prompt: Text | None = None
    messages: list[Message] | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: StrictFloat = Field(default=0.0, ge=0.0, le=2.0)
    top_p: StrictFloat = Field(default=1.0, gt=0.0, le=1.0)
    # OpenAI takes one stop string or a list; one is read as a list of one.
    stop: Annotated[
        list[Text] | None, BeforeValidator(_as_list, json_schema_input_type=str | list[str] | None)
    ] = None
    seed: StrictInt | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None


def validate(request: GenerationRequest, api: Api, settings: Settings) -> GenerationRequest:
    """Refuse what cannot be served, with a message that says which field and why."""
    if request.stream and api == "jobs":
        raise InvalidRequest(
            "a job is not streamed; follow it at /v1/jobs/{id}, or stream from "
            "/v1/chat/completions or /v1/completions",
            "stream",
        )
    if request.stream_options is not None and not request.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true", "stream_options")
    if request.n != 1:
        raise InvalidRequest("only n=1 is supported", "n")
    if request.model not in (None, settings.model):
        raise InvalidRequest(
            f"model {request.model!r} is not served here; use {settings.model!r}", "model"
        )
    _check_input(request, api, settings)
    _check_stop(request.stop or [], settings)
    max_tokens = _max_tokens(request, api, settings)
    return request.model_copy(update={"max_tokens": max_tokens, "max_completion_tokens": None})


def prompt_chars(request: GenerationRequest) -> int:
    """How many characters of text the request gives the model."""
    return len(request.prompt or "") + sum(len(m.content) for m in request.messages or [])


def check_fits(request: GenerationRequest, api: Api, tokenizer: TokenCounter) -> int:
    """Refuse a validated request whose prompt leaves no room for max_tokens in the model's
    context, counted as the worker will count it; return the prompt's tokens (admission
    holds their price)."""
    prompt, messages = model_input(request, api)
    prompt_tokens = tokenizer.count(
        prompt, None if messages is None else [m.model_dump() for m in messages]
    )
    assert request.max_tokens is not None, "check_fits takes a validated request"
    if prompt_tokens + request.max_tokens > tokenizer.context_tokens:
        raise InvalidRequest(
            f"the prompt is {prompt_tokens} tokens and max_tokens is {request.max_tokens}; "
            f"together they must fit the model's context of {tokenizer.context_tokens} tokens",
            "messages" if request.messages is not None else "prompt",
        )
    return prompt_tokens


def _max_tokens(request: GenerationRequest, api: Api, settings: Settings) -> int:
    """The completion's limit, from max_tokens or max_completion_tokens (newer OpenAI clients
    send the latter)."""
    given = {request.max_tokens, request.max_completion_tokens} - {None}
    if len(given) > 1:
        raise InvalidRequest(
            "max_tokens and max_completion_tokens disagree; send one of them",
            "max_completion_tokens",
        )
    max_tokens = given.pop() if given else None
    if max_tokens is None:
        if api == "jobs":
            raise InvalidRequest("max_tokens is required", "max_tokens")
        max_tokens = min(256, settings.max_tokens_limit)
    if not 1 <= max_tokens <= settings.max_tokens_limit:
        name = "max_tokens" if request.max_completion_tokens is None else "max_completion_tokens"
        raise InvalidRequest(
            f"{name} must be between 1 and {settings.max_tokens_limit}, got {max_tokens}", name
        )
    return max_tokens


def _check_stop(stop: list[str], settings: Settings) -> None:
    if len(stop) > settings.request_stop_sequences_max:
        raise InvalidRequest(
            f"at most {settings.request_stop_sequences_max} stop sequences", "stop"
        )
    if any(not s for s in stop):
        # An empty stop string would match at once: the model could never say anything.
        raise InvalidRequest("stop sequences must not be empty", "stop")
    if any(len(s) > settings.request_stop_chars_max for s in stop):
        raise InvalidRequest(
            f"a stop sequence may be at most {settings.request_stop_chars_max} characters",
            "stop",
        )


def _check_input(request: GenerationRequest, api: Api, settings: Settings) -> None:
    if api == "chat" and request.prompt is not None:
        raise InvalidRequest("chat completions take messages, not prompt", "prompt")
    if api == "completions" and request.messages is not None:
        raise InvalidRequest("completions take prompt, not messages", "messages")
    if (request.prompt is None) == (request.messages is None):
        raise InvalidRequest("give exactly one of prompt or messages", "prompt")
    if request.prompt is not None and not request.prompt.strip():
        raise InvalidRequest("prompt must not be empty", "prompt")
    if request.messages is not None and len(request.messages) > settings.request_messages_max:
        raise InvalidRequest(
            f"{len(request.messages)} messages; the limit is {settings.request_messages_max}",
            "messages",
        )
    if request.messages is not None and not any(m.content.strip() for m in request.messages):
        raise InvalidRequest("messages must contain some text", "messages")
    chars = prompt_chars(request)
    if chars > settings.max_prompt_chars:
        raise InvalidRequest(
            f"the prompt is {chars} characters; the limit is {settings.max_prompt_chars}",
            "messages" if request.messages is not None else "prompt",
        )


def model_input(
    request: GenerationRequest, api: Api
) -> tuple[str | None, tuple[ChatMessage, ...] | None]:
    """What the model is given: (raw prompt, chat messages), exactly one of them set.

    /v1/completions completes raw text. A job's prompt is an instruction, so it goes to the
    model as one user message in its chat template, as chat messages do.
    """
    if request.messages is not None:
        return None, tuple(m.for_model() for m in request.messages)
    if api == "jobs":
        return None, (ChatMessage(role="user", content=request.prompt or ""),)
    return request.prompt, None


def fingerprint(request: GenerationRequest, api: Api) -> str:
    """What an idempotency key is bound to: the same key with another body is a client bug."""
    # How the answer is delivered is not part of the request: a streamed job may be replayed
    # without streaming, and the other way round.
    body = request.model_dump(mode="json", exclude={"stream", "n", "stream_options"})
    return hashlib.sha256(canonical_json({"api": api, **body}).encode()).hexdigest()
