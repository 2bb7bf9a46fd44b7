"""A run's identity: the settings its ``run.json`` records, flattened to config paths
(``model.init_args.seed``), and those that may differ between runs on one folder (free ones).

A leaf below the analyses and the CLIs: ``lensbench.analysis`` (a resume), ``lensbench.cli``
(predict), ``lensbench.training`` (fit) and ``lensbench.pipeline`` all read it.
"""

from __future__ import annotations

from typing import Any

#: torch's float32 matmul precision (a top-level config key and option): recorded in run.json by the
#: run that makes the folder, not matched on resume (the run log says what each run used).
MATMUL_KEY = "float32_matmul_precision"

#: The lensbench version that made the run folder: recorded in run.json, not matched on resume.
VERSION_KEY = "lensbench_version"

#: A digest of the rows a ``lensbench fit`` run trains and validates on (``SyntheticTextData.rows_digest``): recorded
#: by the run that makes the folder and matched on resume, so that a regenerated or edited dataset
#: (a generator's new version, changed JSONL files) is refused rather than mixed into one training.
ROWS_KEY = "data.rows_digest"

#: Settings that never change what a stored record means (where results go, recompute-all), and
#: the matmul precision and lensbench version, recorded but not matched.
ALWAYS_FREE = ("model.init_args.experiment", "model.init_args.output_dir", "model.init_args.force_run", MATMUL_KEY,
               VERSION_KEY)


def free_fields(analysis: Any, datamodule: Any) -> tuple[str, ...]:
    """Config paths that may differ between runs on one folder: those choosing which work items
    exist or how they are scheduled (``extendable`` of the analysis and of the DataModule), never
    those that change a stored record's meaning."""
    return (*ALWAYS_FREE,
            *(f"model.init_args.{f}" for f in getattr(analysis, "extendable", ())),
            *(f"data.init_args.{f}" for f in getattr(datamodule, "extendable", ())))


def is_free(key: str, free: tuple[str, ...]) -> bool:
    """Whether the config path ``key`` is one of ``free`` or lies under one."""
    return any(key == f or key.startswith(f + ".") for f in free)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict keyed by dotted paths (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}
