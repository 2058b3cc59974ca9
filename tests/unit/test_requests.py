import pytest
from pydantic import ValidationError

from tokenmill.intake.requests import (
    GenerationRequest,
    InvalidRequest,
    check_fits,
    fingerprint,
    model_input,
    validate,
)
from tokenmill.settings import Settings

SETTINGS = Settings.from_env({}, max_prompt_chars=100, max_tokens_limit=64)


def check(api="jobs", **body):
    return validate(GenerationRequest(**body), api, SETTINGS)


def test_valid_job_passes_and_keeps_max_tokens():
    assert check(prompt="hi", max_tokens=8).max_tokens == 8


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "   ", "max_tokens": 8}, "prompt"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": -3}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 65}, "max_tokens"),
        ({"prompt": "hi"}, "max_tokens"),
        ({"prompt": "x" * 101, "max_tokens": 8}, "prompt"),
        ({"max_tokens": 8}, "prompt"),
        (
            {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
            "prompt",
        ),
        ({"prompt": "hi", "max_tokens": 8, "stream": True}, "stream"),
        ({"prompt": "hi", "max_tokens": 8, "model": "gpt-9"}, "model"),
        ({"prompt": "hi", "max_tokens": 8, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_bad_job_requests_are_refused_with_the_field_named(body, param):
    with pytest.raises(InvalidRequest) as refused:
        check(**body)
    assert refused.value.param == param


def test_chat_defaults_max_tokens_and_refuses_prompt():
    chat = check("chat", messages=[{"role": "user", "content": "hi"}])
    assert chat.max_tokens == 64
    with pytest.raises(InvalidRequest):
        check("chat", prompt="hi", max_tokens=8)


def test_chat_accepts_max_completion_tokens():
    chat = check("chat", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=5)
    assert chat.max_tokens == 5


def test_fingerprint_tells_bodies_and_apis_apart():
    a = check(prompt="hi", max_tokens=8)
    b = check(prompt="hi", max_tokens=9)
    assert fingerprint(a, "jobs") == fingerprint(check(prompt="hi", max_tokens=8), "jobs")
    assert fingerprint(a, "jobs") != fingerprint(b, "jobs")
    assert fingerprint(a, "jobs") != fingerprint(a, "completions")


HI = [{"role": "user", "content": "hi"}]


def test_chat_and_completions_stream_with_their_options():
    chat = check("chat", messages=HI, stream=True, stream_options={"include_usage": True})
    assert chat.stream and chat.stream_options.include_usage
    assert check("completions", prompt="hi", stream=True).stream_options is None


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_stream_options_need_stream_true(api):
    given = {"messages": HI} if api == "chat" else {"prompt": "hi"}
    for stream in ({}, {"stream": False}):
        with pytest.raises(InvalidRequest, match="only allowed when stream is true") as refused:
            check(api, **given, **stream, stream_options={"include_usage": True})
        assert refused.value.param == "stream_options"


def test_how_an_answer_is_delivered_is_not_part_of_its_idempotency_fingerprint():
    plain = check("chat", messages=HI, max_tokens=8)
    streamed = check(
        "chat", messages=HI, max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    assert fingerprint(plain, "chat") == fingerprint(streamed, "chat")


def test_a_jobs_prompt_goes_to_the_model_as_a_user_message():
    job = check(prompt="Name three colours.", max_tokens=8)
    prompt, messages = model_input(job, "jobs")
    assert prompt is None and [(m.role, m.content) for m in messages] == [
        ("user", "Name three colours.")
    ]
    completion = check("completions", prompt="1, 2,", max_tokens=8)
    assert model_input(completion, "completions") == ("1, 2,", None)


def parse_error(body: dict) -> tuple:
    """The location of the first thing wrong with `body` as JSON would parse it."""
    with pytest.raises(ValidationError) as refused:
        GenerationRequest.model_validate(body)
    return refused.value.errors()[0]["loc"]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"prompt": "a\x00b"}, ("prompt",)),
        ({"prompt": "\ud800"}, ("prompt",)),
        ({"model": "m\udfff"}, ("model",)),
        ({"stop": "\x00"}, ("stop", 0)),
        ({"stop": ["ok", "\ud83d"]}, ("stop", 1)),
        ({"messages": [{"role": "user", "content": "x\x00"}]}, ("messages", 0, "content")),
        ({"max_tokens": True}, ("max_tokens",)),
        ({"max_tokens": "4"}, ("max_tokens",)),
        ({"max_completion_tokens": 4.0}, ("max_completion_tokens",)),
        ({"temperature": "1"}, ("temperature",)),
        ({"stream": 0}, ("stream",)),
        ({"stream_options": {"include_usage": "yes"}}, ("stream_options", "include_usage")),
        ({"stream_options": True}, ("stream_options",)),
        ({"n": True}, ("n",)),
        ({"seed": 2**63}, ("seed",)),
        ({"seed": -(2**63) - 1}, ("seed",)),
    ],
)
def test_unwritable_text_and_loose_types_are_refused_when_parsed(body, loc):
    assert parse_error(body) == loc


def test_an_integer_temperature_and_the_seed_bounds_are_fine():
    parsed = GenerationRequest.model_validate({"temperature": 1, "seed": 2**63 - 1})
    assert parsed.temperature == 1.0 and parsed.seed == 2**63 - 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"stop": [""]}, "stop"),
        ({"stop": "s" * 257}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"max_tokens": 8, "max_completion_tokens": 9}, "max_completion_tokens"),
        ({"max_completion_tokens": 65}, "max_completion_tokens"),
    ],
)
def test_stop_and_token_limits(body, param):
    with pytest.raises(InvalidRequest) as refused:
        check("completions", prompt="hi", **body)
    assert refused.value.param == param


def test_message_count_is_bounded():
    many = [{"role": "user", "content": "hi"}] * (SETTINGS.request_messages_max + 1)
    with pytest.raises(InvalidRequest) as refused:
        check("chat", messages=many)
    assert refused.value.param == "messages"


def test_agreeing_max_tokens_names_are_fine():
    assert check(prompt="hi", max_tokens=8, max_completion_tokens=8).max_tokens == 8


class Counter:
    """Counts a character as a token and each message's role as one more."""

    context_tokens = 20

    def count(self, prompt, messages):
        return len(prompt) if messages is None else sum(len(m["content"]) + 1 for m in messages)


@pytest.mark.parametrize(("prompt", "fits"), [("x" * 12, True), ("x" * 13, False)])
def test_prompt_and_max_tokens_must_fit_the_context(prompt, fits):
    request = check("completions", prompt=prompt, max_tokens=8)
    if fits:
        check_fits(request, "completions", Counter())
    else:
        with pytest.raises(InvalidRequest, match="context of 20 tokens"):
            check_fits(request, "completions", Counter())


def test_a_jobs_prompt_is_counted_in_its_chat_template():
    with pytest.raises(InvalidRequest):
        check_fits(check(prompt="x" * 12, max_tokens=8), "jobs", Counter())
