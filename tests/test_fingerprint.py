"""Weight fingerprints hash every byte of the weights, and cache each file's digest by its
(device, inode, size, mtime, ctime): an in-place edit at equal size is refused on resume, an
unchanged file is not read again."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import clean_env, lensbench
from helpers_cli import last_line, snapshot
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import save_tiny_llama, write_texts

import lensbench.models.fingerprint as fp
from lensbench.models.fingerprint import FORMAT, file_fingerprint, model_fingerprint, older_format
from lensbench.models.loading import ModelSpec

HOUR = 3600 * 10**9


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / fp.CACHE_FILE


@pytest.fixture
def later(monkeypatch):
    """Files written just now are cached as if they were older (in tests every file is recent)."""
    monkeypatch.setattr(fp, "RACY_NS", -HOUR)


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The files ``hash_file`` reads."""
    seen: list[str] = []
    real = fp.hash_file

    def spy(path):
        seen.append(str(path))
        return real(path)

    monkeypatch.setattr(fp, "hash_file", spy)
    return seen


def digest_of(data: bytes) -> str:
    """SHA-256 over the SHA-256 of each block of ``data``: what ``hash_file`` computes, written plainly."""
    blocks = [data[i:i + fp.BLOCK] for i in range(0, len(data), fp.BLOCK)]
    return hashlib.sha256(b"".join(hashlib.sha256(b).digest() for b in blocks)).hexdigest()


def sampled_fingerprint(path: Path) -> str:
    """The fingerprint of earlier lensbench versions: the size and three sampled 1 MiB blocks."""
    block, size = 1 << 20, path.stat().st_size
    h = hashlib.sha256(f"{path.name}:{size}".encode())
    with open(path, "rb") as fh:
        for offset in sorted({0, max(0, size // 2 - block // 2), max(0, size - block)}):
            fh.seek(offset)
            h.update(fh.read(block))
    return h.hexdigest()[:16]


def unsampled_tensor(path: Path) -> str:
    """A tensor whose bytes lie outside the three blocks the sampled fingerprint read."""
    block, size = 1 << 20, path.stat().st_size
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    sampled = [(0, block), (size // 2 - block // 2, size // 2 + block // 2), (size - block, size)]
    offsets = {k: v["data_offsets"] for k, v in json.loads(path.read_bytes()[8:header]).items() if k != "__metadata__"}
    for name, (start, end) in sorted(offsets.items()):
        if all(header + end <= a or header + start >= b for a, b in sampled):
            return name
    raise AssertionError("every tensor overlaps a sampled block")


def scale_in_place(path: Path, name: str, factor: float = 50.0) -> None:
    """Rewrite ``path`` with tensor ``name`` multiplied by ``factor``: same names, shapes and size."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors[name] = tensors[name] * factor
    size = path.stat().st_size
    save_file(tensors, str(path), metadata=metadata)
    assert path.stat().st_size == size


@pytest.fixture
def model(tmp_path) -> Path:
    """A Llama of about 9.5 MB (4 blocks, width 256): several tensors lie outside the sampled blocks."""
    return save_tiny_llama(tmp_path / "m", layers=4, hidden=256)


def test_scaling_one_tensor_in_place_at_equal_size_changes_the_fingerprint(model):
    weights = model / "model.safetensors"
    name = unsampled_tensor(weights)
    before, sampled = model_fingerprint(ModelSpec(str(model))), sampled_fingerprint(weights)
    scale_in_place(weights, name)
    assert sampled_fingerprint(weights) == sampled  # the edit the sampled fingerprint could not see
    after = model_fingerprint(ModelSpec(str(model)))
    assert after != before and after.startswith(FORMAT) and before.startswith(FORMAT)
    assert len(after) == 16 and not older_format(after) and older_format(sampled)


def test_a_run_resumed_onto_weights_scaled_in_place_is_refused_and_leaves_the_folder_as_it_was(model, tmp_path):
    """The issue: a run, one tensor scaled by 50 at equal size, the run extended with more texts."""
    write_texts(tmp_path / "alpha.txt", 6, seed=1)
    write_texts(tmp_path / "beta.txt", 5, seed=2)
    config = ("model:\n  class_path: activation_norms\n  init_args:\n    models: [m]\n    experiment: edited\n"
              "data:\n  class_path: lensbench.data.modules.TextDataModule\n  init_args:\n"
              "    datasets: [{}]\n    batch_size: 4\ntrainer:\n  accelerator: cpu\n  devices: 1\n")
    (tmp_path / "first.yaml").write_text(config.format("alpha.txt"))
    (tmp_path / "more.yaml").write_text(config.format("alpha.txt, beta.txt"))
    env = clean_env(LENSBENCH_CACHE=os.environ["LENSBENCH_CACHE"])
    first = lensbench("predict", "--config", "first.yaml", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = tmp_path / "outputs" / "edited"
    stored = json.loads((run_dir / "run.json").read_text())["model_fingerprint.m"]
    assert stored == model_fingerprint(ModelSpec(str(model)))
    scale_in_place(model / "model.safetensors", unsampled_tensor(model / "model.safetensors"))
    before = snapshot(run_dir)
    refused = lensbench("predict", "--config", "more.yaml", cwd=tmp_path, env=env)
    assert refused.returncode == 1, refused.stderr[-2000:]
    line = last_line(refused.stderr)
    assert line.startswith("lensbench: error: model.init_args.experiment: ") and \
        "the weights of m changed since it started" in line, line
    assert snapshot(run_dir) == before


def test_an_unchanged_file_is_not_read_again(model, own_cache, later, reads):
    first = model_fingerprint(ModelSpec(str(model)))
    assert reads == [os.path.realpath(model / "model.safetensors")]
    assert model_fingerprint(ModelSpec(str(model))) == first
    assert file_fingerprint(model / "model.safetensors") == digest_of((model / "model.safetensors").read_bytes())
    assert len(reads) == 1  # both answered from the cache
    assert list(json.loads(own_cache.read_text())["files"]) == [os.path.realpath(model / "model.safetensors")]


def test_a_copy_is_read_once_and_has_the_fingerprint_of_its_original(model, tmp_path, later, reads):
    copy = shutil.copytree(model, tmp_path / "copy")
    assert model_fingerprint(ModelSpec(str(copy))) == model_fingerprint(ModelSpec(str(model)))
    assert len(reads) == 2  # another inode: not taken from the original's entry
    model_fingerprint(ModelSpec(str(copy)))
    assert len(reads) == 2


def test_an_ordinary_rewrite_changes_mtime_and_is_hashed_again(tmp_path, later, reads):
    path = tmp_path / "w.safetensors"
    path.write_bytes(bytes(range(256)) * 4096)
    first = file_fingerprint(path)
    mtime = path.stat().st_mtime_ns
    while time.time_ns() <= mtime + 20_000_000:  # past the filesystem's timestamp tick
        time.sleep(0.01)
    changed = bytearray(path.read_bytes())
    changed[len(changed) // 3] ^= 1
    with open(path, "r+b") as fh:  # in place: same inode, same size
        fh.write(changed)
    assert path.stat().st_mtime_ns != mtime and path.stat().st_size == len(changed)
    assert file_fingerprint(path) != first and len(reads) == 2


def test_a_restored_mtime_still_misses_the_cache(tmp_path, later, reads):
    """``touch -d``, ``cp -p`` or ``rsync -t`` put the old mtime back; the ctime still moves."""
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 100_000)
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    first = file_fingerprint(path)
    ctime = path.stat().st_ctime_ns
    while time.time_ns() <= ctime + 20_000_000:
        time.sleep(0.01)
    path.write_bytes(b"b" * 100_000)
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    assert file_fingerprint(path) != first and len(reads) == 2


def test_a_file_written_just_now_is_hashed_but_not_cached(tmp_path, own_cache, reads):
    path = tmp_path / "w.pt"
    path.write_bytes(b"x" * 1000)
    file_fingerprint(path)
    file_fingerprint(path)
    assert len(reads) == 2 and not own_cache.exists()


@pytest.mark.parametrize("damage", ["", "{not json", "[1, 2]", '{"format": 1, "files": {"/x": 3}}',
                                    '{"format": 1, "files": {"/x": [1, 2, 3, 4, 5, "d", "t"]}}',
                                    '{"format": 1, "files": ["a"]}', '{"format": 99, "files": {}}'])
def test_a_damaged_cache_is_ignored_and_rewritten(model, own_cache, later, reads, damage):
    own_cache.parent.mkdir(parents=True)
    own_cache.write_text(damage)
    first = model_fingerprint(ModelSpec(str(model)))
    assert json.loads(own_cache.read_text())["format"] == 1
    assert model_fingerprint(ModelSpec(str(model))) == first and len(reads) == 1


def test_an_entry_whose_key_differs_is_not_used(model, own_cache, later, reads):
    """A cached digest is used only for the same (device, inode, size, mtime, ctime)."""
    weights = os.path.realpath(model / "model.safetensors")
    first = model_fingerprint(ModelSpec(str(model)))
    data = json.loads(own_cache.read_text())
    data["files"][weights][3] -= 1  # another mtime
    data["files"][weights][5] = "0" * 64
    own_cache.write_text(json.dumps(data))
    assert model_fingerprint(ModelSpec(str(model))) == first and len(reads) == 2


def test_an_unwritable_cache_only_costs_a_hash(model, tmp_path, monkeypatch, later, reads):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LENSBENCH_CACHE", str(blocker / "cache"))  # under a file: cannot be created
    first = model_fingerprint(ModelSpec(str(model)))
    assert model_fingerprint(ModelSpec(str(model))) == first and len(reads) == 2
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_concurrent_writers_leave_a_readable_cache(tmp_path, own_cache, later):
    """Many processes (DDP ranks) hashing different files at once: each write replaces the file
    whole, so the cache stays readable, whatever entries were lost."""
    import multiprocessing

    paths = []
    for i in range(8):
        path = tmp_path / f"w{i}.safetensors"
        path.write_bytes(bytes([i]) * 300_000)
        paths.append(os.path.realpath(path))
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        digests = pool.map(_fingerprint_in_child, paths * 3)
    assert digests == [digest_of(Path(p).read_bytes()) for p in paths * 3]
    files = json.loads(own_cache.read_text())["files"]
    assert files and set(files) <= set(paths)
    assert all(entry[5] == digest_of(Path(p).read_bytes()) for p, entry in files.items())
    assert not [p for p in own_cache.parent.iterdir() if p.name != fp.CACHE_FILE]


def _fingerprint_in_child(path: str) -> str:
    return file_fingerprint(Path(path))


def test_the_cache_keeps_the_most_recent_entries_of_files_that_exist(tmp_path, own_cache, later, monkeypatch):
    monkeypatch.setattr(fp, "CACHE_ENTRIES", 3)
    paths = []
    for i in range(5):
        path = tmp_path / f"w{i}.bin"
        path.write_bytes(bytes([i]) * 1000)
        paths.append(path)
        file_fingerprint(path)
    assert sorted(json.loads(own_cache.read_text())["files"]) == [os.path.realpath(p) for p in paths[2:]]
    paths[4].unlink()
    other = tmp_path / "other.bin"
    other.write_bytes(b"o" * 1000)
    file_fingerprint(other)
    assert sorted(json.loads(own_cache.read_text())["files"]) == sorted(os.path.realpath(p) for p in (paths[2], paths[3], other))


@pytest.mark.parametrize("threads", [1, 4])
def test_every_block_of_a_file_counts_in_its_digest(tmp_path, monkeypatch, threads):
    """Files of several blocks (the last one partial) hash to the plain definition, however many
    threads read them, and one changed byte in any block changes the digest."""
    monkeypatch.setattr(fp, "BLOCK", 1000)
    monkeypatch.setattr(fp, "THREADS", threads)
    data = bytes(range(256)) * 20  # 5 full blocks and one of 120 bytes
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    assert fp.hash_file(path) == digest_of(data) != hashlib.sha256(data).hexdigest()
    for offset in (0, 999, 1000, 2500, len(data) - 1):
        changed = bytearray(data)
        changed[offset] ^= 1
        path.write_bytes(changed)
        assert fp.hash_file(path) == digest_of(bytes(changed)) != digest_of(data), offset
    path.write_bytes(b"")
    assert fp.hash_file(path) == hashlib.sha256(b"").hexdigest()


def test_the_values_of_earlier_versions_are_told_apart():
    assert older_format("0123456789abcdef") and not older_format("v2:0123456789abc")
    assert not older_format("hub:org/model@main") and not older_format(None)
