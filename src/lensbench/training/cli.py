"""``lensbench fit``: Lightning's own ``fit`` subcommand for ``CausalLMTraining`` and a DataModule.

The run folder ``<output_dir>/<experiment>/`` (default experiment ``fit/<config stem>``) holds
``config.yaml`` and ``run.json`` (written once the data and the model have passed their set-up, so
that a run stopped by bad input claims no folder: the settings that must match to resume, and the
``float32_matmul_precision`` of the run that made the folder, recorded only),
``metrics/version_<n>/metrics.csv`` (Lightning's CSVLogger, one version per run or resumed run),
``memory_usage.csv``, ``parameters.csv`` (total and active parameters per part), ``logs/rank<r>.log``, ``lightning/last.ckpt`` and the Hugging Face folders
``checkpoint-<step>/``, and ``.lock``, which rank 0 holds while the run lasts (a second run on the
folder is refused). Running the same config again resumes from ``lightning/last.ckpt`` (optimizer,
scheduler, step and data position included); a larger ``trainer.max_steps`` trains further, and a
checkpoint that already reached it trains nothing and says so. ``--ckpt_path`` resumes another
run's checkpoint; its stored model and data settings must be the config's (``resume.py``): unlike
Lightning's own CLI, the config is never replaced by them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..errors import LensbenchError

#: Settings that may change between runs on one folder (where to write, how often, how long).
FREE = ("model.experiment", "model.output_dir", "model.save_every", "model.track_memory_every",
        "data.val_batch_size", "data.data_dir")


def _build_fit_cli():
    from .. import __version__
    from ..cli_base import cli_base_class, default_experiment
    from ..run_identity import MATMUL_KEY, ROWS_KEY, VERSION_KEY, flatten, is_free

    class LensbenchFitCLI(cli_base_class()):
        nothing_to_train: str | None = None  # the line saying so, when the checkpoint reached max_steps

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

        def add_arguments_to_parser(self, parser) -> None:
            super().add_arguments_to_parser(parser)
            parser.set_defaults({"trainer.gradient_clip_val": 1.0, "trainer.enable_model_summary": False,
                                 "trainer.max_steps": 1000, "trainer.log_every_n_steps": 10})

        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand]
            if cfg.model.get("experiment") is None:
                cfg.model.experiment = default_experiment("fit", cfg.get("config") or [])
            super().before_instantiate_classes()

        def instantiate_trainer(self, **kwargs: Any):
            from lightning.pytorch.loggers import CSVLogger

            from .callbacks import HuggingFaceCheckpoints, LastCheckpoint, MemoryUsage, WriteAtFitStart

            run_dir = self.model.run_dir
            self.at_start = WriteAtFitStart()  # config.yaml and run.json, filled in by before_fit
            extra = [self.at_start, HuggingFaceCheckpoints(run_dir, self.model.save_every),
                     LastCheckpoint(dirpath=run_dir / "lightning", filename="step{step}", save_last=True,
                                    save_top_k=0, every_n_train_steps=self.model.save_every,
                                    enable_version_counter=False)]  # HuggingFaceCheckpoints also writes last.ckpt
            if self.model.track_memory_every:
                # before HuggingFaceCheckpoints: the last.ckpt it saves in the final batch holds that batch's reads
                extra.insert(1, MemoryUsage(run_dir, self.model.track_memory_every))
            kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + extra
            cfg = self.config_init[self.subcommand].trainer
            if cfg.get("logger") in (None, True):
                # one metrics/version_<n>/metrics.csv per (resumed) run: a resumed run never overwrites
                self.config_init[self.subcommand].trainer.logger = CSVLogger(str(run_dir), name="metrics")
            return super().instantiate_trainer(**kwargs)

        def before_fit(self) -> None:
            from .resume import FolderLock

            # rank 0 holds <run>/.lock (predict's lock) from here until fit returns: a second run on the
            # folder is refused before it reads or writes anything there
            self.lock = FolderLock(self.model.run_dir, "model.experiment")
            if self.trainer.global_rank == 0:
                self.lock.take()
            try:
                self.check_run()
            except BaseException:
                self.lock.release(undo=True)  # a folder this run made goes again
                raise

        def check_run(self) -> None:
            parser = self._subcommand_parsers[self.subcommand]
            cfg = self.config[self.subcommand]
            text = parser.dump(cfg, skip_none=False)
            resolved = yaml.safe_load(text)
            identity = {k: v for k, v in flatten({"model": resolved.get("model"), "data": resolved.get("data")}).items()
                        if not is_free(k, FREE)}
            run_dir = self.model.run_dir
            ident_path = run_dir / "run.json"
            last = run_dir / "lightning" / "last.ckpt"
            made_with = self.matmul_precision  # the float32 matmul precision: recorded, not matched
            version = __version__  # the lensbench that made the folder: recorded, not matched
            rows = None  # the digest of the rows the folder was trained on: matched by check_rows
            if ident_path.exists():
                from ..run_folders import read_identity

                stored = read_identity(ident_path, "model.experiment")  # a damaged one is one line
                made_with = stored.pop(MATMUL_KEY, None)
                version = stored.pop(VERSION_KEY, None)  # None: a folder made before it was recorded
                rows = stored.pop(ROWS_KEY, None)
                identity = json.loads(json.dumps(identity))
                if stored != identity:
                    changed = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
                    raise LensbenchError(
                        f"{run_dir} holds a training run with other settings ({', '.join(changed[:3])}"
                        f"{', ...' if len(changed) > 3 else ''}); set another experiment name, or delete the folder",
                        "model.experiment")
            from ..logs import console

            if made_with not in (None, self.matmul_precision):
                console.warning(f"lensbench: this run computes with {MATMUL_KEY} {self.matmul_precision}; the run "
                                f"that made {run_dir} used {made_with}")
            record = identity if made_with is None else {**identity, MATMUL_KEY: made_with}
            if version is not None:
                record = {**record, VERSION_KEY: version}
            digest = self.check_rows(run_dir, rows, made_here=not ident_path.exists())
            if digest is not None:
                record = {**record, ROWS_KEY: digest}
            from .parameters import parameter_table

            self.at_start.files = {run_dir / "config.yaml": text,  # written once set-up has passed
                                   ident_path: json.dumps(record, indent=1, sort_keys=True),
                                   run_dir / "parameters.csv": parameter_table(self.model.model).to_csv(index=False)}
            self.check_resume(cfg.get("ckpt_path"), last, identity)

        def check_rows(self, run_dir: Path, stored: str | None, made_here: bool) -> str | None:
            """The digest of the rows this run trains, validates and tests on (the data is read
            here, before anything is written); a resumed run whose rows differ from those its
            folder was trained on (a dataset regenerated by another generator version, JSONL files
            edited) is refused in one line. None for a folder made before digests were recorded."""
            digest = self.datamodule.rows_digest()
            if stored is not None and stored != digest:
                raise LensbenchError(f"the rows of the data differ from those {run_dir} was trained on (its {ROWS_KEY} "
                                     f"{stored[:12]}..., now {digest[:12]}...: a dataset regenerated by another "
                                     "generator version, or edited files); give the same data, or set another "
                                     "experiment name", "data")
            return digest if made_here or stored is not None else None

        def check_resume(self, asked: str | None, last: Path, identity: dict[str, Any]) -> None:
            """Read the checkpoint the run resumes from (``ckpt_path``, else the run folder's
            last.ckpt): refuse one that does not read or was trained with other settings, and note
            when it already reached ``trainer.max_steps``."""
            from ..logs import console
            from .resume import inexact, read_checkpoint, reached, refuse_other_settings

            if asked == "last":  # Lightning's keyword: this run folder's last checkpoint
                asked = str(last)
            if asked in ("best", "hpc", "registry"):
                raise LensbenchError(f"ckpt_path {asked!r} names no checkpoint of lensbench fit; give the path of a "
                                     "run folder's lightning/last.ckpt", "ckpt_path")
            if asked:
                path, field = Path(asked), "ckpt_path"
                unreadable = "give another checkpoint, or leave out ckpt_path to train from the start"
                other = ("give the config of the run that made it, or start from its weights instead "
                         "(model.pretrained_layers)")
            elif last.exists():
                path, field = last, "model.experiment"
                unreadable = "restore it from a copy you trust, or set another experiment name to train from the start"
                other = "set another experiment name, or give the config of the run that made it"
            else:
                return
            checkpoint = read_checkpoint(path, field, unreadable)
            refuse_other_settings(path, checkpoint, identity, FREE, field, other)
            step = reached(checkpoint, self.trainer.max_steps)
            if step is not None:
                self.nothing_to_train = (f"lensbench: nothing to train: {path} already reached step {step} "
                                         f"(trainer.max_steps {self.trainer.max_steps}); raise trainer.max_steps "
                                         "to train longer")
            elif not asked:
                console.info(f"resuming from {last}")
                self.config_init[self.subcommand].ckpt_path = str(last)
            if step is None and inexact(checkpoint):
                console.warning(f"lensbench: {path} was written by an older lensbench when its run ended (step "
                                f"{checkpoint['global_step']}): resumed from it, training goes on at another batch "
                                "than an uninterrupted run would, not bit for bit; to train exactly, set another "
                                "experiment name and start over")
            del checkpoint  # its tensors are mapped, not read: Lightning reads the file again

        def fit(self, model, **kwargs: Any) -> None:
            try:
                if self.nothing_to_train:
                    from ..logs import console

                    console.warning(self.nothing_to_train)
                    return
                self.trainer.fit(model, **kwargs)
            finally:
                self.lock.release(undo=self.nothing_to_train is not None)

        def _parse_ckpt_path(self) -> None:
            """Lightning would replace the config's model settings by the checkpoint's own; lensbench
            compares them instead (``check_resume``) and refuses a checkpoint of other settings."""

    return LensbenchFitCLI


def run_fit(argv: list[str] | None) -> Any:
    from ..cli_base import run_cli
    from ..plugins import active_registries
    from .data import SyntheticTextData
    from .module import CausalLMTraining

    return run_cli(
        _build_fit_cli(),
        CausalLMTraining,
        SyntheticTextData,
        active_registries(),
        "Train a model (a memory model by default): lensbench fit --config X.yaml",
        # the second: a resume with another save_every (free to change) meets another ModelCheckpoint key
        quiet=(r".*when logging on epoch level in distributed setting.*",
               r".*callbacks used to create the checkpoint need to be provided.*"),
        subclass_mode_model=False,
        subclass_mode_data=False,
        seed_everything_default=0,
        args=argv,
    )
