"""``lensbench pipeline``: the model-diff pipeline, parameter statistics and activation norms of the
same base and other checkpoints, named once, then a summary of the two side by side.

The config names ``base`` and ``others`` (paths, aliases, hub ids, or perturbed states of a model,
as ``param_diff``'s ``others`` take them) and the settings of each step; lensbench writes one
ordinary run config per step into ``<output_dir>/<experiment>/steps/``, runs them with
``lensbench predict`` in this process (each resumes like any run), and writes
``<output_dir>/<experiment>/summary.csv``.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import LensbenchError, did_you_mean


@dataclass
class PipelineConfig:
    base: Any = "smollm2"
    """The reference model: alias, hub id, folder or file (or a ModelSpec mapping)."""
    others: list[Any] = field(default_factory=list)
    """Compared models: the forms ``base`` takes, or perturbed states {perturbation, level, param_group, seed}."""
    experiment: str = "model_diff/pipeline"
    """Run folder under ``output_dir``: steps in ``param_diff/`` and ``activation_norms/``, and ``summary.csv``."""
    output_dir: str = "outputs"
    param_diff: dict[str, Any] = field(default_factory=dict)
    """param_diff's settings (tol, max_iter, compute_dtype) and include/exclude globs."""
    activation_norms: dict[str, Any] = field(default_factory=dict)
    """activation_norms' settings (statistics, max_length) and the texts (datasets, batch_size, max_examples)."""
    trainer: dict[str, Any] = field(default_factory=lambda: {"accelerator": "auto", "devices": 1})
    """Lightning Trainer settings of both steps."""
    float32_matmul_precision: str | None = None
    """torch's float32 matmul precision of both steps (highest, high, medium); default: as ``predict``'s."""


TEXT_KEYS = ("datasets", "batch_size", "max_examples")
#: The sections of a pipeline config that are mappings, and what each holds.
SECTIONS = {"param_diff": "tol, max_iter, compute_dtype, include, exclude",
            "activation_norms": "statistics, max_length, datasets, batch_size, max_examples",
            "trainer": "Lightning Trainer settings: accelerator, devices, ..."}
PAIR_KEYS = ("include", "exclude")


def load_config(path: Path) -> PipelineConfig:
    try:
        from .yamlio import load_config as load_yaml  # refuses a key given twice, naming it and its line

        raw = load_yaml(Path(path).read_text(encoding="utf-8"), str(path),
                        sections="base:, others:, param_diff:, activation_norms:")
    except OSError as exc:
        raise LensbenchError(f"cannot read {path}: {exc.strerror}", "config") from None
    except yaml.YAMLError as exc:
        raise LensbenchError(f"malformed YAML: {str(exc).splitlines()[0]}; fix the file's syntax", "config") from None
    if not isinstance(raw, dict):
        raise LensbenchError("a pipeline config is a mapping (base, others, param_diff, activation_norms, ...)", "config")
    known = [f.name for f in fields(PipelineConfig)]
    for key in raw:
        if key not in known:
            raise LensbenchError(f"unknown key {key!r}; {did_you_mean(str(key), known)}", key)
    for key in SECTIONS:
        if key in raw and raw[key] is not None and not isinstance(raw[key], dict):
            raise LensbenchError(f"must be a mapping of settings ({SECTIONS[key]}), got {raw[key]!r}; write it as "
                                 f"{key}: {{...}} or leave it out", key)
        if key in raw and raw[key] is None:  # an empty section: its defaults
            del raw[key]
    if "others" in raw and raw["others"] is not None and not isinstance(raw["others"], list):
        raise LensbenchError(f"must be a list of models, got {raw['others']!r}; write it as others: [...]", "others")
    config = PipelineConfig(**raw)
    if not config.others:
        raise LensbenchError("is empty; name at least one model to compare with the base", "others")
    for i, entry in enumerate(config.others):
        if isinstance(entry, dict) and "seed" in entry:
            from .perturbations import check_seed

            check_seed(entry["seed"], f"others[{i}].seed")
    return config


def _model_entry(entry: Any, base: Any) -> Any:
    """An ``others`` entry as activation_norms' ``models`` takes it: a perturbed state becomes the
    perturbed model (the base, or ``of``) with the perturbation as a transform and the same label."""
    if isinstance(entry, dict) and "perturbation" in entry:
        from .data.checkpoints import PerturbedCheckpoint

        known = [f.name for f in fields(PerturbedCheckpoint)]
        bad = [k for k in entry if k not in known]
        if bad:
            raise LensbenchError(f"unknown key {bad[0]!r}; {did_you_mean(bad[0], known)}", "others")
        pc = PerturbedCheckpoint(**entry)
        of = pc.of if pc.of is not None else base
        source = of if isinstance(of, str) else of.get("source")
        label = pc.label(of if isinstance(of, str) else source)
        return {"source": source, "name": label,
                "transforms": [{"name": pc.perturbation, "seed": pc.seed,
                                "params": {"group": pc.param_group, "level": float(pc.level)}}]}
    return entry


def step_configs(config: PipelineConfig) -> dict[str, dict[str, Any]]:
    """The two ordinary run configs the pipeline runs."""
    run = f"{config.experiment}"
    pair_args = {k: config.param_diff[k] for k in PAIR_KEYS if k in config.param_diff}
    diff_args = {k: v for k, v in config.param_diff.items() if k not in PAIR_KEYS}
    text_args = {k: config.activation_norms[k] for k in TEXT_KEYS if k in config.activation_norms}
    norm_args = {k: v for k, v in config.activation_norms.items() if k not in TEXT_KEYS}
    steps = {
        "param_diff": {
            "model": {"class_path": "param_diff",
                      "init_args": {**diff_args, "experiment": f"{run}/param_diff", "output_dir": config.output_dir}},
            "data": {"class_path": "lensbench.data.checkpoints.CheckpointPairs",
                     "init_args": {"base": config.base, "others": config.others, **pair_args}},
            "trainer": dict(config.trainer),
        },
        "activation_norms": {
            "model": {"class_path": "activation_norms",
                      "init_args": {**norm_args, "models": [config.base, *[_model_entry(o, config.base)
                                                                           for o in config.others]],
                                    "experiment": f"{run}/activation_norms", "output_dir": config.output_dir}},
            "data": {"class_path": "lensbench.data.modules.TextDataModule", "init_args": text_args},
            "trainer": dict(config.trainer),
        },
    }
    if config.float32_matmul_precision is not None:
        from .run_identity import MATMUL_KEY

        for step in steps.values():
            step[MATMUL_KEY] = config.float32_matmul_precision
    return steps


def summary(run_dir: Path) -> Path:
    """``summary.csv``: per compared model, its total parameter change and its activation-norm
    change per dataset against the base."""
    import numpy as np
    import pandas as pd

    from .tables import write_csv

    per_matrix = pd.read_csv(run_dir / "param_diff" / "per_matrix.csv")
    norms = pd.read_csv(run_dir / "activation_norms" / "activation_norms.csv")
    base = next(m for m in norms["model"].unique() if m not in set(per_matrix["other"]))
    rows = []
    for other, g in per_matrix.groupby("other", sort=False):
        finite = np.isfinite(g["dW_fro"])  # a NaN or inf change is neither changed nor unchanged
        dw = math.sqrt(float((g["dW_fro"] ** 2).sum(skipna=False)))
        w = math.sqrt(float((g["W_fro"] ** 2).sum(skipna=False)))
        row = {"model": other, "n_matrices": len(g), "n_changed": int((finite & (g["dW_fro"] > 0)).sum()),
               "n_nonfinite": int((~finite).sum()), "dW_fro_total": dw, "W_fro_total": w,
               "rel_change_total": dw / w if w > 0 else math.nan}
        for dataset, d in norms.groupby("dataset", sort=True):
            b = d[d["model"] == base].set_index("layer")["mean_norm"]
            m = d[d["model"] == other].set_index("layer")["mean_norm"]
            rel = ((m - b) / b).dropna()
            row[f"rel_norm_change_{dataset}"] = float(rel.mean()) if len(rel) else math.nan
            row[f"max_rel_norm_change_{dataset}"] = float(rel.abs().max()) if len(rel) else math.nan
        rows.append(row)
    return write_csv(pd.DataFrame(rows), run_dir / "summary.csv")


def run_pipeline(argv: list[str], run_predict: Callable[[list[str]], Any]) -> int:
    """``lensbench pipeline``: its two steps each run by ``run_predict`` (``lensbench.cli``'s, handed down
    by the command so that this module does not import the command back)."""
    parser = argparse.ArgumentParser(prog="lensbench pipeline",
                                     description="Parameter statistics and activation norms of one base and "
                                                 "other models, then a summary: lensbench pipeline --config X.yaml. "
                                                 "Extra --trainer.* and --float32_matmul_precision flags go to both "
                                                 "steps.")
    parser.add_argument("--config", required=True, help="a pipeline config (configs/model_diff/pipeline.yaml)")
    parser.add_argument("--print_steps", action="store_true", help="print the two run configs and exit")
    args, extra = parser.parse_known_args(argv)
    wrong = [a for a in extra if a.startswith("--") and not a.startswith(("--trainer.", "--float32_matmul_precision"))]
    if wrong:
        raise LensbenchError(f"unknown option {wrong[0]}; a pipeline takes --config, --trainer.* overrides and "
                             "--float32_matmul_precision", "pipeline")
    config = load_config(Path(args.config))
    if args.print_steps:
        print(yaml.safe_dump(step_configs(config), sort_keys=False), end="")
        return 0
    from .run_folders import LOCK_FILE, check_is_run_folder, run_folder

    run_dir = run_folder(config.output_dir, config.experiment, "experiment")
    # a pipeline folder holds .lock (folders of older versions: their steps) besides its two runs
    check_is_run_folder(run_dir, "experiment", (LOCK_FILE, "steps/param_diff.yaml"))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).touch()
    steps_dir = run_dir / "steps"
    from .logs import console

    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    for name, step in step_configs(config).items():
        path = steps_dir / f"{name}.yaml"
        steps_dir.mkdir(parents=True, exist_ok=True)  # every rank writes the same text, atomically
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(yaml.safe_dump(step, sort_keys=False))
        os.replace(tmp, path)
        console.info(f"lensbench pipeline: {name} ({path})")
        run_predict(["predict", "--config", str(path), *extra])
    if rank == 0:
        out = summary(run_dir)
        console.info(f"lensbench pipeline: summary in {out}")
    return 0
