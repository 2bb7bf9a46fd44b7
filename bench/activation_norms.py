"""Benchmark: lensbench's activation_norms analysis against a bare transformers loop, side by side.

    python bench/activation_norms.py                 # SmolLM2-135M, shipped texts x4 (192 lines), 7 reps
    python bench/activation_norms.py --tiny          # tiny random Llama: a quick check (writes no docs)
    python bench/activation_norms.py --model PATH --texts a.txt b.txt --repeat 2 --reps 5 --device cpu

Both sides run the same model on the same texts with the same batches (batch_size, max_length,
right padding), each in a fresh Python process, one after the other, the order alternating from one
repetition to the next:

* lensbench: ``lensbench.cli.main(["predict", "--config", X])`` in a fresh process, i.e. the console
  script's own code path (LightningCLI, Trainer.predict, result shard, merge, CSV, plot). The only
  addition is a timestamp around ``ActivationNorms.predict_step`` to measure the per-item steady state.
* bare: what a researcher writes by hand (the seed toolkit's ``collect_activation_norms.py``):
  tokenize each batch with padding, run the model's backbone with ``output_hidden_states=True`` under
  ``inference_mode``, and per layer sum the L2 norms of the non-padding tokens and count them.
  Like lensbench it skips the LM head (``model.base_model``); ``--bare-head full`` runs the whole
  causal LM instead, as a naive script would.

Before any figure is reported the mean norm of every (dataset, layer) must agree within 1e-4
(relative) and the token counts exactly. Figures (medians over the repetitions):

* end-to-end: from just before the process is started to the moment its results exist (lensbench:
  ``main`` returned, CSV and PNG written; bare: the means computed). Includes interpreter start,
  imports, Lightning start-up, model load.
* per item (steady state): (end of last batch - end of first batch) / (batches - 1): the model load
  and the first, warm-up forward pass are excluded; Lightning's per-item loop overhead and the fsync'ed
  shard line are included. Also the median interval between consecutive batch ends, which a spike
  caused by another job on a shared machine does not move (both sides see the same batch shapes),
  and its best over the repetitions.
* CPU time (user+sys of the process) and peak RSS, both from ``os.wait4`` on that very process, so one
  side's peak never hides the other's.

On a shared machine each side first waits (up to --quiet-wait s) until the machine is quiet; the CPU
time other processes took while it ran is measured (/proc/stat), and a side they disturbed is run
again (up to --retries times).

Unless ``--no-docs`` (or ``--tiny``), the section "## activation_norms" of docs/benchmarks.md is
rewritten with the figures; a hand-written block between the ``activation_norms:notes`` markers in that
section is kept. Exit status: 1 when the two sides disagree, 2 when a side fails or an argument is bad.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (BENCHMARKS as DOCS, ROOT, OthersCpu, clean_env, fmt_s, is_disturbed,  # noqa: E402
                     machine, median, now, process_cpu_seconds, read_section, replace_sections, rotated,
                     wait_quiet)

SECTION = "## activation_norms"
NOTES_START = "<!-- activation_norms:notes:start -->"
NOTES_END = "<!-- activation_norms:notes:end -->"
RTOL = 1e-4
GOAL = 1.05
SIDES = ("lensbench", "bare")
# A side is "disturbed" (and run again, up to --retries times) when other processes took more CPU
# meanwhile than this fraction of its wall time plus this slack (seconds).
DISTURBED_FRACTION = 0.05
DISTURBED_SLACK = 0.5
QUIET = 0.15  # before each side: wait until other processes use less than this share of a core


# ------------------------------------------------------------------------------------------------
# The two workers (each runs in a fresh process)
# ------------------------------------------------------------------------------------------------
def worker_lensbench(cfg: dict[str, Any]) -> dict[str, Any]:
    marks: dict[str, float] = {"entered": now()}
    import torch

    import lensbench.cli
    from lensbench.analyses.activation_norms import ActivationNorms

    marks["imported"] = now()
    starts: list[float] = []
    ends: list[float] = []
    threads: list[int] = []
    original = ActivationNorms.predict_step

    def predict_step(self, item, batch_idx):  # the same signature as the original
        starts.append(now())
        out = original(self, item, batch_idx)
        ends.append(now())
        if not threads:
            threads.append(torch.get_num_threads())
        return out

    ActivationNorms.predict_step = predict_step
    rc = lensbench.cli.main(["predict", "--config", cfg["config"]])
    marks["done"] = now()
    if rc != 0:
        raise SystemExit(f"lensbench.cli.main returned {rc}")
    means: dict[str, dict[str, Any]] = {}
    with open(Path(cfg["run_dir"]) / "activation_norms.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            entry = means.setdefault(row["dataset"], {"n_tokens": int(row["n_tokens"]), "mean": {}})
            entry["mean"][int(row["layer"])] = float(row["mean_norm"])
    means = {d: {"n_tokens": e["n_tokens"], "mean": [e["mean"][k] for k in sorted(e["mean"])]} for d, e in means.items()}
    cuda_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and cfg["device"].startswith("cuda") else None
    return {"marks": marks, "item_starts": starts, "item_ends": ends, "means": means,
            "threads": threads[0] if threads else torch.get_num_threads(), "cuda_peak": cuda_peak}


def worker_bare(cfg: dict[str, Any]) -> dict[str, Any]:
    """The hand-written loop: what the seed script's collect_activation_norms.py does."""
    marks: dict[str, float] = {"entered": now()}
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    marks["imported"] = now()
    device = torch.device(cfg["device"])
    tokenizer = AutoTokenizer.from_pretrained(cfg["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype="auto").to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    net = model.base_model if cfg["bare_head"] == "backbone" else model
    marks["loaded"] = now()
    starts: list[float] = []
    ends: list[float] = []
    means: dict[str, dict[str, Any]] = {}
    bs = cfg["batch_size"]
    for name, path in cfg["datasets"]:
        texts = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        sums: list[float] = []
        count = 0
        for start in range(0, len(texts), bs):
            starts.append(now())
            batch = tokenizer(texts[start:start + bs], return_tensors="pt", padding=True, truncation=True,
                              max_length=cfg["max_length"]).to(device)
            with torch.inference_mode():
                out = net(**batch, output_hidden_states=True)
                mask = batch["attention_mask"].bool()  # [B, T]
                if not sums:
                    sums = [0.0] * len(out.hidden_states)
                for layer, hidden in enumerate(out.hidden_states):  # [B, T, D]
                    norms = torch.linalg.vector_norm(hidden[mask].float(), dim=-1)  # [N]
                    sums[layer] += norms.double().sum().item()
                count += int(mask.sum().item())
            ends.append(now())
        means[name] = {"n_tokens": count, "mean": [s / count for s in sums]}
    marks["done"] = now()
    cuda_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"marks": marks, "item_starts": starts, "item_ends": ends, "means": means,
            "threads": torch.get_num_threads(), "cuda_peak": cuda_peak}


def run_worker(side: str, cfg_path: str, result_path: str) -> int:
    cfg = json.loads(Path(cfg_path).read_text())
    result = (worker_lensbench if side == "lensbench" else worker_bare)(cfg)
    Path(result_path).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------
def launch(side: str, cfg_path: Path, workdir: Path, tag: str, abort_if_disturbed: bool = False) -> dict[str, Any]:
    """Run one side in a fresh process; its own rusage comes from wait4 on its pid.

    With ``abort_if_disturbed``, the process is killed as soon as other processes have clearly
    disturbed it (the attempt would be discarded anyway); ``{"aborted": True, ...}`` is returned.
    """
    result_path = workdir / f"result-{tag}.json"
    log_path = workdir / f"log-{tag}.txt"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, str(cfg_path), str(result_path)]
    with open(log_path, "wb") as log:
        watch = OthersCpu(own=lambda: 0.0, clock=now)  # the side's own CPU is its process's, told below
        t0 = watch.wall0
        proc = subprocess.Popen(cmd, cwd=workdir, env=clean_env(), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG if abort_if_disturbed and not math.isnan(watch.busy0) else 0)
            if pid:
                break
            time.sleep(0.25)
            wall = watch.wall()
            others = watch.seconds(own=process_cpu_seconds(proc.pid))
            # 1 s of margin: kill only when clearly disturbed
            if is_disturbed(others - 1.0, wall, DISTURBED_FRACTION, DISTURBED_SLACK):
                proc.kill()
                os.wait4(proc.pid, 0)
                proc.returncode = -9
                return {"side": side, "aborted": True, "others_cpu": others, "end_to_end": wall}
        t_exit = now()
        others = watch.seconds(own=usage.ru_utime + usage.ru_stime)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not result_path.exists():
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{side} worker failed (exit {proc.returncode}); end of its log {log_path}:\n{tail}")
    res = json.loads(result_path.read_text())
    m, ends = res["marks"], res["item_ends"]
    n = len(ends)
    res.update({
        "side": side,
        "end_to_end": m["done"] - t0,
        "process_exit": t_exit - t0,
        "per_item": (ends[-1] - ends[0]) / (n - 1) if n > 1 else float("nan"),
        # median interval between consecutive batch ends: robust to spikes from other jobs
        "per_item_median": median([b - a for a, b in zip(ends, ends[1:])]) if n > 1 else float("nan"),
        "n_items": n,
        "cpu": usage.ru_utime + usage.ru_stime,
        # CPU seconds other processes (and the hypervisor's steal) took while this side ran
        "others_cpu": others,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
        "to_first_item": res["item_starts"][0] - t0,
        "first_item": ends[0] - res["item_starts"][0],
        "after_last_item": m["done"] - ends[-1],
        "t_imported": m["imported"] - t0,
    })
    return res


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Differences between the mean norms / token counts of two results ([] when they agree)."""
    problems = []
    if sorted(a) != sorted(b):
        return [f"datasets differ: {sorted(a)} vs {sorted(b)}"]
    for name in sorted(a):
        x, y = a[name], b[name]
        if x["n_tokens"] != y["n_tokens"]:
            problems.append(f"{name}: token counts {x['n_tokens']} vs {y['n_tokens']}")
        if len(x["mean"]) != len(y["mean"]):
            problems.append(f"{name}: {len(x['mean'])} vs {len(y['mean'])} layers")
            continue
        for layer, (p, q) in enumerate(zip(x["mean"], y["mean"])):
            if abs(p - q) > RTOL * abs(q):
                problems.append(f"{name} layer {layer}: mean norm {p!r} vs {q!r} (rel {abs(p - q) / abs(q):.2e})")
    return problems


def max_rel_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max(abs(p - q) / abs(q) for name in a for p, q in zip(a[name]["mean"], b[name]["mean"]))


def read_dataset_texts(sources: list[str]) -> list[tuple[str, list[str]]]:
    from lensbench.data.sources import read_texts, resolve_dataset, TextDataset
    from lensbench.plugins import active_registries

    registry = active_registries().datasets
    out = []
    for i, src in enumerate(sources):
        name, path, field = resolve_dataset(TextDataset(src), registry, f"--texts[{i}]")
        out.append((name, read_texts(path, field)))
    return out


def save_tiny_llama(folder: Path) -> Path:
    """A 2-layer, width-32 random Llama with a word-level tokenizer (no hub needed)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ("the a of and to in is was on for with as by at it from this that be are "
             "water cell protein sun moon sea train model data layer").split()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def model_folder(source: str) -> str:
    """Where the bare side loads the model from: the same files lensbench loads."""
    from lensbench.models.embedded import embedded_smollm2_folder
    from lensbench.models.loading import ModelSpec, resolve_source
    from lensbench.models.sources import EMBEDDED

    if source == "smollm2":
        return str(embedded_smollm2_folder())  # converted once into ~/.cache/lensbench
    if source in EMBEDDED:
        return str(EMBEDDED[source].locate(source, "--model"))
    res = resolve_source(ModelSpec(source), field="--model")
    if res.kind not in ("folder", "hub"):
        raise SystemExit(f"--model {source!r}: the bare loop supports folders and hub ids, not {res.kind} files")
    return res.location


def accelerator_args(device: str) -> tuple[str, Any]:
    if device == "cpu":
        return "cpu", 1
    if device.startswith("cuda"):
        return "gpu", [int(device.split(":")[1])] if ":" in device else 1
    if device == "mps":
        return "mps", 1
    raise SystemExit(f"--device {device!r}: use cpu, cuda, cuda:N or mps")


def discards(res: dict[str, Any], side: str) -> str:
    parts = [f"{t:.1f} s" for t in res["discarded"]] + [f"stopped at {t:.1f} s" for t in res["aborted"]]
    return f"{side}: " + ", ".join(parts) if parts else ""


def build_report(runs: list[dict[str, dict]], args) -> tuple[str, dict[str, float]]:
    """The markdown body (tables) and the headline ratios (ratios of the two sides' medians)."""
    L = [r["lensbench"] for r in runs]
    B = [r["bare"] for r in runs]

    def row(label: str, key: str, fmt=fmt_s, pick=median) -> tuple[str, float]:
        lv, bv = pick([x[key] for x in L]), pick([x[key] for x in B])
        ratio = lv / bv
        return f"| {label} | {fmt(lv)} | {fmt(bv)} | **{ratio:.3f}** |", ratio

    mib = lambda x: f"{x:.0f} MiB"  # noqa: E731
    rows = [row("end-to-end wall time (process start to results written)", "end_to_end"),
            row(f"end-to-end wall time, best of {len(runs)}", "end_to_end", pick=min),
            row("per batch, steady state (batches 2..n)", "per_item"),
            row("per batch, median interval between batch ends (robust to interference)", "per_item_median"),
            row(f"per batch, median interval, best of {len(runs)}", "per_item_median", pick=min),
            row("CPU time of the process (user+sys)", "cpu"),
            row("peak RSS of the process", "peak_rss_mib", mib)]
    ratios = {"end_to_end": rows[0][1], "end_to_end_best": rows[1][1], "per_item": rows[2][1],
              "per_item_median": rows[3][1], "per_item_best": rows[4][1], "cpu": rows[5][1], "peak_rss": rows[6][1]}
    n_items = L[0]["n_items"]
    lines = [
        f"| figure (median of {len(runs)} repetitions unless said) | lensbench | bare transformers "
        f"| ratio lensbench/bare |",
        "| --- | ---: | ---: | ---: |",
        *[r[0] for r in rows],
    ]
    if L[0].get("cuda_peak") is not None:
        lc, bc = median([x["cuda_peak"] for x in L]) / 2**20, median([x["cuda_peak"] for x in B]) / 2**20
        lines.append(f"| peak CUDA memory allocated | {lc:.0f} MiB | {bc:.0f} MiB | **{lc / bc:.3f}** |")
    fixed_l = median([x["end_to_end"] - x["n_items"] * x["per_item_median"] for x in L])
    fixed_b = median([x["end_to_end"] - x["n_items"] * x["per_item_median"] for x in B])
    extra = fixed_l - fixed_b
    ratios["extra_fixed"] = extra
    lines += [
        "",
        f"Fixed cost per run (end-to-end minus {n_items} x the median batch interval; median): lensbench "
        f"{fmt_s(fixed_l)}, bare {fmt_s(fixed_b)}: lensbench costs {fmt_s(extra)} more per run, whatever the "
        f"run's size, so its end-to-end ratio falls to {GOAL} once a bare run takes about "
        f"{max(extra, 0) / (GOAL - 1):.0f} s (this one took {fmt_s(median([x['end_to_end'] for x in B]))}).",
        "",
        f"Where the end-to-end time goes (medians; {n_items} batches per side):",
        "",
        "| phase | lensbench | bare |",
        "| --- | ---: | ---: |",
        f"| process start to imports done | {fmt_s(median([x['t_imported'] for x in L]))} "
        f"| {fmt_s(median([x['t_imported'] for x in B]))} |",
        f"| process start to first batch (lensbench: CLI, Trainer, DataModule; bare: + model load) "
        f"| {fmt_s(median([x['to_first_item'] for x in L]))} | {fmt_s(median([x['to_first_item'] for x in B]))} |",
        f"| first batch (lensbench: + model load) | {fmt_s(median([x['first_item'] for x in L]))} "
        f"| {fmt_s(median([x['first_item'] for x in B]))} |",
        f"| batches 2..{n_items} | {fmt_s(median([x['item_ends'][-1] - x['item_ends'][0] for x in L]))} "
        f"| {fmt_s(median([x['item_ends'][-1] - x['item_ends'][0] for x in B]))} |",
        f"| after the last batch (lensbench: teardown, merge, CSV, plot) "
        f"| {fmt_s(median([x['after_last_item'] for x in L]))} | {fmt_s(median([x['after_last_item'] for x in B]))} |",
        "",
        "Each repetition (order alternates; times in seconds, RSS in MiB):",
        "",
        "| rep | first | lensbench end-to-end | bare end-to-end | lensbench per batch | bare per batch "
        "| lensbench CPU | bare CPU | lensbench RSS | bare RSS | others' CPU during lensbench / bare "
        "| discarded disturbed attempts |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for i, r in enumerate(runs):
        lr, br = r["lensbench"], r["bare"]
        lines.append(f"| {i + 1} | {r['order'][0]} | {lr['end_to_end']:.2f} | {br['end_to_end']:.2f} "
                     f"| {lr['per_item']:.3f} | {br['per_item']:.3f} | {lr['cpu']:.1f} | {br['cpu']:.1f} "
                     f"| {lr['peak_rss_mib']:.0f} | {br['peak_rss_mib']:.0f} "
                     f"| {lr['others_cpu']:.1f}{' (!)' if lr['disturbed'] else ''} / "
                     f"{br['others_cpu']:.1f}{' (!)' if br['disturbed'] else ''} "
                     f"| {discards(lr, 'lensbench')}{'; ' if discards(lr, '') and discards(br, '') else ''}"
                     f"{discards(br, 'bare')} |")
    lines += ["", "\"Others' CPU\" is the CPU time the rest of the machine used while that side ran "
              "(from /proc/stat): near 0 means the side ran undisturbed. A side during which others took more "
              f"than {DISTURBED_FRACTION:.0%} of its wall time (+{DISTURBED_SLACK} s) was run again (up to "
              f"{args.retries} times; an attempt clearly disturbed is stopped early); the discarded attempts "
              "are listed, and (!) marks a side whose every attempt was disturbed (the least disturbed one "
              "is kept)."]
    return "\n".join(lines), ratios


def run_side(side: str, tag: str, args, workdir: Path, source: str, folder: str,
             datasets: list[tuple[str, str]], accelerator: str, devices: Any, abort: bool) -> dict[str, Any]:
    import yaml

    config = {
        "model": {"class_path": "activation_norms", "init_args": {
            "models": [source], "statistics": ["norm"], "max_length": args.max_length,
            "experiment": tag, "output_dir": str(workdir / "outputs")}},
        "data": {"class_path": "lensbench.data.modules.TextDataModule", "init_args": {
            "datasets": [p for _, p in datasets], "batch_size": args.batch_size}},
        "trainer": {"accelerator": accelerator, "devices": devices},
    }
    (workdir / f"config-{tag}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cfg = {"config": str(workdir / f"config-{tag}.yaml"), "run_dir": str(workdir / "outputs" / tag),
           "model_dir": folder, "datasets": datasets, "batch_size": args.batch_size,
           "max_length": args.max_length, "device": args.device, "bare_head": args.bare_head}
    cfg_path = workdir / f"cfg-{tag}.json"
    cfg_path.write_text(json.dumps(cfg))
    waited = wait_quiet(QUIET, args.quiet_wait, sample=1.0)
    res = launch(side, cfg_path, workdir, tag, abort_if_disturbed=abort)
    res["waited"] = waited
    return res


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return run_worker(*argv[1:4])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="lensbench model source (default smollm2; --tiny: a tiny random Llama)")
    parser.add_argument("--texts", nargs="+", default=["forget", "retain"],
                        help="registered dataset names or .txt/.jsonl files (default: the shipped forget retain)")
    parser.add_argument("--repeat", type=int, default=4, help="repeat each dataset's lines this many times (default 4)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    parser.add_argument("--reps", type=int, default=7, help="repetitions, order alternating (default 7)")
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama: a quick check; writes no docs")
    parser.add_argument("--bare-head", choices=("backbone", "full"), default="backbone",
                        help="bare side runs model.base_model (like lensbench) or the whole causal LM")
    parser.add_argument("--docs", type=Path, default=None, help=f"markdown file to update (default {DOCS.relative_to(ROOT)})")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, outputs)")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="before each side, wait up to this many seconds until other processes use "
                             "< 15%% of a core (default 30; 0: don't wait)")
    parser.add_argument("--retries", type=int, default=3,
                        help="run a side again when other processes disturbed it, at most this many "
                             "times per repetition (default 3)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.reps < 1 or args.batch_size < 1:
        parser.error("--repeat, --reps and --batch-size must be at least 1")
    write = not args.no_docs and (not args.tiny or args.docs is not None)
    docs_path = args.docs or DOCS

    from lensbench.errors import LensbenchError

    workdir = Path(tempfile.mkdtemp(prefix="lensbench-bench-an-"))
    keep = args.keep
    try:
        return bench(args, argv, workdir, write, docs_path)
    except (LensbenchError, RuntimeError) as exc:
        keep = isinstance(exc, RuntimeError)  # a worker failed: its log is in the work folder
        print(f"bench/activation_norms.py: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if keep or args.keep:
            print(f"work folder kept: {workdir}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


def bench(args, argv: list[str], workdir: Path, write: bool, docs_path: Path) -> int:
    """One benchmark run in ``workdir``: both sides, the check, the report."""
    if write:
        read_section(docs_path, SECTION)  # a docs file without the section stops the run before it starts
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, transformers "
          f"{info['transformers']}, lightning {info['lightning']}, load average {info['load']}")
    # The texts: each dataset's lines repeated, written as <name>.txt (the dataset keeps its name).
    datasets = []
    for name, texts in read_dataset_texts(args.texts):
        path = workdir / "texts" / f"{name}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join(texts * args.repeat) + "\n", encoding="utf-8")
        datasets.append((name, str(path)))
    n_lines = sum(len(Path(p).read_text().splitlines()) for _, p in datasets)
    if args.tiny and args.model is None:
        source = str(save_tiny_llama(workdir / "tiny-llama"))
    else:
        source = args.model or "smollm2"
    folder = model_folder(source)
    accelerator, devices = accelerator_args(args.device)
    print(f"model {source} ({folder}); {len(datasets)} datasets, {n_lines} lines, batch_size {args.batch_size}, "
          f"max_length {args.max_length}, device {args.device}, {args.reps} repetitions")

    runs: list[dict[str, dict]] = []
    for rep in range(args.reps):
        order = tuple(rotated(SIDES, rep))
        run = {"order": order}
        for side in order:
            attempts, aborted = [], []
            for attempt in range(args.retries + 1):
                last = attempt == args.retries
                res = run_side(side, f"{rep}-{side}-{attempt}", args, workdir, source, folder, datasets,
                               accelerator, devices, abort=not last)
                if res.get("aborted"):
                    aborted.append(res["end_to_end"])
                    print(f"  rep {rep + 1} {side:9s}: stopped after {res['end_to_end']:.1f} s: other processes "
                          f"took {res['others_cpu']:.1f} s of CPU meanwhile -> DISTURBED, again", flush=True)
                    continue
                res["disturbed"] = is_disturbed(res["others_cpu"], res["end_to_end"], DISTURBED_FRACTION, DISTURBED_SLACK)
                attempts.append(res)
                print(f"  rep {rep + 1} {side:9s}: end-to-end {res['end_to_end']:7.2f} s, per batch "
                      f"{res['per_item']:.3f} s (median {res['per_item_median']:.3f} s) x {res['n_items']}, CPU "
                      f"{res['cpu']:6.1f} s, peak RSS {res['peak_rss_mib']:5.0f} MiB, {res['threads']} threads; "
                      f"others' CPU meanwhile {res['others_cpu']:.1f} s"
                      f"{' (disturbed)' if res['disturbed'] else ''}",
                      flush=True)
                if not res["disturbed"]:
                    break
                if not last:
                    print(f"  rep {rep + 1} {side:9s}: DISTURBED, again", flush=True)
            # the undisturbed attempt, else the least disturbed one
            kept = min(attempts, key=lambda r: (r["disturbed"], r["others_cpu"] / r["end_to_end"]))
            kept["discarded"] = [r["end_to_end"] for r in attempts if r is not kept]
            kept["aborted"] = aborted
            run[side] = kept
        problems = compare(run["lensbench"]["means"], run["bare"]["means"])
        if problems:
            print("MISMATCH between lensbench and the bare loop (no figures reported):", file=sys.stderr)
            for p in problems[:20]:
                print("  " + p, file=sys.stderr)
            args.keep = True
            return 1
        runs.append(run)
    worst = max(max_rel_diff(r["lensbench"]["means"], r["bare"]["means"]) for r in runs)
    layers = len(next(iter(runs[0]["bare"]["means"].values()))["mean"])
    print(f"check: mean norms of {len(datasets)} datasets x {layers} layers agree; largest relative "
          f"difference {worst:.1e} (limit {RTOL:.0e}); token counts equal")

    body, ratios = build_report(runs, args)
    cmd = "python bench/activation_norms.py" + "".join(f" {shlex.quote(a)}" for a in argv)
    head = (
        f"lensbench's `activation_norms` (run through `lensbench.cli.main`, i.e. the `lensbench predict` "
        f"code path) against a bare transformers loop computing the same mean L2 norm per layer, side by "
        f"side in one run, each side in a fresh process, order alternating. Both sides skip the LM head"
        f"{'' if args.bare_head == 'backbone' else ' (lensbench only: the bare side runs the full causal LM)'}. "
        f"The mean norms of all {len(datasets)} datasets x {layers} layers agreed (largest relative "
        f"difference {worst:.1e}, limit {RTOL:.0e}) before any figure was kept.\n\n"
        f"- machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, transformers "
        f"{info['transformers']}, lightning {info['lightning']}, Python {info['python']}"
        f"{', ' + info['cuda'] if info['cuda'] and args.device != 'cpu' else ''}; load average at start "
        f"{' '.join(info['load'] or ['?'])} (the machine is shared: other jobs may run beside the benchmark)\n"
        f"- lensbench: commit {info['commit'] or 'unknown'}\n"
        f"- workload: model `{args.model or ('tiny random Llama' if args.tiny else 'smollm2')}`, texts "
        f"{' + '.join(n for n, _ in datasets)} x{args.repeat} = {n_lines} lines, batch_size {args.batch_size}, "
        f"max_length {args.max_length}, device {args.device}, {runs[0]['bare']['threads']} torch threads\n"
        f"- command: `{cmd}`\n"
        f"- date: {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}\n"
    )
    verdict = []
    for key, label in (("end_to_end", "end-to-end"), ("end_to_end_best", "end-to-end best-of"),
                       ("per_item", "per batch (mean)"), ("per_item_median", "per batch (median)"),
                       ("per_item_best", "per batch best-of")):
        verdict.append(f"{label} {ratios[key]:.3f} ({'within' if ratios[key] <= GOAL else 'ABOVE'} the goal {GOAL})")
    summary = f"Time ratio lensbench/bare: {'; '.join(verdict)}. Peak RSS ratio: {ratios['peak_rss']:.3f}."
    report = f"{head}\n{body}\n\n{summary}\n"
    print()
    print(report)
    if write:
        write_docs(docs_path, report)
        print(f"wrote the section '{SECTION}' of {docs_path}")


def write_docs(path: Path, report: str) -> None:
    """Rewrite the section '## activation_norms' of ``path`` with ``report``, keeping the hand-written
    notes block (between NOTES_START and NOTES_END) that follows the figures."""
    old = read_section(path, SECTION)
    i, j = old.find(NOTES_START), old.find(NOTES_END)
    notes = old[i:j + len(NOTES_END)] if 0 <= i < j else f"{NOTES_START}\n{NOTES_END}"
    replace_sections(path, {SECTION: [report.rstrip(), "", notes]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
