"""Small local MTEB tasks for the layer_sweep cases and faults (docs/layer_sweep.md#task-formats),
in the tiny tokenizer's vocabulary."""

from __future__ import annotations

import json
import random
from pathlib import Path

from lensbench.testing import WORDS


def write_sts(folder: Path, seed: int = 0, pairs: int = 20) -> Path:
    """An STS task folder: ``task.json`` and ``test.jsonl`` of ``pairs`` graded sentence pairs."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps({"type": "STS", "description": "tiny graded pairs"}))
    rows = []
    for i in range(pairs):
        a = " ".join(rng.choice(WORDS) for _ in range(6))
        b = a if i % 4 == 0 else " ".join(rng.choice(WORDS) for _ in range(6))
        rows.append({"sentence1": a, "sentence2": b, "score": 5.0 if a == b else float(i % 5)})
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
