"""Fingerprints of model weights: a run resumes only onto the weights it started with.

A fingerprint hashes the whole content of every weight file (SHA-256 of 8 MiB blocks, read and
hashed by several threads at once), so any change to any tensor changes it, even one that
keeps the file's size; it does not change when a folder is copied (the file names and contents are
hashed, not their paths).

Each file's digest is cached in ``$LENSBENCH_CACHE/fingerprints.json`` under the file's resolved
path with its device, inode, size, mtime and ctime (nanoseconds): resuming onto an unchanged file
does not read it. Writing a file in place changes its mtime and ctime, and restoring the mtime
afterwards (``touch -d``, ``cp -p``, ``rsync -t``) still changes its ctime, so the cache misses and
the file is hashed again. A file modified within the last ``RACY_NS`` of hashing it is not cached
(a second write within the same timestamp tick would leave every key unchanged). Not covered: an
edit that leaves mtime and ctime as they were (setting the system clock back, or a filesystem
that does not update them).

The cache is written atomically (a temporary file renamed over it), so concurrent runs (DDP ranks)
may lose an entry, never corrupt the file; a cache that cannot be read is ignored and rewritten,
and one that cannot be written only costs a hash at the next run.

It reads the files, never a loaded model, so it is the same however the model is placed
(``device_map``, ``max_memory``, offloading) or on which device it runs.

Run folders made by earlier versions of lensbench hold a fingerprint of the sizes and three sampled
1 MiB blocks of the files (16 hex digits), which cannot prove the weights unchanged; the current
value starts with ``FORMAT``, so that ``older_format`` tells those folders apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .loading import ModelSpec, resolve_source
from .sources import cache_dir
from .spec import EMBEDDED

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
#: Each file is hashed in blocks of this size (part of the digest's definition: changing it changes
#: every fingerprint), ...
BLOCK = 8 << 20
#: ... by at most this many threads at once.
THREADS = 8
#: Prefix of the current fingerprints; the value keeps 16 characters.
FORMAT = "v2:"
#: A file modified this recently (or in the future: clock skew) is hashed but not cached.
RACY_NS = 2_000_000_000
#: At most this many files in the cache; the least recently hashed go first.
CACHE_ENTRIES = 4096
CACHE_FILE = "fingerprints.json"
#: ModelSpec fields that choose where the weights live, not what they are.
PLACEMENT_FIELDS = ("device_map", "max_memory")
#: ModelSpec fields added after run folders were made, left out of ``weight_settings`` while they
#: hold their default, so that the digests of those folders do not change.
_LEFT_OUT_AT_DEFAULT = {"load_in_4bit": False, "load_in_8bit": False, "allow_missing_weights": False}
_OLDER = re.compile(r"[0-9a-f]{16}")


def older_format(value: object) -> bool:
    """True for a weights fingerprint written by a lensbench that sampled the files (16 hex digits)."""
    return isinstance(value, str) and _OLDER.fullmatch(value) is not None


def hash_file(path: Path) -> str:
    """The digest of the whole content of ``path`` (hex): SHA-256 over the SHA-256 of each ``BLOCK``
    of it, in order; the blocks are read (``os.pread``) and hashed by up to ``THREADS`` threads
    at once, which hashlib and the read let run in parallel."""
    with open(path, "rb", buffering=0) as fh:
        fd = fh.fileno()
        size = os.fstat(fd).st_size

        def block(start: int) -> bytes:
            h, end = hashlib.sha256(), min(start + BLOCK, size)
            if not hasattr(os, "pread"):  # Windows: one block after another
                fh.seek(start)
            while start < end:
                data = os.pread(fd, end - start, start) if hasattr(os, "pread") else fh.read(end - start)
                if not data:  # cut short while read: hashed as it is
                    break
                h.update(data)
                start += len(data)
            return h.digest()

        starts = range(0, size, BLOCK)
        threads = min(len(starts), os.cpu_count() or 1, THREADS) if hasattr(os, "pread") else 1
        if threads <= 1:
            digests = [block(start) for start in starts]
        else:
            with ThreadPoolExecutor(threads) as pool:
                digests = list(pool.map(block, starts))
    return hashlib.sha256(b"".join(digests)).hexdigest()


def _key(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _read_cache(path: Path) -> dict[str, list]:
    """The cached entries (resolved path -> key + [digest, hashed at]); {} when missing or damaged."""
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if data.get("format") == 1 and isinstance(files, dict):
            return {k: v for k, v in files.items() if _entry(v)}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    return {}


def _entry(value: object) -> bool:
    """A cache entry: device, inode, size, mtime, ctime, digest, hashed at."""
    return (isinstance(value, list) and len(value) == 7 and isinstance(value[5], str)
            and all(isinstance(v, int) for v in value[:5] + value[6:]))


def _write_cache(path: Path, added: dict[str, list]) -> None:
    """Merge ``added`` into the cache file as it is now, and replace it atomically; never raises."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files = {k: v for k, v in _read_cache(path).items() if k not in added and os.path.exists(k)}
        files.update(added)
        if len(files) > CACHE_ENTRIES:
            files = dict(sorted(files.items(), key=lambda kv: kv[1][6])[-CACHE_ENTRIES:])
        tmp.write_text(json.dumps({"format": 1, "files": files}, separators=(",", ":")))
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass


def file_digests(paths: list[Path]) -> list[str]:
    """The digest of each file's content (``hash_file``), from the cache where its (device, inode,
    size, mtime, ctime) are those cached; the others are read, hashed and cached."""
    cache = cache_dir() / CACHE_FILE
    cached = _read_cache(cache)
    added: dict[str, list] = {}
    digests = []
    for path in paths:
        real = os.path.realpath(path)
        key = _key(os.stat(real))
        entry = cached.get(real)
        if entry is not None and entry[:5] == key:
            digests.append(entry[5])
            continue
        started = time.time_ns()
        digest = hash_file(Path(real))
        after = os.stat(real)
        if _key(after) == key and started - max(key[3], key[4]) > RACY_NS:
            added[real] = [*key, digest, started]
        digests.append(digest)
    if added:
        _write_cache(cache, added)
    return digests


def file_fingerprint(path: Path) -> str:
    """The digest of the whole content of ``path`` (``hash_file``, cached as ``file_digests`` says)."""
    return file_digests([Path(path)])[0]


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
    for path, digest in zip(files, file_digests(files)):
        h.update(f"{Path(path).name}:{digest}\n".encode())
    return FORMAT + h.hexdigest()[:16 - len(FORMAT)]


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
