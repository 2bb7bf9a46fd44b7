"""Catalogue cases of ``lensbench fit`` resuming: a checkpoint trained with other settings, a
``last.ckpt`` cut short, a ``last.ckpt`` whose pickle carries code, a ``--ckpt_path`` that does not
exist, a run.json cut short, a data_dir holding rows lensbench did not write. Each is one line naming the file and the fix; the run met is left
byte for byte.

``prepare`` trains the catalogue's ``train.yaml`` (a tiny memory model) for one step into
``outputs/fitted`` and copies that run into ``outputs/damaged/<name>`` with its last.ckpt or
run.json damaged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

FIT = ("fit", "--config", "train.yaml")
LAST = "lightning/last.ckpt"


def fit(case: str, *extra: str) -> tuple[str, ...]:
    return (*FIT, "--model.experiment", case, "--trainer.max_steps", "2", *extra)


#: id -> (arguments, exit code, fragment of the one line)
CASES = {
    "fit_checkpoint_of_other_settings": (
        fit("fit_checkpoint_of_other_settings", "--model.config.hidden_size", "32", "--ckpt_path",
            f"outputs/fitted/{LAST}"), 1,
        f"ckpt_path: outputs/fitted/{LAST} was trained with other settings (model.config.hidden_size: 16 there, "
        "32 here); give the config of the run that made it"),
    "fit_ckpt_path_missing": (fit("fit_ckpt_path_missing", "--ckpt_path", "outputs/nowhere/last.ckpt"), 1,
                              "ckpt_path: outputs/nowhere/last.ckpt does not exist; give another checkpoint, or leave "
                              "out ckpt_path to train from the start"),
    "fit_last_ckpt_cut_short": (fit("damaged/cut"), 1,
                                f"model.experiment: outputs/damaged/cut/{LAST} is not a readable Lightning checkpoint"),
    "fit_last_ckpt_carrying_code": (fit("damaged/code"), 1,
                                    f"model.experiment: outputs/damaged/code/{LAST} holds more than tensors (it names "
                                    "print); lensbench reads checkpoints with torch.load(weights_only=True) and runs no "
                                    "code from them"),
    "fit_run_json_cut_short": (fit("damaged/runjson"), 1,
                               "model.experiment: outputs/damaged/runjson/run.json is damaged (cut short); it records "
                               "what a resume must match"),
    "fit_data_dir_of_other_rows": (fit("fit_data_dir_of_other_rows", "--data.data_dir", "my_rows"), 1,
                                   "data.data_dir: my_rows holds train.jsonl but no dataset.json, so its rows are "
                                   "not a generated"),
}
#: The runs each case meets: byte for byte afterwards.
KEEPS = {"fit_checkpoint_of_other_settings": ("outputs/fitted",),
         "fit_last_ckpt_cut_short": ("outputs/damaged/cut",),
         "fit_last_ckpt_carrying_code": ("outputs/damaged/code",),
         "fit_run_json_cut_short": ("outputs/damaged/runjson",),
         "fit_data_dir_of_other_rows": ("my_rows",)}


class Code:
    """Pickled, a call of ``print``: what ``torch.load(weights_only=False)`` would run."""

    def __reduce__(self):
        return (print, ("pickled code ran",))


def prepare(root: Path, tiny_model: Path, forks) -> None:
    import torch
    from conftest import clean_env

    (root / "my_rows").mkdir()  # a user's own rows, where a config points data_dir
    (root / "my_rows" / "train.jsonl").write_text('{"prompt": "mine", "answer": "kept"}\n')
    done = forks.one((*FIT, "--model.experiment", "fitted"), root, clean_env())
    assert done.returncode == 0, done.stderr[-2000:]
    fitted = root / "outputs" / "fitted"
    for name in ("cut", "code", "runjson"):
        shutil.copytree(fitted, root / "outputs" / "damaged" / name)
    data = (fitted / LAST).read_bytes()
    (root / "outputs/damaged/cut" / LAST).write_bytes(data[: len(data) // 2])
    text = (fitted / "run.json").read_text()
    (root / "outputs/damaged/runjson/run.json").write_text(text[: len(text) // 2])
    state = torch.load(fitted / LAST, weights_only=True)
    torch.save({**state, "extra": Code()}, root / "outputs/damaged/code" / LAST)
