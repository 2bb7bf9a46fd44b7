"""The base class of every analysis: a LightningModule whose ``predict_step`` does one work item.

An analysis declares the models it loads (``declare_models``/``declare_model``) and, where it
takes one, its perturbation grid (``declare_grid``); says what one work item computes
(``process``, returning one JSON record) and how stored records become tables and figures
(``merge`` and ``plot``). From the declared models the base class resolves every source before
any folder is made, puts the weights' fingerprints into the run identity, builds the states
(checkpoints x grid), loads the models while the run lasts, and names each model's config field
in errors. It also does the rest: the run folder, the config guard, the result shard of each
rank, and the merge on rank 0 once every rank is done.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import lightning.pytorch as pl
import yaml

from .errors import LensbenchError
from .logs import Progress, RunLog, run_log
from .perturbations import GRID_EXTENDABLE, PerturbationGrid, grid_states
from .results import ResultStore
from .run_folders import (
    CONFIG_FILE,
    IDENTITY_FILE,
    LOCK_FILE,
    DamagedRunFile,
    atomic_write,
    check_is_run_folder,
    read_identity,
    run_folder,
    try_lock,
)
from .run_identity import is_free
from .state import State
from .work import WorkItem, changed_items, plan_items

if TYPE_CHECKING:
    from .models.spec import ModelSpec
    from .registry import Registries

#: run.json keys that describe one checkpoint (``<prefix><label>``): where checkpoints may be added
#: or left out, only those of the checkpoints in both runs must match.
PER_CHECKPOINT = ("model_fingerprint.", "compute_dtype.")
#: The config field of an analysis's perturbation grid (``declare_grid``).
GRID_FIELD = "model.init_args.perturbation"
#: run.json keys of run folders made before per-record content digests.
OLD_DATA_FINGERPRINTS = tuple(f"data_fingerprint.{k}" for k in ("datasets_sha256", "prompts_sha256", "images_sha256"))


_handed: list[Registries] = []  # innermost last: see ``hand_registries``


@contextlib.contextmanager
def hand_registries(registries: Registries) -> Iterator[Registries]:
    """Every analysis built inside the block holds ``registries`` (``Analysis.registries``): every
    registered name it uses (transforms, perturbation methods, metrics, datasets) is looked up there. The
    ``lensbench predict`` command builds its analysis inside this block with the registries the
    plugin manager built; ``lensbench.plugins.use_registries`` (and so
    ``lensbench.testing.use_plugins``) enters it too."""
    _handed.append(registries)
    try:
        yield registries
    finally:
        _handed.pop()


class Analysis(pl.LightningModule):
    """Subclasses set ``name`` (the registry key), declare their models in ``__init__`` and
    implement ``process`` and ``merge``."""

    name: ClassVar[str] = ""
    #: Work items handed to one ``predict_step`` (consecutive items of one state); see process_batch.
    items_per_step: int = 1
    #: Settings (paths under ``model.init_args``) that may change between runs on one folder
    #: because they only choose which work items exist or how they are scheduled: a finished run
    #: is extended with the missing items. Every other setting must match to resume. Default: the
    #: levels and repetitions of the perturbation grid (``declare_grid``); a subclass adds its own
    #: with ``extendable = (*Analysis.extendable, "my_setting")``.
    extendable: ClassVar[tuple[str, ...]] = GRID_EXTENDABLE
    #: True when the checkpoints studied may grow between runs on one folder (a setting in
    #: ``extendable`` names them): a new checkpoint's weight fingerprint is then not a mismatch.
    checkpoints_extendable: ClassVar[bool] = False
    #: Padding side of the tokenizers of the models ``subject_specs`` names (left for generation).
    padding_side: ClassVar[str] = "right"

    def __init__(self, experiment: str | None = None, output_dir: str = "outputs") -> None:
        """
        Args:
            experiment: Name of the run; results go to ``<output_dir>/<experiment>/``. Default:
                ``<analysis name>/<config file's stem>``, else the analysis name.
            output_dir: Folder holding one sub-folder per experiment.
        """
        super().__init__()
        self._registries: Registries | None = _handed[-1] if _handed else None
        self.experiment = experiment
        self.output_dir = output_dir
        self.run_config: str | None = None  # resolved config (YAML), set by the CLI
        self.run_identity: dict[str, Any] | None = None  # what must match to resume a run
        self.identity_free: tuple[str, ...] = ()  # config paths left out of the identity (set by the CLI)
        self.plan: list[WorkItem] | None = None  # every work item of the run (set in setup)
        self.run_log: RunLog | None = None
        self.subjects: Any = None  # a lensbench.state.SubjectManager while the run lasts
        self.progress: Progress | None = None
        self.store: ResultStore | None = None
        self.merged_outputs: list[Path] = []
        self._lock: Any = None  # rank 0's open, locked run_dir/.lock while the run lasts
        self.specs: dict[str, ModelSpec] = {}  # label -> the spec of each declared model
        self.fields: dict[str, str] = {}  # label -> the config field naming it
        self.grid: PerturbationGrid | None = None  # the declared perturbation grid, if any
        self._grid_states: list[State] | None = None
        self._length_limits: dict[str, tuple[int | None, str]] = {}  # checkpoint -> length_limit()

    @property
    def registries(self) -> Registries:
        """The registries handed to this analysis when it was built (``hand_registries``)."""
        if self._registries is None:
            raise LensbenchError(f"analysis {type(self).__name__} was built without registries, so it cannot look up "
                                 "registered names (transforms, perturbation methods, metrics, datasets): run it with "
                                 "`lensbench predict`, or build it inside `lensbench.testing.use_plugins()`")
        return self._registries

    # -- what an analysis declares ----------------------------------------------------------------
    def declare_model(self, entry: str | ModelSpec, field: str, **defaults: Any) -> ModelSpec:
        """Declare one model the analysis loads, named by config ``field``: an alias, hub id, folder
        or file (made a ``ModelSpec`` with ``defaults``) or a ``ModelSpec``. Its source is resolved
        now, before any run folder is made (a missing folder or an unknown alias is one line naming
        ``field``); its label must be new. Returns the spec, kept in ``self.specs``."""
        from .models.loading import ModelSpec, resolve_source

        if isinstance(entry, dict):  # a constructor without type hints gets the config's mapping
            entry = _built(ModelSpec, entry, field)
        spec = ModelSpec(entry, **defaults) if isinstance(entry, str) else entry
        resolve_source(spec, field=field, registry=self.registries.perturbations if spec.transforms else None)
        label = spec.label()
        if label in self.specs:
            raise LensbenchError(f"model label {label!r} is used twice; give one a `name`", field)
        self.specs[label] = spec
        self.fields[label] = field
        return spec

    def declare_models(self, entries: list[str | ModelSpec] | None, field: str = "model.init_args.models",
                       default: tuple[str, ...] = ("smollm2",)) -> list[ModelSpec]:
        """``declare_model`` for each entry of a list field (``field[i]``); ``default`` when it is
        null. An empty list is refused."""
        return [self.declare_model(entry, f"{field}[{i}]")
                for i, entry in enumerate(self.model_entries(entries, field, default))]

    @staticmethod
    def model_entries(entries: list[Any] | None, field: str = "model.init_args.models",
                      default: tuple[str, ...] = ("smollm2",)) -> list[Any]:
        """The entries of a list of models, ``default`` when it is null; an empty list is refused
        in one line naming ``field`` (for an analysis that declares each entry its own way)."""
        if entries is not None and len(entries) == 0:
            raise LensbenchError("is empty; name at least one model, or leave it null for the default "
                                 f"({', '.join(default)})", field)
        return list(default) if entries is None else list(entries)

    def declare_grid(self, grid: PerturbationGrid | None, field: str = GRID_FIELD) -> None:
        """Run every declared model at each state of ``grid`` (levels x repetitions) instead of
        as it is; null: each model as it is. The grid is checked now (method, group, levels,
        seed); its levels and repetitions may grow between runs on one folder (``extendable``).
        Call it after the models are declared."""
        if isinstance(grid, dict):  # a constructor without type hints gets the config's mapping
            grid = _built(PerturbationGrid, grid, field)
        self.grid = grid
        self._grid_states = grid_states(self.specs, grid, self.registries.perturbations if grid else None, field)

    def identity_models(self) -> list[str]:
        """Labels of the models whose weights' fingerprints join the run identity (run.json's
        ``model_fingerprint.<label>``): a run over changed weights is then refused. Default: every
        declared model."""
        return list(self.specs)

    def compute_dtypes(self) -> dict[str, str | None]:
        """Label -> the dtype a model computes in when it depends on where the run is (float16 on a
        GPU, float32 on the CPU): it joins the run identity as ``compute_dtype.<label>`` once the
        device is known, so a run resumed on another kind of device is refused rather than mixing
        results. Default: none (a model computes in the dtype its config entry names)."""
        return {}

    def length_limit(self, checkpoint: str, loaded: Any, field: str = "model.init_args.max_length") -> tuple[int | None, str]:
        """The length ``checkpoint``'s texts are cut at and what sets it ("max_length" or
        "context"): the analysis's ``max_length`` (null: the model's context) bounded by the model's context
        (``lensbench.generation.length_limit``), found once per checkpoint, so a ``max_length``
        beyond the context is one warning per model, naming ``field``."""
        if checkpoint not in self._length_limits:
            from .generation import length_limit

            self._length_limits[checkpoint] = length_limit(getattr(self, "max_length", None), loaded, field)
        return self._length_limits[checkpoint]

    def states(self) -> list[State]:
        """The model states the run covers: each declared model at each state of the declared
        grid, or as it is. An analysis with states of its own (interventions) overrides this."""
        if self._grid_states is None:
            return [State(label) for label in self.specs]
        return self._grid_states

    def process(self, item: WorkItem) -> dict[str, Any]:
        """Compute one work item; return a JSON-serialisable record."""
        raise NotImplementedError

    @classmethod
    def merge(cls, records: list[dict[str, Any]], run_dir: Path) -> list[Path]:
        """Turn every stored record into the analysis's tables; return the files written."""
        raise NotImplementedError

    @classmethod
    def plot(cls, run_dir: Path) -> list[Path]:
        """Draw the figures from the tables in ``run_dir``; return the files written."""
        return []

    #: Tables (file names) from which ``plot`` draws every figure, each with a column naming a
    #: line (``comparison_column``): several runs' rows stacked, that column's values prefixed by
    #: the run's label, make ``plot`` draw the runs on shared axes (``compare_figures``). Empty: no
    #: such figures.
    comparison_tables: ClassVar[tuple[str, ...]] = ()
    comparison_column: ClassVar[str] = "model"

    @classmethod
    def compare_figures(cls, run_dirs: list[Path], labels: list[str], out_dir: Path) -> list[Path]:
        """Figures of several runs of this analysis on shared axes (one line per run and model),
        drawn into ``out_dir``; the report shows them above the runs' own figures. Default: the
        ``comparison_tables`` of every run stacked into ``out_dir`` (``comparison_column`` values
        become ``<label>: <value>``), then ``plot(out_dir)``; none when ``comparison_tables`` is
        empty or a run lacks one of them."""
        import pandas as pd

        if not cls.comparison_tables or not all((Path(d) / t).is_file() for d in run_dirs for t in cls.comparison_tables):
            return []
        for name in cls.comparison_tables:
            frames = []
            for run_dir, label in zip(run_dirs, labels):
                frame = pd.read_csv(Path(run_dir) / name, keep_default_na=False, na_values=[""])
                frame[cls.comparison_column] = f"{label}: " + frame[cls.comparison_column].astype(str)
                frames.append(frame)
            pd.concat(frames, ignore_index=True).to_csv(Path(out_dir) / name, index=False)
        return cls.plot(Path(out_dir))

    @classmethod
    def report_sections(cls, run_dir: Path) -> list:
        """The sections of ``run_dir``'s report page (``lensbench.report.Section``: a title, figures,
        tables with column descriptions). Default: every figure and table of the folder, columns
        described by ``docs/<name>.md`` where it is found above the analysis's module."""
        import sys

        from .report import default_sections

        return default_sections(run_dir, cls.name, getattr(sys.modules.get(cls.__module__), "__file__", None))

    def fingerprint(self) -> dict[str, Any]:
        """What besides the config must match to resume a run: the weights of ``identity_models``."""
        from .models.fingerprint import model_fingerprint

        return {label: model_fingerprint(self.specs[label], self.fields[label]) for label in self.identity_models()}

    def subject_specs(self) -> dict[str, Any]:
        """Label -> ``ModelSpec`` of the models this analysis loads (default: the declared ones):
        the base class then holds a ``SubjectManager`` in ``self.subjects`` while the run lasts
        (none when empty)."""
        return dict(self.specs)

    def subject_fields(self) -> dict[str, str]:
        """Label -> the config field that names the model (``model.init_args.models[0]``): an error
        found when it is loaded names that field. Default: the declared fields."""
        return dict(self.fields)

    def inputs_fingerprint(self) -> dict[str, Any]:
        """Hashes of other inputs whose content the config names only by path (a scored text file)."""
        return {}

    # -- the run folder ------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        """``<output_dir>/<experiment>``; an experiment that is absolute or climbs out with ``..`` is refused."""
        return run_folder(self.output_dir, self.experiment)

    @classmethod
    def holds_results(cls, run_dir: Path) -> bool:
        """Whether ``run_dir`` holds a result of an earlier run: a stored record (an analysis that
        keeps results elsewhere too, such as partial MTEB scores, says so here). A folder that holds
        none takes the settings of the next run: a run killed before its first record (an OOM kill
        while loading) can be repeated with corrected settings."""
        return ResultStore(run_dir).has_records()

    def check_run_dir(self) -> None:
        """Refuse to mix results of a different configuration into an existing run folder; a folder
        holding no result takes this run's settings (its run.json is rewritten by rank 0)."""
        path = self.run_dir / IDENTITY_FILE
        self._replace_identity = False
        if self.run_identity is None or not path.exists():
            return
        try:
            stored = read_identity(path)
        except DamagedRunFile:
            if type(self).holds_results(self.run_dir):
                raise
            self._replace_identity = True  # nothing stored that it could describe
            return
        stored = {k: v for k, v in stored.items() if not is_free(k, self.identity_free)}
        current = self.run_identity
        if self.checkpoints_extendable:  # checkpoints added or left out; a shared one must still match
            stored, current = ({k: v for k, v in a.items() if not k.startswith(PER_CHECKPOINT) or k in b}
                               for a, b in ((stored, current), (current, stored)))
        if any(k.startswith(OLD_DATA_FINGERPRINTS) for k in stored) and type(self).holds_results(self.run_dir):
            raise LensbenchError(
                f"{self.run_dir} was made by an older lensbench (whole-dataset hashes, no per-record digests, "
                "0-based prompt ids), which this one cannot extend; set another experiment name, or force_run "
                "where the analysis has it", "model.init_args.experiment")
        if stored != json.loads(json.dumps(current)):
            changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
            if not type(self).holds_results(self.run_dir):  # nothing stored under the old settings
                self._replace_identity = True
                return
            weights = [k.split(".", 1)[1] for k in changed if k.startswith("model_fingerprint.")]
            what = (f"the weights of {', '.join(weights)} changed since it started" if weights and len(weights) == len(changed)
                    else f"changed: {', '.join(changed)}")
            from .models.fingerprint import older_format

            older = [k.split(".", 1)[1] for k in changed
                     if k.startswith("model_fingerprint.") and older_format(stored.get(k))]
            if older:
                what += (f"; the fingerprints of {', '.join(older)} were made by an older lensbench, which sampled "
                         "the weights and cannot show them unchanged")
            raise LensbenchError(
                f"{self.run_dir} holds results of a different configuration ({what}); "
                "set another experiment name or delete that folder",
                "model.init_args.experiment",
            )

    def write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.run_config is not None:
            atomic_write(self.run_dir / CONFIG_FILE, self.run_config)
        if self.run_identity is not None and (getattr(self, "_replace_identity", False)
                                              or not (self.run_dir / IDENTITY_FILE).exists()):
            if getattr(self, "_replace_identity", False):
                run_log.info(f"{self.run_dir} held no result: it takes this run's settings")
            atomic_write(self.run_dir / IDENTITY_FILE, json.dumps(self.run_identity, indent=1, sort_keys=True))
            self._new_identity = True  # this run made the folder's identity (undone if it stores nothing)

    def prepare_run_dir(self) -> None:
        """Rank 0, once the folder is locked and its identity checked, before any rank reads it."""

    def lock_run_dir(self) -> None:
        """Rank 0 holds ``run_dir/.lock`` for the whole run: a second run on the folder is refused,
        and so is a folder lensbench did not make (a user's files are never taken over)."""
        failure: LensbenchError | None = None
        if self.global_rank == 0:
            try:
                check_is_run_folder(self.run_dir)
                try:
                    self.run_dir.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise LensbenchError(f"cannot create the run folder {self.run_dir} ({exc.strerror}); set "
                                         "output_dir to a folder you can write", "model.init_args.output_dir") from None
                self._lock = try_lock(self.run_dir / LOCK_FILE)
                if self._lock is None:
                    raise LensbenchError(f"another lensbench run is writing {self.run_dir}; wait for it to finish, "
                                         "or set another experiment name", "model.init_args.experiment")
            except LensbenchError as exc:
                failure = exc
        message = self.trainer.strategy.broadcast(None if failure is None else str(failure), src=0)
        if failure is not None:
            raise failure
        if message is not None:
            raise LensbenchError(message)

    def unlock_run_dir(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing releases the lock
            self._lock = None

    # -- Lightning hooks -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dtypes = self.compute_dtypes()
        if self.run_identity is not None and dtypes:  # known now, where the device is
            self.run_identity = {**self.run_identity, **{f"compute_dtype.{k}": v for k, v in dtypes.items()}}
        self.lock_run_dir()
        self.check_run_dir()  # every rank checks, so every rank fails alike
        datamodule = self.trainer.datamodule
        self.plan = plan_items(self.states(), datamodule.units())
        failure: BaseException | None = None
        if self.global_rank == 0:
            try:
                self.prepare_run_dir()
                problem = changed_items(self.plan, ResultStore(self.run_dir).digests())
                if problem:  # before anything of this run is written
                    failure = LensbenchError(
                        f"{self.run_dir} holds results computed on other content ({problem}); restore that "
                        "content, or set another experiment name", getattr(datamodule, "content_field", "data.init_args"))
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
                failure = exc
        message = self.trainer.strategy.broadcast(None if failure is None else str(failure), src=0)
        if failure is not None:
            raise failure
        if message is not None:
            raise LensbenchError(f"rank 0 stopped: {message}")
        self.run_log = RunLog(self.run_dir, self.global_rank)
        self.run_log.attach()
        if self.global_rank == 0:
            self.write_run_files()
        self.store = ResultStore(self.run_dir)  # Lightning's post_setup barrier follows
        specs = self.subject_specs()
        if specs:
            from .state import SubjectManager

            self.subjects = SubjectManager(specs, self.device, self.registries.perturbations, self.padding_side,
                                           self.subject_fields())

    def on_predict_start(self) -> None:
        path = self.store.open_shard(self.global_rank)
        run_log.info(f"rank {self.global_rank}/{self.trainer.world_size} on {self.device}: results to {path}")

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        return batch  # a WorkItem; ``process`` moves what it needs

    def process_batch(self, items: list[WorkItem]) -> list[dict[str, Any]]:
        """Records of several items of one state (analyses with ``items_per_step > 1``)."""
        return [self.process(item) for item in items]

    def predict_step(self, step: WorkItem | list[WorkItem], batch_idx: int) -> None:
        items = step if isinstance(step, list) else [step]
        records = self.process_batch(items) if isinstance(step, list) else [self.process(step)]
        for item, record in zip(items, records, strict=True):
            digest = {"digest": item.digest} if item.digest is not None else {}
            self.store.write(item.key_str, {"state": item.state.id, **digest, **record})
        if self.progress is not None:
            self.progress.step(len(items))

    def teardown(self, stage: str) -> None:
        failure: BaseException | None = None
        try:
            if self.store is None:
                return
            self.store.close()
            trainer = self.trainer
            if trainer.state.status != pl.trainer.states.TrainerStatus.RUNNING:
                return  # interrupted or failed: keep the shards, merge nothing
            trainer.strategy.barrier("lensbench-merge")
            if trainer.is_global_zero:
                self.merged_outputs = self.finalize()
                from .report import write_report_or_warn  # after every table and figure

                self.merged_outputs += write_report_or_warn(self.run_dir, type(self))
            trainer.strategy.barrier("lensbench-merged")
            if trainer.is_global_zero:
                run_log.info(f"merged: {', '.join(p.name for p in self.merged_outputs)}")
        except BaseException as exc:  # a rank lost at the barriers, a failed merge: the log says why
            failure = exc
            raise
        finally:
            self.release_run(failure)

    def release_run(self, exception: BaseException | None = None) -> None:
        """Close the shard, log why the run stopped, detach the run log and unlock the folder.
        Called by ``teardown`` and, because Lightning skips ``teardown`` when a run fails, by the
        DataModule's ``on_exception``; calling it twice does nothing more."""
        try:
            if exception is not None and self.run_log is not None and self.run_log.handler is not None:
                reason = getattr(exception, "message", None) or str(exception) or type(exception).__name__
                run_log.error(f"rank {self.global_rank}: run stopped: {type(exception).__name__}: {reason}")
            if self.store is not None:
                self.store.close()
            if exception is not None and getattr(self, "_new_identity", False) and self.global_rank == 0:
                # A run that failed before storing anything (a model that does not load, say) leaves no
                # identity behind: the next run with a fixed config must not be refused as "different".
                self._new_identity = False
                if self.store is None or not self.store.keys():
                    (self.run_dir / IDENTITY_FILE).unlink(missing_ok=True)
        finally:  # whatever failed above (a full disk, a second signal), the folder is unlocked
            try:
                if self.run_log is not None:
                    self.run_log.detach()
                if self.subjects is not None:
                    self.subjects.release()
            finally:
                self.unlock_run_dir()

    def finalize(self) -> list[Path]:
        """Merge every stored record into tables and figures (rank 0, after all ranks finished)."""
        planned = None if self.plan is None else {item.key_str for item in self.plan}
        # Records of items this config no longer plans (fewer repetitions, say) stay stored, unmerged.
        records = [r for r in self.store.records() if planned is None or r["key"] in planned]
        if not records:
            raise LensbenchError(f"no results stored under {self.store.dir}; nothing to merge")
        outputs = type(self).merge(records, self.run_dir)
        outputs += type(self).plot(self.run_dir)
        return outputs


def _built(cls: type, mapping: dict, field: str) -> Any:
    """``cls(**mapping)``, an unknown key one line naming it."""
    import dataclasses

    from .errors import did_you_mean

    fields = dataclasses.fields(cls)
    known = [f.name for f in fields]
    for key in mapping:
        if key not in known:
            raise LensbenchError(f"unknown key {key!r}; {did_you_mean(str(key), known)}", f"{field}.{key}")
    for f in fields:
        if f.name not in mapping and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise LensbenchError(f"is required; give {f.name}", f"{field}.{f.name}")
    return cls(**mapping)


def load_run_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config a run folder holds; a missing or damaged one is one line."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise LensbenchError(f"{run_dir} has no {CONFIG_FILE}; give the output folder of a lensbench run")
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise LensbenchError(f"{path} is damaged (not YAML{where}); restore it, or repeat the run into another "
                             "folder") from None
    if not isinstance(value, dict):
        raise LensbenchError(f"{path} is damaged (a YAML {type(value).__name__}, not a mapping of settings); "
                             "restore it, or repeat the run into another folder")
    return value
