"""Is the evaluated data the data the model was trained on? ``lensbench fit`` records its data
settings in the run folder's ``run.json`` (``data.dataset``, ``data.seed``, ``data.options.*``,
``data.path``, ``data.append_eos``); an analysis of a memorising model reads them (or the ``data``
of the training config) and refuses other data in one line unless told it is deliberate."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..errors import LensbenchError

#: Where the training data's settings default when a training config leaves them out (SyntheticTextData's).
DEFAULTS = {"dataset": "synthetic_qa", "seed": 0, "options": None, "path": None, "append_eos": False}


def trained_data(model_source: str, train_config: str | None) -> tuple[dict[str, Any], str] | None:
    """The data settings the model was trained with (``dataset``, ``seed``, ``options``, ``path``,
    ``append_eos``) and the file that says so: the ``run.json`` of the ``lensbench fit`` run folder
    that is or holds the model (a ``checkpoint-<step>`` folder's parent), else the ``data`` of
    ``train_config``; None when neither records it (a model trained elsewhere)."""
    import json

    import yaml

    folder = Path(model_source)
    for candidate in (folder / "run.json", folder.parent / "run.json"):
        if candidate.is_file() and folder.exists():
            try:
                record = json.loads(candidate.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue  # not a readable fit record: nothing to check against
            if not isinstance(record, dict) or "data.dataset" not in record:
                continue
            options = {k[len("data.options."):]: v for k, v in record.items() if k.startswith("data.options.")}
            data = {k: record.get(f"data.{k}", d) for k, d in DEFAULTS.items() if k != "options"}
            data["options"] = options or record.get("data.options")
            return data, str(candidate)
    if train_config and Path(train_config).is_file():
        config = yaml.safe_load(Path(train_config).read_text(encoding="utf-8")) or {}
        section = config.get("data") if isinstance(config, dict) else None
        if isinstance(section, dict):
            section = section.get("init_args", section)
            return {k: section.get(k, d) for k, d in DEFAULTS.items()}, train_config
    return None


def _resolved(dataset: str | None, options: dict | None, registry) -> dict[str, Any]:
    """A synthetic dataset's options with its defaults filled in (as given when they do not resolve)."""
    if not dataset:
        return dict(options or {})
    try:
        generator = registry.get(dataset)
        return dataclasses.asdict(generator.options(options or {}, "options"))
    except (LensbenchError, KeyError, TypeError, ValueError):
        return dict(options or {})


def check_same_data(trained: tuple[dict[str, Any], str], used: dict[str, Any], field: str, switch: str,
                    registry) -> None:
    """Refuse evaluation data (``used``: ``dataset``, ``options``, ``seed``, ``path``, ``facts``)
    other than the training data, naming the first field that differs under ``field``
    (``data.init_args``); ``switch`` is the setting that allows it. ``registry`` holds the
    synthetic datasets (their defaults fill in options left out)."""
    data, source = trained
    allow = f"or {switch}: true for a held-out study"
    if used.get("facts") is not None:
        raise LensbenchError(f"the model was trained on {data['dataset'] or data['path']} ({source}), this evaluation "
                             f"uses the facts {used['facts']}; evaluate its training data, {allow}", f"{field}.facts")
    if data.get("path") is not None or used.get("path") is not None:
        if data.get("path") is None or used.get("path") is None or \
                Path(data["path"]).resolve() != Path(used["path"]).resolve():
            trained_on = f"the folder {data['path']}" if data.get("path") is not None else data["dataset"]
            evaluated = f"the folder {used['path']}" if used.get("path") is not None else used["dataset"]
            raise LensbenchError(f"the model was trained on {trained_on} ({source}), this evaluation uses "
                                 f"{evaluated}; evaluate its training data, {allow}",
                                 f"{field}.{'path' if used.get('path') is not None else 'dataset'}")
        return
    name = data["dataset"]
    if used.get("dataset") != name:
        raise LensbenchError(f"the model was trained on {name} ({source}), this evaluation uses {used.get('dataset')}; "
                             f"set dataset: {name} with the training's options and seed, {allow}", f"{field}.dataset")
    if used.get("seed") != data.get("seed"):
        raise LensbenchError(f"the model was trained on {name} with seed {data.get('seed')}, this evaluation uses seed "
                             f"{used.get('seed')}; set seed {data.get('seed')}, {allow}", f"{field}.seed")
    want, got = _resolved(name, data.get("options"), registry), _resolved(name, used.get("options"), registry)
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            raise LensbenchError(f"the model was trained on {name} with {key} {want.get(key)!r}, this evaluation uses "
                                 f"{got.get(key)!r}; set {key}: {want.get(key)!r}, {allow}", f"{field}.options.{key}")
