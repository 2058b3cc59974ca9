"""A model's tokenizer without the model: the intake counts a prompt's tokens as the worker
will, to refuse a prompt that does not fit the context before anything is queued.

It reads the tokenizer files transformers writes (tokenizer.json, tokenizer_config.json, the
chat template, config.json) with the `tokenizers` library and renders the chat template with
jinja2 as transformers does, so the intake never imports torch or transformers: a process that
only counts tokens stays small. A GGUF model's tokenizer is exported once into the model cache,
in a child process that does import transformers, unless the worker's dequantized copy of the
model (which holds the same files) is already there.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as FastTokenizer

from tokenmill import modelfiles
from tokenmill.settings import Settings

log = logging.getLogger(__name__)

_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass(frozen=True)
class Tokenizer:
    directory: Path
    fast: FastTokenizer
    chat_template: Any  # a compiled jinja2 Template, or None for a model without one
    special_tokens: dict[str, str]
    context_tokens: int

    @classmethod
    def from_dir(cls, directory: Path) -> Tokenizer:
        config = _read_json(directory / "tokenizer_config.json")
        template_file = directory / "chat_template.jinja"
        source = (
            template_file.read_text() if template_file.is_file() else config.get("chat_template")
        )
        return cls(
            directory=directory,
            fast=FastTokenizer.from_file(str(directory / "tokenizer.json")),
            chat_template=None if source is None else _environment().from_string(source),
            special_tokens={
                name: value if isinstance(value, str) else value["content"]
                for name in _SPECIAL_TOKENS
                if (value := config.get(name)) is not None
            },
            context_tokens=_read_json(directory / "config.json")["max_position_embeddings"],
        )

    def encode(self, prompt: str | None, messages: list[dict[str, str]] | None) -> list[int]:
        """The token ids the worker gives the model: a raw prompt as the tokenizer encodes it,
        or messages rendered with the chat template, ending in the assistant's turn."""
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if messages is None:
            return self.fast.encode(prompt).ids
        if self.chat_template is None:
            raise ValueError("this model has no chat template; send a raw prompt")
        text = self.chat_template.render(
            messages=messages, add_generation_prompt=True, **self.special_tokens
        )
        # The template writes every special token it wants; the tokenizer must not add a BOS.
        return self.fast.encode(text, add_special_tokens=False).ids

    def count(self, prompt: str | None, messages: list[dict[str, str]] | None) -> int:
        return len(self.encode(prompt, messages))


def load(settings: Settings) -> Tokenizer:
    """The tokenizer of `settings.model`; slow only the first time a GGUF model is seen."""
    return _load(settings.model, settings.model_cache_path, settings.tokenizer_export_timeout_s)


@functools.cache
def _load(source: str, cache_dir: Path, export_timeout_s: float) -> Tokenizer:
    # Cached per process: every app the tests create shares one tokenizer.
    return Tokenizer.from_dir(_directory(modelfiles.locate(source, cache_dir), export_timeout_s))


def _directory(files: modelfiles.ModelFiles, export_timeout_s: float) -> Path:
    if files.gguf is None or files.directory.is_dir():
        return files.directory
    exported = files.directory.with_name(f"{files.directory.name}.tokenizer")
    if not exported.is_dir():
        log.info("exporting the tokenizer of %s into %s", files.gguf, exported)
        command = [sys.executable, "-m", __name__, str(files.gguf), str(exported)]
        subprocess.run(command, check=True, timeout=export_timeout_s)
    return exported


def _export(gguf: Path, target: Path) -> None:
    """Write the tokenizer and config of `gguf` into `target`, as the worker's dequantization
    writes them beside the weights."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoConfig, AutoTokenizer

    def save(directory: Path) -> None:
        for auto in (AutoTokenizer, AutoConfig):
            loaded = auto.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
            loaded.save_pretrained(directory)

    modelfiles.write_dir_atomically(target, save)


def _environment() -> ImmutableSandboxedEnvironment:
    """A jinja2 environment set up as transformers sets up the one it renders chat templates
    in: templates come from model repositories, so they run sandboxed."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja2's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


if __name__ == "__main__":
    _export(Path(sys.argv[1]), Path(sys.argv[2]))
