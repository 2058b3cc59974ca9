"""What a client may ask for, checked before anything is written. Pure validation."""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tokenmill.events import ChatMessage, canonical_json
from tokenmill.settings import Settings

Api = Literal["jobs", "chat", "completions"]
STOP_SEQUENCES_MAX = 4


class InvalidRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class GenerationRequest(BaseModel):
    """The body of POST /v1/jobs, /v1/completions and /v1/chat/completions.

    Unknown fields are ignored, as OpenAI clients send optional fields we do not use.
    """

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_as_list(cls, value: str | list[str] | None) -> list[str] | None:
        return [value] if isinstance(value, str) else value


def validate(request: GenerationRequest, api: Api, settings: Settings) -> GenerationRequest:
    """Refuse what cannot be served, with a message that says which field and why."""
    if request.stream:
        raise InvalidRequest("streaming is not supported yet; send stream=false", "stream")
    if request.n != 1:
        raise InvalidRequest("only n=1 is supported", "n")
    if request.model not in (None, settings.model):
        raise InvalidRequest(
            f"model {request.model!r} is not served here; use {settings.model!r}", "model"
        )
    _check_input(request, api, settings)
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is None:
        if api == "jobs":
            raise InvalidRequest("max_tokens is required", "max_tokens")
        max_tokens = min(256, settings.max_tokens_limit)
    if not 1 <= max_tokens <= settings.max_tokens_limit:
        raise InvalidRequest(
            f"max_tokens must be between 1 and {settings.max_tokens_limit}, got {max_tokens}",
            "max_tokens",
        )
    if request.stop and len(request.stop) > STOP_SEQUENCES_MAX:
        raise InvalidRequest(f"at most {STOP_SEQUENCES_MAX} stop sequences", "stop")
    return request.model_copy(update={"max_tokens": max_tokens, "max_completion_tokens": None})


def _check_input(request: GenerationRequest, api: Api, settings: Settings) -> None:
    if api == "chat" and request.prompt is not None:
        raise InvalidRequest("chat completions take messages, not prompt", "prompt")
    if api == "completions" and request.messages is not None:
        raise InvalidRequest("completions take prompt, not messages", "messages")
    if (request.prompt is None) == (request.messages is None):
        raise InvalidRequest("give exactly one of prompt or messages", "prompt")
    if request.prompt is not None and not request.prompt.strip():
        raise InvalidRequest("prompt must not be empty", "prompt")
    if request.messages is not None and not any(m.content.strip() for m in request.messages):
        raise InvalidRequest("messages must contain some text", "messages")
    chars = len(request.prompt or "") + sum(len(m.content) for m in request.messages or [])
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
        return None, tuple(request.messages)
    if api == "jobs":
        return None, (ChatMessage(role="user", content=request.prompt or ""),)
    return request.prompt, None


def fingerprint(request: GenerationRequest, api: Api) -> str:
    """What an idempotency key is bound to: the same key with another body is a client bug."""
    body = request.model_dump(mode="json", exclude={"stream", "n"})
    return hashlib.sha256(canonical_json({"api": api, **body}).encode()).hexdigest()
