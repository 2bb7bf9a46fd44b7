"""The embedded default model made loadable: the SmolLM2 GGUF shipped in a package, de-quantized
once into lensbench's cache as a safetensors folder (``embedded_smollm2_folder``), safely across
concurrent processes (``convert_once``).
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .sources import SMOLLM2_CACHE_NAME, cache_dir
from .spec import EMBEDDED


def save_serializable(model: torch.nn.Module, tokenizer: Any, dest: str | Path) -> Path:
    """Save a model that refuses ``save_pretrained`` (GGUF-loaded) as a plain safetensors folder.

    A fresh model is built from the config without ``quantization_config`` and given the state dict.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    dtype = next(model.parameters()).dtype
    fresh = type(model)(config).to(dtype)
    fresh.load_state_dict(model.state_dict())
    if getattr(model, "generation_config", None) is not None:
        fresh.generation_config = copy.deepcopy(model.generation_config)
    dest = Path(dest)
    fresh.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic os.replace below still prevents corruption
        yield
        return
    with open(path, "a+") as handle:  # closing the file releases the lock
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def convert_once(dest: Path, build: Any) -> Path:
    """Fill ``dest`` by calling ``build(tmp_folder)`` once, safely across concurrent processes (DDP ranks)."""
    if _is_complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest.with_name(dest.name + ".lock")):
        if _is_complete(dest):  # another process finished while we waited
            return dest
        if dest.exists():
            shutil.rmtree(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            build(tmp)
            umask = os.umask(0)
            os.umask(umask)
            for item in [tmp, *tmp.rglob("*")]:  # mkdtemp/safetensors create private modes; share like a cache
                os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)
            try:
                os.replace(tmp, dest)
            except OSError:
                if not _is_complete(dest):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def embedded_smollm2_folder() -> Path:
    """The embedded SmolLM2 GGUF, de-quantized once into ``cache_dir()/models/smollm2-135m-instruct``."""
    gguf_path = EMBEDDED["smollm2"].locate("smollm2", "model.source")

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        save_serializable(model, tokenizer, tmp)

    return convert_once(cache_dir() / "models" / SMOLLM2_CACHE_NAME, build)
