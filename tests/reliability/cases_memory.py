"""Catalogue cases of memory_ablation on a ``lensbench fit`` run: evaluation data other than the
model's training data (another seed, other options, another dataset, facts) is refused in one line
naming the field that differs, before any work, unless ``allow_other_data`` says it is deliberate.

The run met is ``outputs/fitted`` (``cases_fit.prepare`` trains it from the catalogue's
``train.yaml``: synthetic_qa, ``{num_pairs: 4, buckets: [1, 2]}``, seed 0); it is left byte for byte.
"""

from __future__ import annotations

from pathlib import Path

OPTIONS = "{num_pairs: 4, buckets: [1, 2]}"
HELD_OUT = "or model.init_args.allow_other_data: true for a held-out study"


def evaluate(*extra: str, options: str = OPTIONS) -> tuple[str, ...]:
    return ("predict", "--model", "memory_ablation", "--model.init_args.model", "outputs/fitted",
            "--data", "lensbench.data.answers.AnswerDataModule", "--data.init_args.options", options,
            "--trainer.accelerator", "cpu", *extra)


#: id -> (arguments, exit code, fragment of the one line)
CASES = {
    "memory_ablation_other_seed": (
        evaluate("--data.init_args.seed", "1"), 1,
        (f"data.init_args.seed: the model was trained on synthetic_qa with seed 0, this evaluation uses seed 1; set "
        f"seed 0, {HELD_OUT}")),
    "memory_ablation_other_options": (
        evaluate(options="{num_pairs: 8, buckets: [1, 2]}"), 1,
        (f"data.init_args.options.num_pairs: the model was trained on synthetic_qa with num_pairs 4, this evaluation "
        f"uses 8; set num_pairs: 4, {HELD_OUT}")),
    "memory_ablation_other_dataset": (
        evaluate("--data.init_args.dataset", "digit_lookup", options="{}"), 1,
        ("data.init_args.dataset: the model was trained on synthetic_qa (outputs/fitted/run.json), this evaluation "
        f"uses digit_lookup; set dataset: synthetic_qa with the training's options and seed, {HELD_OUT}")),
    "memory_ablation_facts_on_a_fit_model": (
        evaluate("--data.init_args.dataset", "null", "--data.init_args.facts", "texts.txt", options="null"), 1,
        ("data.init_args.facts: the model was trained on synthetic_qa (outputs/fitted/run.json), this evaluation uses "
        f"the facts texts.txt; evaluate its training data, {HELD_OUT}")),
}
#: The run each case meets: byte for byte afterwards.
KEEPS = {case: ("outputs/fitted",) for case in CASES}


def prepare(root: Path, tiny_model: Path, forks) -> None:
    if (root / "outputs" / "fitted" / "run.json").exists():  # cases_fit.prepare trained it
        return
    from conftest import clean_env

    done = forks.one(("fit", "--config", "train.yaml", "--model.experiment", "fitted"), root, clean_env())
    assert done.returncode == 0, done.stderr[-2000:]
