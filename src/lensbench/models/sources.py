"""Where a model's files are: the embedded models, lensbench's and the hub's caches, the hub's
reachability, and ``locate_source``, which turns a ``ModelSpec.source`` (an embedded alias, a
folder, a .safetensors or .gguf file, a hub id) into a ``ResolvedSource`` without reading weights.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LensbenchError, did_you_mean
from .integrity import link_refusal
from .spec import EMBEDDED, ModelSpec

#: A ModelSpec's dtype choices (auto: the checkpoint's own) and head choices.
DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HEADS = ("auto", "causal_lm", "image_text_to_text", "base")
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"


@dataclass
class ResolvedSource:
    kind: str  # embedded | folder | safetensors | gguf | hub
    location: str  # alias, folder, or hub id
    gguf_file: str | None = None
    weights_file: Path | None = None
    local_only: bool = False
    cache_dir: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("LENSBENCH_CACHE") or Path.home() / ".cache" / "lensbench").expanduser()


def hf_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment now (not at import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set, or the hub host cannot be reached at all."""
    truthy = ("1", "on", "yes", "true")
    if any(os.environ.get(v, "").strip().lower() in truthy for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False  # a proxy may reach what a direct socket cannot: let transformers decide
    host = re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=3).close()
        return False
    except OSError:
        return True


def offline_error(hub_id: str, field: str) -> LensbenchError:
    """The one line for a hub id that is neither cached nor reachable (found here, or while loading)."""
    return LensbenchError(
        f"model {hub_id!r} is not a local path and is not in the Hugging Face cache, and the hub is unreachable "
        f"(offline): download it on a connected machine (`hf download {hub_id}`) or set source to a local folder "
        f"or an embedded model ({', '.join(EMBEDDED)})", f"{field}.source")


def locate_source(spec: ModelSpec, field: str = "model") -> ResolvedSource:
    """Locate ``spec.source`` without reading weights: an embedded alias, a folder, a .safetensors
    or .gguf file, or a hub id (in the Hugging Face cache, or reachable); a one-line error when it
    names nothing usable."""
    src = str(spec.source or "").strip()
    if not src:
        raise LensbenchError(f"source is empty; give a folder/file, a hub id, or one of the embedded models: "
                             f"{', '.join(EMBEDDED)}", f"{field}.source")
    if src in EMBEDDED:
        EMBEDDED[src].locate(src, f"{field}.source")
        return ResolvedSource("embedded", src)
    path = Path(src).expanduser()
    if path.exists():
        if path.is_dir():
            if spec.gguf_file:
                if not (path / spec.gguf_file).is_file():
                    raise LensbenchError(f"gguf_file {spec.gguf_file!r} is not in folder '{path}'; give the name of "
                                         f"a .gguf file inside it", f"{field}.gguf_file")
                return ResolvedSource("gguf", str(path), gguf_file=spec.gguf_file)
            if not (path / "config.json").is_file():
                raise LensbenchError(f"folder '{path}' has no config.json; give a folder written by save_pretrained, "
                                     f"a .safetensors/.gguf file, or set gguf_file", f"{field}.source")
            return ResolvedSource("folder", str(path))
        if path.suffix == ".gguf":
            return ResolvedSource("gguf", str(path.parent), gguf_file=path.name)
        if path.suffix == ".safetensors":
            if not (path.parent / "config.json").is_file():
                raise LensbenchError(f"'{path}' has no config.json next to it; put the model's config.json in "
                                     f"the same folder", f"{field}.source")
            return ResolvedSource("safetensors", str(path.parent), weights_file=path)
        raise LensbenchError(f"file '{path}' is neither a .safetensors nor a .gguf file; give a model folder, "
                             f"a .safetensors or .gguf file, or a hub id", f"{field}.source")
    linked = link_refusal(path, f"{field}.source")
    if linked is not None:
        raise linked
    looks_like_path = src.startswith(("/", ".", "~")) or "\\" in src or src.count("/") > 1 \
        or path.suffix in (".gguf", ".safetensors")
    if looks_like_path or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", src):
        raise LensbenchError(f"path '{src}' does not exist; give an existing folder/file, a hub id, or one of the "
                             f"embedded models: {', '.join(EMBEDDED)}", f"{field}.source")
    if "/" not in src and (hint := did_you_mean(src.lower(), list(EMBEDDED))).startswith("did you mean"):
        raise LensbenchError(f"unknown embedded model {src!r}; {hint}", f"{field}.source")
    from huggingface_hub import try_to_load_from_cache

    hf_cache = hf_cache_dir()
    cached = try_to_load_from_cache(src, spec.gguf_file or "config.json", cache_dir=hf_cache, revision=spec.revision)
    offline = hub_offline()
    if offline and not isinstance(cached, str):
        raise offline_error(src, field)
    return ResolvedSource("hub", src, gguf_file=spec.gguf_file, local_only=offline, cache_dir=hf_cache)
