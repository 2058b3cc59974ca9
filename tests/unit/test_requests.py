import pytest

from tokenmill.intake.requests import (
    GenerationRequest,
    InvalidRequest,
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


def test_a_jobs_prompt_goes_to_the_model_as_a_user_message():
    job = check(prompt="Name three colours.", max_tokens=8)
    prompt, messages = model_input(job, "jobs")
    assert prompt is None and [(m.role, m.content) for m in messages] == [
        ("user", "Name three colours.")
    ]
    completion = check("completions", prompt="1, 2,", max_tokens=8)
    assert model_input(completion, "completions") == ("1, 2,", None)
