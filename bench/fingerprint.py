"""Benchmark: the cost of fingerprinting a checkpoint's weights against loading it.

    python bench/fingerprint.py [--hidden 1024 --intermediate 2816 --layers 6 30 --vocab 16000] [--write-docs]

Builds Llama-shaped checkpoints of random float32 weights from a config (440 MB and 1.7 GB with the
defaults: one per --layers value) in a temporary folder, then measures, each in a fresh process and timing only the call
(imports excluded), with the file in the page cache (warm) and evicted from it before the call
(cold: ``posix_fadvise(DONTNEED)``):

- hash: ``model_fingerprint`` with an empty fingerprint cache (a first run on these weights: every
  byte read and hashed);
- cached: ``model_fingerprint`` again, its digest now cached (a resume onto unchanged weights);
  the bytes it read (``rchar`` of /proc/self/io) show it did not open the weights;
- load: ``AutoModelForCausalLM.from_pretrained`` of the same folder on the CPU, and load + one
  read of every weight (the least a run reads: its first forward pass).

Prints medians and the ratios hash / load and cached / load (goals: at most 1, and no read of the
weights). With --write-docs the figures replace the "Weight fingerprints" section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import clean_env, cpu_name, median, report, run_json  # noqa: E402

SECTION = "## Weight fingerprints"

EVICT = r"""
import os, sys
def evict(folder):
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
def rchar():
    return int([l for l in open('/proc/self/io') if l.startswith('rchar')][0].split()[1])
"""

HASH = EVICT + r"""
import json, time
from lensbench.models.fingerprint import model_fingerprint
from lensbench.models.loading import ModelSpec
folder, cold = sys.argv[1], sys.argv[2] == "cold"
spec = ModelSpec(folder)
if cold:
    evict(folder)
read, t = rchar(), time.perf_counter()
value = model_fingerprint(spec)
print(json.dumps({"s": time.perf_counter() - t, "read": rchar() - read, "value": value}))
"""

LOAD = EVICT + r"""
import json, time, torch
from transformers import AutoModelForCausalLM
folder, cold = sys.argv[1], sys.argv[2] == "cold"
if cold:
    evict(folder)
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
loaded = time.perf_counter() - t
with torch.no_grad():
    sum(float(p.sum()) for p in model.parameters())
print(json.dumps({"s": loaded, "touched": time.perf_counter() - t}))
"""


def make_checkpoint(folder: Path, hidden: int, intermediate: int, layers: int, vocab: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def side(script: str, folder: Path, mode: str, cache: Path) -> dict:
    return run_json([sys.executable, "-c", script, str(folder), mode], env=clean_env(LENSBENCH_CACHE=str(cache)))


def measure(tmp: Path, args: argparse.Namespace, layers: int) -> tuple[int, dict[str, list[dict]]]:
    from lensbench.models import fingerprint

    folder, caches = tmp / f"model{layers}", tmp / f"caches{layers}"
    size = make_checkpoint(folder, args.hidden, args.intermediate, layers, args.vocab)
    # Files written within RACY_NS of hashing are not cached: let the checkpoint age past it.
    time.sleep(fingerprint.RACY_NS / 1e9 + 0.5)
    runs: dict[str, list[dict]] = {}
    for rep in range(args.reps):
        for mode in ("warm", "cold") if rep % 2 == 0 else ("cold", "warm"):
            cache = caches / f"{rep}-{mode}"
            if mode == "warm":
                side(HASH, folder, "warm", caches / "prime")  # the file in the page cache
            order = [("hash", HASH), ("cached", HASH), ("load", LOAD)]
            for name, script in order if rep % 2 == 0 else [order[2], *order[:2]]:
                runs.setdefault(f"{name} {mode}", []).append(side(script, folder, mode, cache))
    values = {r["value"] for k, rs in runs.items() if not k.startswith("load") for r in rs}
    assert len(values) == 1, values  # the cached value is the hashed one
    assert all(r["read"] < (1 << 20) for r in runs["cached warm"] + runs["cached cold"]), runs
    assert all(r["read"] >= size for r in runs["hash warm"] + runs["hash cold"]), runs
    shutil.rmtree(folder)
    return size, runs


def rows_of(size: int, runs: dict[str, list[dict]]) -> dict[str, str]:
    med = {k: median([r["s"] for r in rs]) for k, rs in runs.items()}
    touched = {m: median([r["touched"] for r in runs[f"load {m}"]]) for m in ("warm", "cold")}
    mb = f"{size / 1e6:.0f} MB"
    rows = {}
    for m in ("warm", "cold"):
        rows[f"{mb}, {m}: first-time hash"] = f"{med[f'hash {m}']:.2f} s ({size / med[f'hash {m}'] / 1e9:.2f} GB/s)"
        rows[f"{mb}, {m}: cached resume"] = f"{med[f'cached {m}'] * 1e3:.1f} ms"
        rows[f"{mb}, {m}: from_pretrained (cpu)"] = f"{med[f'load {m}']:.2f} s"
        rows[f"{mb}, {m}: from_pretrained + one read of every weight"] = f"{touched[m]:.2f} s"
        rows[f"{mb}, {m}: hash / load"] = f"**{med[f'hash {m}'] / med[f'load {m}']:.2f}** (goal: at most 1)"
        rows[f"{mb}, {m}: cached / load"] = f"{med[f'cached {m}'] / med[f'load {m}']:.5f}"
    read = max(r["read"] for r in runs["cached warm"] + runs["cached cold"])
    rows[f"{mb}: bytes read by a cached resume"] = f"{read} (the cache file; the weights are not opened)"
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 30], help="one checkpoint per value")
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()

    rows = {}
    with tempfile.TemporaryDirectory(prefix="lensbench-fp-") as tmp:
        for layers in args.layers:
            size, runs = measure(Path(tmp), args, layers)
            rows[f"{size / 1e6:.0f} MB: checkpoint"] = (f"one safetensors file, float32: {layers} layers, hidden "
                                                         f"{args.hidden}, MLP {args.intermediate}, vocab {args.vocab}")
            rows.update(rows_of(size, runs))
    for k, v in rows.items():
        print(f"{k:60s} {v}")
    if args.write_docs:
        command = "python bench/fingerprint.py" + "".join(
            f" --{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()
            if k != "write_docs") + " --write-docs"
        intro = ("The weights' fingerprint (`lensbench.models.fingerprint`) hashes every byte of every weight "
                 "file (SHA-256 of 8 MiB blocks, read and hashed on up to 8 threads) the first time it sees a file, and "
                 "caches the digest by the file's device, inode, size, mtime and ctime, so a resume onto "
                 "unchanged weights reads none of them. `bench/fingerprint.py` times both against loading the "
                 "same checkpoint, each in a fresh process and timing only the call, medians of "
                 f"{args.reps} (order alternated); warm: the file in the page cache, cold: evicted with "
                 "`posix_fadvise(DONTNEED)` before the call.")
        footer = (f"Command: `{command}`. The first-time hash grows with the checkpoint at the rates shown; "
                  "at these sizes `from_pretrained` is mostly the fixed cost of building the model, so hash / "
                  "load rises with the size (compare the two checkpoints). The hash is paid once per file (by "
                  "each rank under DDP; the ranks share the cache) and leaves the file in the page cache for "
                  "the load that follows; a resume pays the cached row. The cache misses, and the file is "
                  "hashed again, when its size, mtime or ctime change (any write, and a restored mtime), or "
                  "when it was modified less than 2 s before it was hashed; an edit that keeps mtime and ctime "
                  "(setting the clock back) is not noticed.")
        print(report(SECTION, intro, cpu_name(), rows, footer))


if __name__ == "__main__":
    main()
