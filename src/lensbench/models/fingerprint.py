"""Fingerprints of model weights: a run resumes only onto the weights it started with.

A fingerprint reads a few blocks of every weight file (its size plus three 1 MiB samples), so it
costs milliseconds for any model size, does not change when a folder is copied, and changes when
weights are rewritten in place (a fine-tuned model saved over the old one).

It reads the files, never a loaded model, so it is the same however the model is placed
(``device_map``, ``max_memory``, offloading) or on which device it runs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .loading import EMBEDDED, ModelSpec, resolve_source

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
BLOCK = 1 << 20
#: ModelSpec fields that choose where the weights live, not what they are.
PLACEMENT_FIELDS = ("device_map", "max_memory")
#: ModelSpec fields added after run folders were made, left out of ``weight_settings`` while they
#: hold their default, so that the digests of those folders do not change.
_LEFT_OUT_AT_DEFAULT = {"load_in_4bit": False, "load_in_8bit": False, "allow_missing_weights": False}


def file_fingerprint(path: Path, digest=None) -> str:
    """Size and three sampled blocks (start, middle, end) of ``path``, hashed."""
    h = digest or hashlib.sha256()
    size = Path(path).stat().st_size
    h.update(f"{Path(path).name}:{size}".encode())
    with open(path, "rb") as fh:
        for offset in sorted({0, max(0, size // 2 - BLOCK // 2), max(0, size - BLOCK)}):
            fh.seek(offset)
            h.update(fh.read(BLOCK))
    return h.hexdigest()[:16]


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def model_fingerprint(spec: ModelSpec, field: str = "model") -> str:
    """The fingerprint of ``spec``'s weights (hub models not in the local cache: their id and revision)."""
    res = resolve_source(spec, field)
    if res.kind == "embedded":
        files = [EMBEDDED[res.location].locate(res.location, f"{field}.source")]
        files = weight_files(files[0]) if files[0].is_dir() else files
    elif res.weights_file is not None:
        files = [res.weights_file]
    elif res.gguf_file is not None and Path(res.location).is_dir():
        files = [Path(res.location) / res.gguf_file]
    elif Path(res.location).is_dir():
        files = weight_files(Path(res.location))
    else:
        files = _cached_hub_files(res, spec)
        if not files:
            return f"hub:{res.location}@{spec.revision or 'main'}"
    h = hashlib.sha256()
    for path in files:
        file_fingerprint(path, h)
    return h.hexdigest()[:16]


def weight_settings(spec: ModelSpec) -> dict:
    """The settings of ``spec`` besides its source and label, for digests of what a run studies
    (dtype, revision, head, transforms, quantization, ...): never its placement (``device_map``,
    ``max_memory``), so that a run resumes under another device map, and the quantization fields
    only when on, so that digests made before they existed stay valid."""
    return {k: v for k, v in spec.__dict__.items()
            if k not in ("name", "source", *PLACEMENT_FIELDS)
            and not (k in _LEFT_OUT_AT_DEFAULT and v == _LEFT_OUT_AT_DEFAULT[k])}


def without_placement(value):
    """A resolved config (or part of it) with every model entry (a mapping with ``source`` and
    ``device_map``) stripped of its placement fields and of the quantization fields while off: the
    run identity of a config then matches that of run folders made before these fields existed,
    and a run resumes under another device map."""
    if isinstance(value, list):
        return [without_placement(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "source" in value and "device_map" in value:
        return {k: v for k, v in value.items()
                if k not in PLACEMENT_FIELDS and not (k in _LEFT_OUT_AT_DEFAULT and v == _LEFT_OUT_AT_DEFAULT[k])}
    return {k: without_placement(v) for k, v in value.items()}


def _cached_hub_files(res, spec: ModelSpec) -> list[Path]:
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(res.location, spec.gguf_file or "config.json", cache_dir=res.cache_dir,
                                    revision=spec.revision)
    if not isinstance(config, str):
        return []
    folder = Path(config).parent
    return [folder / spec.gguf_file] if spec.gguf_file else weight_files(folder)
