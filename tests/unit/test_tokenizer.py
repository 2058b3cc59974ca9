"""The intake's tokenizer counts what the worker's transformers tokenizer counts, token for
token, without importing torch."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenmill import modelfiles, tokenizer
from tokenmill.settings import Settings

# The model cache the integration tests use (tests/conftest.py), so the tokenizer is made once.
CACHE_DIR = os.environ.get(
    "TOKENMILL_MODEL_CACHE_DIR", str(Path.home() / ".cache" / "tokenmill" / "models")
)
PROMPTS = ["Once upon a time", "<|im_start|>user\nhi", "你好，世界 " * 50, "  tabs\tand\n\nlines "]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi <|im_end|> there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "again\n"},
    ],
]


@pytest.fixture(scope="module")
def ours() -> tokenizer.Tokenizer:
    return tokenizer.load(Settings.from_env({}, model_cache_dir=CACHE_DIR))


@functools.cache
def transformers_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def transformers_ids(directory: Path, prompt, messages) -> list[int]:
    """What the worker's ModelRunner.encode gives, with transformers' own tokenizer."""
    reference = transformers_tokenizer(directory)
    if messages is None:
        return list(reference(prompt).input_ids)
    text = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(reference(text, add_special_tokens=False).input_ids)


@pytest.mark.parametrize(
    ("prompt", "messages"), [(p, None) for p in PROMPTS] + [(None, m) for m in CHATS]
)
def test_counts_match_the_workers_tokenizer(ours, prompt, messages):
    expected = transformers_ids(ours.directory, prompt, messages)
    assert ours.encode(prompt, messages) == expected
    assert ours.count(prompt, messages) == len(expected)


def test_context_is_the_models(ours):
    assert ours.context_tokens == 8192


def test_loading_it_does_not_import_torch():
    code = (
        "import sys; from tokenmill import tokenizer; from tokenmill.settings import Settings; "
        f"t = tokenizer.load(Settings.from_env({{}}, model_cache_dir={CACHE_DIR!r})); "
        "t.count('hi', None); assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.slow
def test_a_gguf_tokenizer_is_exported_once_without_the_model(tmp_path):
    settings = Settings.from_env({}, model_cache_dir=str(tmp_path))
    exported = tokenizer.load(settings)
    files = modelfiles.locate(settings.model, tmp_path)
    assert exported.directory == files.directory.with_name(f"{files.directory.name}.tokenizer")
    assert not files.directory.exists(), "the model itself is not dequantized"
    for prompt, messages in [(PROMPTS[2], None), (None, CHATS[1])]:
        assert exported.encode(prompt, messages) == transformers_ids(
            exported.directory, prompt, messages
        )
