"""Catalogue cases of text and config inputs: a text file holding only a byte-order mark, a YAML key
given twice (in a predict, fit or pipeline config, in a value on the command line, in a task.json),
a config file that is empty or a list, a string given where a list or a mapping is expected. Each
is one line naming the file, key or field and what to write.

A plugin that fails to import is tested through the real console script in
tests/test_registry.py: the fork server imported lensbench before forking, so a PYTHONPATH given to
one case would not reach its entry points.

``prepare`` writes the files beside the catalogue's ``tiny``, ``texts.txt`` and ``train.yaml``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

NORMS = ("predict", "--model", "activation_norms", "--data", "lensbench.data.modules.TextDataModule",
         "--trainer.accelerator", "cpu")


def norms(models: str = "[tiny]", datasets: str = "[texts.txt]", *extra: str) -> tuple[str, ...]:
    return (*NORMS, "--model.init_args.models", models, "--data.init_args.datasets", datasets, *extra)


#: A predict config whose data section names batch_size twice (lines 8 and 10).
RUN_WITH_A_DUPLICATE = """\
model:
  class_path: activation_norms
  init_args:
    models: [tiny]
data:
  class_path: lensbench.data.modules.TextDataModule
  init_args:
    batch_size: 2
    datasets: [texts.txt]
    batch_size: 4
trainer: {accelerator: cpu}
"""

#: id -> (arguments, exit code, fragment of the one line)
CASES = {
    "text_file_only_a_bom": (norms(datasets="[bom.txt]"), 1, "bom.txt holds no text; add at least one non-empty example"),
    "config_duplicate_key": (("predict", "--config", "dup_run.yaml"), 1,
                             "config: duplicate key 'batch_size' at line 10 of dup_run.yaml (first at line 8); keep one"),
    "fit_config_duplicate_key": (("fit", "--config", "dup_train.yaml"), 1,
                                 "config: duplicate key 'trainer' at line 2 of dup_train.yaml (first at line 1); keep one"),
    "pipeline_config_duplicate_key": (("pipeline", "--config", "dup_pipeline.yaml"), 1,
                                      "config: duplicate key 'others' at line 3 of dup_pipeline.yaml (first at line 2); "
                                      "keep one"),
    "value_duplicate_key": (norms("[tiny]", "[texts.txt]", "--model.init_args.perturbation",
                                  "{levels: [0.1], levels: [0.2]}"), 1,
                            "config: duplicate key 'levels' at line 1 of the value '{levels: [0.1], levels: [0.2]}'; "
                            "keep one"),
    "config_empty": (("predict", "--config", "empty.yaml"), 1,
                     "config: empty.yaml holds nothing (it is empty or only comments); write a config with its "
                     "sections (model:, data:, trainer:)"),
    "fit_config_empty": (("fit", "--config", "empty.yaml"), 1, "config: empty.yaml holds nothing"),
    "pipeline_config_empty": (("pipeline", "--config", "empty.yaml"), 1,
                              "config: empty.yaml holds nothing (it is empty or only comments); write a config with "
                              "its sections (base:, others:, param_diff:, activation_norms:)"),
    "config_a_list": (("predict", "--config", "list.yaml"), 1,
                      "config: list.yaml holds a list, not a mapping of sections"),
    "models_given_as_a_string": (norms("tiny"), 2,
                                 "model.init_args.models: expected a list, got the string 'tiny'; write [tiny]"),
    "statistics_given_as_a_string": (norms("[tiny]", "[texts.txt]", "--model.init_args.statistics", "norm"), 2,
                                     "model.init_args.statistics: expected a list, got the string 'norm'; write [norm]"),
    "perturbation_given_as_a_string": (norms("[tiny]", "[texts.txt]", "--model.init_args.perturbation", "mult_gauss"),
                                       2, "model.init_args.perturbation: expected a mapping (PerturbationGrid "
                                          "settings), got the string 'mult_gauss'; write {key: value, ...}"),
    "sweep_task_json_duplicate_key": (("predict", "--model", "layer_sweep", "--model.init_args.models", "[tiny]",
                                       "--data", "lensbench.layer_sweep.data.LayerSweepData",
                                       "--data.init_args.tasks", "[dupkey]", "--trainer.accelerator", "cpu"), 1,
                                      "dupkey/task.json: key 'type' is given twice; keep one"),
}
#: Cases that need optional modules: id -> modules.
NEEDS = {"sweep_task_json_duplicate_key": ("mteb",)}


def prepare(root: Path, tiny_model: Path, forks) -> None:
    (root / "bom.txt").write_bytes("\ufeff".encode())
    (root / "dup_run.yaml").write_text(RUN_WITH_A_DUPLICATE)
    train = (root / "train.yaml").read_text()  # its own trainer: is a third, further down
    (root / "dup_train.yaml").write_text("trainer: {max_steps: 1}\ntrainer: {max_steps: 2}\n" + train)
    (root / "dup_pipeline.yaml").write_text("base: tiny\nothers: [tiny]\nothers: [tiny]\n")
    (root / "empty.yaml").write_text("")
    (root / "list.yaml").write_text("- model\n- data\n")
    shutil.copytree(root / "sts", root / "dupkey")
    (root / "dupkey" / "task.json").write_text('{"type": "STS",\n "description": "pairs",\n "type": "STS"}\n')
    assert json.loads((root / "dupkey" / "task.json").read_text())["type"] == "STS"  # json alone takes it
