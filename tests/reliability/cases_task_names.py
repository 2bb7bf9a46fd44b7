"""Catalogue cases of layer_sweep's task names: a task folder named like a task MTEB knows is one
line asking to rename it, before any run folder is made (its scores would be cached and read as
MTEB's task's; docs/layer_sweep.md#task-formats). A plugin's task so named is tested in
tests/test_local_task_names.py: a plugin given to one case would not reach the fork server.

``prepare`` copies the catalogue's ``sts`` task folder to ``named/STSBenchmark``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

SWEEP = ("predict", "--model", "layer_sweep", "--model.init_args.models", "[tiny]", "--model.init_args.batch_size",
         "8", "--data", "lensbench.layer_sweep.data.LayerSweepData", "--trainer.accelerator", "cpu")

#: id -> (arguments, exit code, fragment of the one line)
CASES = {
    "sweep_task_folder_named_like_mteb": ((*SWEEP, "--data.init_args.tasks", "[named/STSBenchmark]"), 1,
                                          ("data.init_args.tasks: task folder 'named/STSBenchmark' is named like an "
                                           "MTEB task and a folder's task takes its folder's name, so its scores "
                                           "would be cached and read as MTEB's; rename the folder")),
}
#: Cases that need optional modules: id -> modules.
NEEDS = {"sweep_task_folder_named_like_mteb": ("mteb",)}


def prepare(root: Path, tiny_model: Path, forks) -> None:
    (root / "named").mkdir()
    shutil.copytree(root / "sts", root / "named" / "STSBenchmark")
