"""Hook specifications: the whole plugin surface of lensbench.

Every hook returns a list of things to register; pluggy collects one list per plugin and the
registry (``lensbench.registry``) flattens them, refusing duplicate names. Built-in analyses,
statistics, datasets and MTEB tasks are registered through these very hooks (``lensbench.plugins.BUILTIN``).
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("lensbench")
hookimpl = pluggy.HookimplMarker("lensbench")


@hookspec
def lensbench_register_analyses() -> list[type]:
    """Return analysis classes (subclasses of ``lensbench.analysis.Analysis``).

    Each class is registered under its ``name`` attribute, which a config may use as
    ``model: {class_path: <name>}``. All results are collected; duplicate names are an error.
    """


@hookspec
def lensbench_register_perturbations() -> list[type]:
    """Return model-state transforms (subclasses of ``lensbench.state.Transform``).

    Each is registered under its ``name`` attribute and selected by that name in a state's
    ``transforms`` list. All results are collected; duplicate names are an error.
    """


@hookspec
def lensbench_register_metrics() -> list[object]:
    """Return per-token statistics (instances of ``lensbench.metrics.TokenStatistic``).

    Each maps a ``[tokens, hidden]`` tensor to one value per token and is registered under its
    ``name``; analyses such as ``activation_norms`` select them by name. All results are
    collected; duplicate names are an error.
    """


@hookspec
def lensbench_register_datasets() -> list[object]:
    """Return named text datasets (instances of ``lensbench.data.sources.DatasetEntry``).

    A config names a registered dataset instead of a file path. All results are collected;
    duplicate names are an error.
    """


@hookspec
def lensbench_register_synthetic_datasets() -> list[object]:
    """Return synthetic-dataset generators (instances of ``lensbench.synthetic.datasets.SyntheticDataset``).

    Each builds a deterministic train/val/test set from a seed (synthetic QA, digit lookup, ...),
    names the answer mask its examples train with (its ``answer_spans`` may say itself where a
    row's answer is) and carries a ``version`` (bump it when its rows change: cached rows of
    another version are never reused); ``lensbench fit`` configs select one by ``name``. All
    results are collected; duplicate names are an error.
    """


@hookspec
def lensbench_register_mteb_tasks() -> list[object]:
    """Return local MTEB tasks (instances of ``lensbench.layer_sweep.tasks.TaskEntry``).

    Each names a task folder (``task.json`` and JSONL files, docs/layer_sweep.md#task-formats) that a
    ``layer_sweep`` config selects by ``name`` in its ``tasks`` list. All results are collected;
    duplicate names are an error, and so is a config naming a task that takes the name of a task
    MTEB knows (its scores would be cached and read as MTEB's): give such a task another name.
    """
