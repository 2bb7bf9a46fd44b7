"""Findings: every result of docs/memory.md and docs/memory_ablation.md, over several training seeds.

    python3 bench/memory_findings.py               # seeds 0 1 2; rewrites the marked blocks of both docs
    python3 bench/memory_findings.py --no-docs     # print the tables only
    python3 bench/memory_findings.py --quick       # one seed, 60 training steps: a smoke run, writes no docs

For each training seed S (``init_seed``, ``shuffle_seed`` and ``seed_everything`` all S; the data
stays the shipped ``seed: 0``, so memory_ablation's data check passes), with the shipped configs:

1. ``lensbench fit --config configs/memory/train_synthetic_qa.yaml`` into ``findings/memory_seed<S>``
   and the dense baseline (``--model.config.memory_layers "[]"``) into ``findings/dense_seed<S>``;
2. ``lensbench predict`` of ``configs/memory/quickstart.yaml``, ``ablate_keys.yaml`` and
   ``swap_keys.yaml`` on the seed's memory model, into ``findings/<config>_seed<S>``, and
   ``ablation_swap.yaml`` and ``ablate_each_key.yaml`` on the first seed's.

Then, for the first seed only (unless ``--no-variants``): the other trainings of docs/memory.md
(2,000 pairs for 4,000 steps, memory and dense; ``memory_query_norm: true``; ``lr: 1.0e-2``) and
``configs/memory/smollm2_capitals.yaml`` on the embedded SmolLM2.

Seed 0 is the shipped config itself (its settings are the defaults), so its rows are what the
quickstart gives. Every command resumes: a rerun recomputes nothing already stored (its time is
then not measured again: times are kept in ``<output_dir>/findings/times.json``). The tables
carry the intervals the runs write (Wilson 95% for exact match, the paired bootstrap 95% for a
drop, see docs/memory_ablation.md#intervals) and, over seeds, the mean with its t interval.
The machine (CPU, cores, torch threads) and the commit are written beside the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, commit, cpu_name, read_section, replace_sections, table  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))

from lensbench.intervals import mean_interval  # noqa: E402

DOCS = {"memory": ROOT / "docs" / "memory.md", "memory_ablation": ROOT / "docs" / "memory_ablation.md"}
TRAIN = "configs/memory/train_synthetic_qa.yaml"
PREDICT = ("quickstart", "ablate_keys", "swap_keys", "ablation_swap", "ablate_each_key")
#: Run on the first seed's model only (16 and 37 states: minutes each on a CPU).
FIRST_SEED_ONLY = ("ablation_swap", "ablate_each_key")
QUICK_STEPS = 60
#: Training variants of docs/memory.md, run for the first seed only: name -> extra fit arguments.
VARIANTS = {
    "large": ("--data.options", "{num_pairs: 2000, buckets: [1, 2, 4, 8, 16, 32]}", "--trainer.max_steps", "4000"),
    "query_norm": ("--model.config.memory_query_norm", "true"),
    "lr1e-2": ("--model.lr", "1.0e-2"),
}
CAPITALS = "smollm2_capitals"  # an ordinary model (the embedded SmolLM2), no training seed
#: The findings blocks every run that writes docs rewrites: (doc, name).
ALWAYS = (("memory", "memorization"), ("memory", "usage"), ("memory_ablation", "quickstart"),
          ("memory_ablation", "top_vs_random"), ("memory_ablation", "swaps"), ("memory_ablation", "times"))


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--output-dir", default="outputs", help="lensbench's output_dir (default: outputs)")
    p.add_argument("--quick", action="store_true", help="one seed, 60 steps, into findings_quick/; no docs")
    p.add_argument("--no-docs", action="store_true", help="print the tables; leave the docs as they are")
    p.add_argument("--no-variants", action="store_true",
                   help="skip docs/memory.md's other trainings and the SmolLM2 example (their blocks stay as they are)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.no_docs = args.seeds[:1], True
    return args


# -- running --------------------------------------------------------------------------------------
class Runner:
    """Runs lensbench commands, keeps the wall time of each that did work."""

    def __init__(self, args) -> None:
        self.args = args
        self.root = "findings_quick" if args.quick else "findings"
        self.out = Path(args.output_dir) / self.root
        self.out.mkdir(parents=True, exist_ok=True)
        self.times_path = self.out / "times.json"
        self.times = json.loads(self.times_path.read_text()) if self.times_path.exists() else {}

    def run(self, name: str, argv: list[str], done: Path) -> None:
        """``lensbench argv``; timed (and the time kept under ``name``) unless ``done`` already exists."""
        fresh = not done.exists()
        start = time.perf_counter()
        print("$ lensbench " + " ".join(argv), flush=True)
        result = subprocess.run(["lensbench", *argv, "--trainer.enable_progress_bar", "false"], cwd=ROOT,
                                capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"{name} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        if fresh:
            self.times[name] = round(time.perf_counter() - start, 1)
            self.times_path.write_text(json.dumps(self.times, indent=1, sort_keys=True))

    def fit(self, seed: int, dense: bool, variant: str = "", extra: tuple[str, ...] = ()) -> Path:
        """A fit of the shipped config with training seed ``seed`` (dense: layer 1 keeps its MLP);
        ``variant`` names other settings ``extra`` gives (run folder ``<kind>_<variant>_seed<S>``)."""
        name = f"{'dense' if dense else 'memory'}{'_' + variant if variant else ''}_seed{seed}"
        argv = ["fit", "--config", TRAIN, "--model.init_seed", str(seed), "--data.shuffle_seed", str(seed),
                "--seed_everything", str(seed), "--model.experiment", f"{self.root}/{name}",
                "--model.output_dir", self.args.output_dir, *extra]
        if dense:
            argv += ["--model.config.memory_layers", "[]"]
        if self.args.quick:
            argv += ["--trainer.max_steps", str(QUICK_STEPS), "--model.save_every", str(QUICK_STEPS),
                     "--trainer.val_check_interval", str(QUICK_STEPS), "--model.track_memory_every", str(QUICK_STEPS)]
        run = self.out / name
        self.run(name, argv, run / "exact_match.csv")
        return run

    def predict(self, config: str, seed: int | None, model: Path | None) -> Path | None:
        """``config`` (configs/memory/<config>.yaml) on training seed ``seed``'s ``model`` (None:
        the config's own model, run folder ``findings/<config>``)."""
        path = ROOT / "configs" / "memory" / f"{config}.yaml"
        if not path.exists():
            return None
        name = config if seed is None else f"{config}_seed{seed}"
        run = self.out / name
        argv = ["predict", "--config", str(path.relative_to(ROOT)), "--model.init_args.experiment",
                f"{self.root}/{name}", "--model.init_args.output_dir", self.args.output_dir]
        if model is not None:
            argv += ["--model.init_args.model", str(model)]
        self.run(name, argv, run / "accuracy.csv")
        return run


# -- reading --------------------------------------------------------------------------------------
def bucket_of(group: str) -> tuple[int | None, str]:
    """(bucket, "seen"|"held out") of a group label such as ``bucket=32/seen``."""
    m = re.search(r"bucket=(\d+)", str(group))
    return (int(m.group(1)) if m else None), ("held out" if "held" in str(group) or "unseen" in str(group) else "seen")


def fmt(x: float, low: float | None = None, high: float | None = None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return f"{x:.2f}"
    return f"{x:.2f} [{low:.2f}, {high:.2f}]"


def fit_curve(run: Path) -> dict[int, tuple[float, float, float, int]]:
    """bucket -> (exact match, Wilson low, high, n) of the trained pairs, from exact_match.csv."""
    from lensbench.intervals import wilson

    table = pd.read_csv(run / "exact_match.csv")
    out = {}
    for row in table.itertuples():
        bucket, kind = bucket_of(row.group)
        if bucket is None or kind != "seen":
            continue
        n = int(row.n)
        low, high = wilson(round(row.exact_match * n), n)
        out[bucket] = (float(row.exact_match), float(low), float(high), n)
    return out


def held_out_max(run: Path) -> float:
    table = pd.read_csv(run / "exact_match.csv")
    held = [r.exact_match for r in table.itertuples() if bucket_of(r.group)[1] == "held out"]
    return max(held) if held else math.nan


def accuracy(run: Path) -> pd.DataFrame:
    acc = pd.read_csv(run / "accuracy.csv", keep_default_na=False, na_values=[""], dtype={"target": str})
    acc["bucket"], acc["kind"] = zip(*acc["group"].map(bucket_of))
    return acc[acc["kind"] == "seen"]


# -- tables ---------------------------------------------------------------------------------------
def over_seeds(values: list[float], bounds: tuple[float, float] = (0.0, 1.0)) -> str:
    """Mean over seeds with its t 95% interval, cut to ``bounds`` (just the value for one seed)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    low, high = mean_interval(values)
    return f"{sum(values) / len(values):.2f} [{max(low, bounds[0]):.2f}, {min(high, bounds[1]):.2f}]"


def memorization(seeds, fits, times) -> list[str]:
    buckets = sorted({b for kind in fits.values() for run in kind.values() for b in fit_curve(run)})
    rows = []
    for kind in ("memory", "dense"):
        curves = {s: fit_curve(fits[kind][s]) for s in seeds}
        for s in seeds:
            t = times.get(f"{kind}_seed{s}")
            rows.append([f"{kind if kind == 'memory' else 'dense MLP'}, seed {s}", f"{t:.0f} s" if t else "n/a",
                         *[fmt(*curves[s][b][:3]) if b in curves[s] else "n/a" for b in buckets]])
        if len(seeds) > 1:
            rows.append([f"**{kind if kind == 'memory' else 'dense MLP'}, mean of {len(seeds)} seeds**", "",
                         *[over_seeds([curves[s][b][0] for s in seeds if b in curves[s]]) for b in buckets]])
    if len(seeds) > 1:  # the same seed gives both models the same data order: paired by seed
        memory, dense = ({s: fit_curve(fits[k][s]) for s in seeds} for k in ("memory", "dense"))
        rows.append([f"**dense MLP minus memory, mean of {len(seeds)} seeds**", "",
                     *[over_seeds([dense[s][b][0] - memory[s][b][0] for s in seeds
                                   if b in dense[s] and b in memory[s]], (-1.0, 1.0)) for b in buckets]])
    held = max(held_out_max(fits[k][s]) for k in fits for s in seeds)
    lines = table(["model, training seed", "fit time", *[f"bucket {b}" for b in buckets]], rows)
    lines += ["", f"Held-out pairs: at most {held:.2f} in any bucket, model and seed. Per seed: exact match on "
              f"the trained pairs with its 95% Wilson interval (n = {fit_curve(fits['memory'][seeds[0]])[buckets[-1]][3]} "
              "pairs a bucket); over seeds: the mean with its t 95% interval (from the seeds' values; a "
              "seed gives both models the same initialisation seed and data order, so their difference is paired)."]
    return lines


def variants(seed: int, fits: dict[str, Path], times) -> list[str]:
    """docs/memory.md's other trainings (one training seed): the 2,000-pair data and two settings."""
    labels = {"memory_large": "memory, 2,000 pairs, 4,000 steps", "dense_large": "dense MLP, 2,000 pairs, 4,000 steps",
              "memory_query_norm": "memory, `memory_query_norm: true`", "memory_lr1e-2": "memory, `lr: 1.0e-2`"}
    curves = {k: fit_curve(run) for k, run in fits.items()}
    buckets = sorted({b for c in curves.values() for b in c})
    rows = []
    for k, curve in curves.items():
        t = times.get(f"{k}_seed{seed}")
        rows.append([labels.get(k, k), f"{t:.0f} s" if t else "n/a",
                     *[fmt(*curve[b][:3]) if b in curve else "n/a" for b in buckets]])
    held = max(held_out_max(run) for run in fits.values())
    return table(["model (training seed %d)" % seed, "fit time", *[f"bucket {b}" for b in buckets]], rows) + [
        "", f"Held-out pairs: at most {held:.2f} in any bucket. Exact match on the trained pairs with its 95% "
        "Wilson interval; one training seed each."]


def usage(seeds, fits) -> list[str]:
    """Share of the memory's slots chosen in the last tracking window of each memory fit."""
    rows = []
    for s in seeds:
        table_ = pd.read_csv(fits[s] / "memory_usage.csv")
        last = table_[table_.step == table_.step.max()]
        for r in last.itertuples():
            rows.append([str(s), str(r.step), str(r.layer), f"{r.used} of {r.slots} ({r.used_share:.0%})"])
    return table(["training seed", "step", "layer", "slots chosen in the last 100 steps"], rows)


def capitals(run: Path, seconds: float | None) -> list[str]:
    """The ordinary-model example: SmolLM2 on the capital facts, neurons and heads removed."""
    from lensbench.intervals import wilson

    acc = pd.read_csv(run / "accuracy.csv", keep_default_na=False, na_values=[""], dtype={"target": str})
    base = acc[acc.intervention == "baseline"]
    n, right = int(base.n.sum()), int(round((base.exact_match * base.n).sum()))
    low, high = wilson(right, n)
    prob = float((base.answer_prob * base.n).sum() / n)
    others = acc[acc.intervention != "baseline"]
    changed = others[others.exact_drop.abs() > 0]
    states = others.groupby(["intervention", "target"]).ngroups
    return [f"`{CAPITALS}.yaml`: SmolLM2 answers {right} of {n} capital-city facts (exact match "
            f"{right / n:.2f} [{low:.2f}, {high:.2f}], 95% Wilson; mean answer probability {prob:.2f}); of its "
            f"{states} intervention states, {changed.groupby(['intervention', 'target']).ngroups} change the exact "
            f"match of any group (largest drop {others.exact_drop.abs().max():.2f})"
            + (f"; {seconds:.0f} s." if seconds else ".")]


def quickstart(seeds, runs) -> list[str]:
    buckets = sorted(accuracy(runs[seeds[0]])["bucket"].dropna().astype(int).unique())
    lines = []
    for s in seeds:
        acc = accuracy(runs[s])
        single = acc[acc.intervention == "top_slot"]
        worst = single.groupby("target")["exact_drop"].mean().idxmax() if len(single) else None
        states = [("unablated", acc.intervention == "baseline"), ("all values zeroed", acc.intervention == "all_values"),
                  ("the 8 slots most read at answer positions masked", acc.intervention == "top8"),
                  (f"the one of them that costs most alone (slot {json.loads(worst)[0] if worst else '?'})",
                   (acc.intervention == "top_slot") & (acc.target == worst))]
        rows = []
        for label, mask in states:
            part = acc[mask].set_index("bucket")
            rows.append([label, *[fmt(part.exact_match[b], part.exact_match_ci_low[b], part.exact_match_ci_high[b])
                                  if b in part.index else "n/a" for b in buckets]])
        lines += [f"Training seed {s}{' (the shipped fit)' if s == 0 else ''}:", "",
                  *table(["state", *[f"bucket {b}" for b in buckets]], rows), ""]
    return lines


def top_vs_random(seeds, runs) -> list[str]:
    rows, separated = [], {}
    for s in seeds:
        acc = accuracy(runs[s])
        for b in sorted(acc["bucket"].dropna().astype(int).unique()):
            top = acc[(acc.intervention == "top16") & (acc.bucket == b)]
            rnd = acc[(acc.intervention == "random16") & (acc.bucket == b)]
            if not len(top) or not len(rnd):
                continue
            t = top.iloc[0]
            apart = bool(t.exact_drop_ci_low > rnd.exact_drop_ci_high.max())
            separated.setdefault(b, []).append(apart)
            rows.append([str(s), str(b), fmt(t.exact_drop, t.exact_drop_ci_low, t.exact_drop_ci_high),
                         f"{rnd.exact_drop.mean():.2f} ({rnd.exact_drop.min():.2f} to {rnd.exact_drop.max():.2f})",
                         f"{rnd.exact_drop_ci_high.max():.2f}", "yes" if apart else "no"])
    lines = table(["training seed", "bucket", "top 16 masked: drop [95% CI]",
                   f"random 16 read slots ({len(rnd)} draws): mean (min to max)", "random: highest upper bound",
                   "intervals apart"], rows)
    summary = ", ".join(f"bucket {b}: {sum(v)} of {len(v)}" for b, v in sorted(separated.items()))
    return lines + ["", f"Seeds whose top-16 interval lies above every random draw's: {summary}."]


def swaps(seeds, runs) -> list[str]:
    rows = []
    for s in seeds:
        run = runs[s]
        changed = pd.read_csv(run / "swap_predictions.csv", dtype=str, keep_default_na=False)
        matrix = pd.read_csv(run / "swap_matrix.csv")
        values = changed[changed.intervention == "swap_values"]
        multi = sum(sum(a != b for a, b in zip(x, y)) + abs(len(x) - len(y)) > 1
                    for x, y in zip(values.baseline_prediction, values.prediction))
        per = matrix[matrix.intervention == "swap_values"]["changed"]
        rows.append([str(s), str(len(per)), f"{per.min()} to {per.max()}", str(len(values)),
                     f"{multi} ({multi / max(len(values), 1):.0%})", str(int((values.follows != "").sum()))])
    return table(["training seed", "swaps", "generated answers changed per swap (of 400)", "changes in all",
                  "changes of more than one digit", "became another pair's answer"], rows)


def each_key(seeds, runs, shown: int = 5) -> list[str]:
    """ablate_each_key.yaml: the states (the half-keys of one slot zeroed) of largest and smallest
    exact-match drop on a trained group."""
    rows = []
    for s in seeds:
        if s not in runs:
            continue
        acc = accuracy(runs[s])
        states = acc[acc.intervention != "baseline"].sort_values("exact_drop", ascending=False, kind="stable")
        best = states.drop_duplicates("target")  # each state's largest drop over the groups
        picked = [*best.head(shown).itertuples(), *best.tail(1).itertuples()]
        for r in picked:
            rows.append([str(s), r.target, r.group, fmt(r.exact_match, r.exact_match_ci_low, r.exact_match_ci_high),
                         fmt(r.exact_drop, r.exact_drop_ci_low, r.exact_drop_ci_high), f"{r.exact_drop_p:.2g}"])
    if not rows:
        return []
    return table(["training seed", "keys zeroed", "group of its largest drop", "exact match after",
                  "drop [95% CI]", "p (McNemar)"], rows) + [
        "", f"The {shown} states of largest drop and the one of smallest (each state's largest drop over the groups)."]


def correlation(seeds, runs) -> list[str]:
    """Spearman rho of each slot's single-slot ablation drop against its swaps' share of changed
    answers (ablation_swap_correlation.csv's summary rows), per group with a finite rho."""
    rows = []
    for s in seeds:
        path = runs[s] / "ablation_swap_correlation.csv" if s in runs else None
        if path is None or not path.exists():
            continue
        t = pd.read_csv(path)
        summary = t[t["slot"].isna() & t["spearman_rho"].notna()]
        for r in summary.itertuples():
            rows.append([str(s), str(r.group), str(int(r.n)), fmt(r.spearman_rho, r.ci95_low, r.ci95_high),
                         f"{r.p_value:.2g}"])
    if not rows:
        return []
    return table(["training seed", "group", "slots", "Spearman rho [95% CI]", "p"], rows)


# -- docs -----------------------------------------------------------------------------------------
def measured_on() -> str:
    import torch

    return (f"Measured by `python3 bench/memory_findings.py` on commit {commit() or 'unknown'}, "
            f"{time.strftime('%Y-%m-%d', time.gmtime())}: {cpu_name()}, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); "
            "the machine was shared with other work, so times are upper bounds. Another thread count changes "
            "the float order of training, and so every model: compare the seeds' spread, not single digits.")


def main(argv=None) -> int:
    args = parse(argv)
    if not args.no_docs:  # the blocks every run rewrites: a docs file without one stops it before any training
        for doc, name in ALWAYS:
            read_section(DOCS[doc], f"findings:{name}")
    runner = Runner(args)
    fits = {"memory": {}, "dense": {}}
    runs = {c: {} for c in PREDICT}
    for s in args.seeds:
        fits["memory"][s] = runner.fit(s, dense=False)
        fits["dense"][s] = runner.fit(s, dense=True)
        for config in PREDICT:
            if config in FIRST_SEED_ONLY and s != args.seeds[0]:
                continue
            run = runner.predict(config, s, fits["memory"][s])
            if run is not None:
                runs[config][s] = run
    extra = {}
    if not args.quick and not args.no_variants:
        first = args.seeds[0]
        for variant, argv in VARIANTS.items():
            extra[f"memory_{variant}"] = runner.fit(first, dense=False, variant=variant, extra=argv)
            if variant == "large":
                extra[f"dense_{variant}"] = runner.fit(first, dense=True, variant=variant, extra=argv)
        capitals_run = runner.predict(CAPITALS, None, None)
    blocks = {("memory", "memorization"): memorization(args.seeds, fits, runner.times),
              ("memory", "usage"): usage(args.seeds, fits["memory"]),
              ("memory_ablation", "quickstart"): quickstart(args.seeds, runs["quickstart"]),
              ("memory_ablation", "top_vs_random"): top_vs_random(args.seeds, runs["ablate_keys"]),
              ("memory_ablation", "swaps"): swaps(args.seeds, runs["swap_keys"])}
    if extra:
        blocks[("memory", "variants")] = variants(args.seeds[0], extra, runner.times)
        blocks[("memory_ablation", "capitals")] = capitals(capitals_run, runner.times.get(CAPITALS))
    if runs["ablate_each_key"]:
        blocks[("memory_ablation", "each_key")] = each_key(args.seeds, runs["ablate_each_key"])
    if runs["ablation_swap"]:
        blocks[("memory_ablation", "correlation")] = correlation(args.seeds, runs["ablation_swap"])
    note = measured_on()
    times = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(runner.times.items()))
    for (doc, name), lines in blocks.items():
        print(f"\n## {doc}: {name}\n")
        print("\n".join(lines))
    print("\n" + note + "\nwall times: " + times)
    if not args.no_docs:
        blocks[("memory", "memorization")] += ["", note]
        blocks[("memory_ablation", "times")] = [note, "", f"Wall times (each command from start to exit): {times}."]
        for doc, name in blocks:  # every block looked up before any file is written
            read_section(DOCS[doc], f"findings:{name}")
        for doc, path in DOCS.items():
            replace_sections(path, {f"findings:{name}": lines for (d, name), lines in blocks.items() if d == doc})
    return 0


if __name__ == "__main__":
    sys.exit(main())
