"""Catalogue cases of loop_identity's fields: each error names the field the user wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

LOOP = ("predict", "--model", "loop_identity", "--model.init_args.baseline", "tiny", "--model.init_args.start", "0",
        "--model.init_args.loop_counts", "[0, 1]", "--data", "lensbench.data.modules.TextDataModule",
        "--data.init_args.datasets", "[texts.txt]", "--trainer.accelerator", "cpu")

#: id -> (arguments, exit code, fragment of the one line)
CASES = {
    # end -1 is below start 0, but the wrong value is end's: it is named, not start
    "loop_identity_negative_end": ((*LOOP, "--model.init_args.end=-1"), 1,
                                   "model.init_args.end: must be a block index >= 0, got -1"),
    # a folder the pattern names is no causal LM: the user wrote the pattern, not a `source`
    "loop_identity_pattern_folder_not_a_decoder": (
        (*LOOP, "--model.init_args.end", "1", "--model.init_args.checkpoints", "lipattern/checkpoint-*"), 1,
        "model.init_args.checkpoints: 'lipattern/checkpoint-2' is not a decoder with an LM head"),
}


def prepare(root: Path, tiny_model: Path, forks) -> None:
    """``lipattern/checkpoint-1``: the tiny model; ``lipattern/checkpoint-2``: the tiny model whose
    config.json names no causal LM (architectures: LlamaModel, the backbone without a head)."""
    shutil.copytree(tiny_model, root / "lipattern" / "checkpoint-1")
    shutil.copytree(tiny_model, root / "lipattern" / "checkpoint-2")
    path = root / "lipattern" / "checkpoint-2" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "architectures": ["LlamaModel"]}))
