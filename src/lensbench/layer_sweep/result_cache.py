"""What each of layer_sweep's cached MTEB results was computed from, so that a resumed work item
reuses a result only when it still holds.

``mteb.evaluate(..., overwrite_strategy="only-missing")`` reads back any result file found at the
layer's path in the run's ``ResultCache`` (``mteb/``) when it covers the task's splits and
subsets, whatever dataset revision or embedding it was computed from. A run killed mid-task and
resumed after its task folder was edited (or on a machine that loads the model in another dtype)
would mix old layers' scores with new ones. So each work item keeps, outside ``mteb/`` (which holds
MTEB's own files only), one small JSON file saying what its results were computed from: the model
state, task (content digest and dataset revision), layer, pooling and embedding settings, each
result file's SHA-256 and the seconds it took. Before a work item is evaluated, ``drop_stale``
removes every result file of its layers that this record does not vouch for (settings differ, the
file changed, was written by a run killed before recording it, or by a lensbench that kept no
record) and says so in one line; MTEB then recomputes those layers and the others are read back
with their original duration.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

#: Folder of the run holding one record per work item (beside ``mteb/``).
RECORD_DIR = "mteb_provenance"
#: How the run log names a setting that changed.
_LABELS = {"task_digest": "task content digest", "state": "model state", "context": "truncation length"}


def embedding_settings(sweep: Any, loaded: Any, backbone: Any) -> dict[str, Any]:
    """The settings of ``sweep`` (a ``LayerSweep``) and of the loaded model that change a layer's
    embedding; each read defensively (a setting a version of lensbench lacks is None)."""
    tokenizer = getattr(loaded, "tokenizer", None)
    dtype = getattr(backbone, "dtype", None) or getattr(getattr(loaded, "model", None), "dtype", None)
    context = getattr(sweep, "_context", lambda _: None)(loaded)  # max_length bounded by the model's context
    return {"pooling": getattr(sweep, "pooling", None), "layer_norm": _plain(getattr(sweep, "layer_norm", None)),
            "max_length": getattr(sweep, "max_length", None), "context": context,
            "dtype": None if dtype is None else str(dtype), "padding_side": getattr(tokenizer, "padding_side", None)}


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class ResultRecord:
    """The record of one work item: ``settings`` (what every layer's result depends on besides
    the layer) and per layer the result file, its SHA-256 and its duration."""

    def __init__(self, run_dir: Path, key: str, settings: dict[str, Any]) -> None:
        from ..work import content_digest

        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RECORD_DIR / f"{content_digest(key)}.json"
        self.key = key
        self.settings = json.loads(json.dumps(settings, default=str))  # as it reads back from disk
        self.layers: dict[str, dict[str, Any]] = {}
        self.stored_settings: dict[str, Any] | None = None
        try:
            stored = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stored = None
        if isinstance(stored, dict) and isinstance(stored.get("layers"), dict):
            self.stored_settings = stored.get("settings")
            if self.stored_settings == self.settings:
                self.layers = {k: v for k, v in stored["layers"].items() if isinstance(v, dict)}

    def drop_stale(self, paths: dict[int, Path], dataset_revision: str | None, where: str) -> dict[int, float]:
        """Check the cached result file of each layer (``paths``: layer -> its path in the
        ``ResultCache``): remove every one this record does not vouch for, saying so in one console
        (and run log) line naming ``where``. Returns the layers whose results may be read back, with
        the seconds each first took."""
        reusable: dict[int, float] = {}
        stale: list[int] = []
        reasons: list[str] = []
        for layer, path in paths.items():
            if not path.exists():
                self.layers.pop(str(layer), None)
                continue
            why = self._why_stale(layer, path, dataset_revision)
            if why is None:
                reusable[layer] = float(self.layers[str(layer)].get("duration_s") or 0.0)
                continue
            stale.append(layer)
            reasons += [why] if why not in reasons else []
            self.layers.pop(str(layer), None)
            path.unlink(missing_ok=True)
        self._write()  # before anything is recomputed: the record vouches for no removed file
        if stale:
            from ..logs import console

            names = ", ".join(str(x) for x in stale)
            console.warning(f"layer_sweep: {where}: removed the cached MTEB results of layer"
                            f"{'s' if len(stale) > 1 else ''} {names} ({'; '.join(reasons)}); recomputing")
        return reusable

    def _why_stale(self, layer: int, path: Path, dataset_revision: str | None) -> str | None:
        if self.stored_settings is None:
            return "computed by a run that kept no record of what they were computed from"
        if self.stored_settings != self.settings:
            changed = sorted(k for k in set(self.settings) | set(self.stored_settings)
                             if self.settings.get(k) != self.stored_settings.get(k))
            return "computed with another " + "; ".join(
                f"{_LABELS.get(k, k)}: {self.stored_settings.get(k)!r}, now {self.settings.get(k)!r}" for k in changed)
        entry = self.layers.get(str(layer))
        if entry is None or entry.get("sha256") != _sha256(path):
            return "written by a run stopped before it recorded them, or changed since"
        try:
            revision = json.loads(path.read_text(encoding="utf-8")).get("dataset_revision")
        except (OSError, ValueError, AttributeError):
            return "unreadable"
        if dataset_revision is not None and revision != dataset_revision:
            return f"dataset revision {revision!r}, now {dataset_revision!r}"
        return None

    def record(self, layer: int, path: Path, duration_s: float) -> None:
        """Vouch for the result file MTEB just wrote for ``layer`` (nothing when it wrote none)."""
        digest = _sha256(path)
        if digest is None:
            return
        self.layers[str(layer)] = {"file": path.relative_to(self.run_dir).as_posix()
                                   if path.is_relative_to(self.run_dir) else str(path),
                                   "sha256": digest, "duration_s": duration_s}
        self._write()

    def _write(self) -> None:
        from ..run_folders import atomic_write

        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps({"key": self.key, "settings": self.settings, "layers": self.layers},
                                            indent=1, sort_keys=True))
