"""``lensbench fit``: Lightning's own ``fit`` subcommand for ``CausalLMTraining`` and a DataModule.

The run folder ``<output_dir>/<experiment>/`` (default experiment ``fit/<config stem>``) holds
``config.yaml`` and ``run.json`` (written once the data and the model have passed their set-up, so
that a run stopped by bad input claims no folder: the settings that must match to resume, and the
``float32_matmul_precision`` of the run that made the folder, recorded only),
``metrics/version_<n>/metrics.csv`` (Lightning's CSVLogger, one version per run or resumed run),
``memory_usage.csv``, ``logs/rank<r>.log``, ``lightning/last.ckpt`` and the Hugging Face folders
``checkpoint-<step>/``. Running the same config again resumes from
``lightning/last.ckpt`` (optimizer, scheduler, step and data position included); a larger
``trainer.max_steps`` trains further.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from ..errors import LensbenchError

#: Settings that may change between runs on one folder (where to write, how often, how long).
FREE = ("model.experiment", "model.output_dir", "model.save_every", "model.track_memory_every",
        "data.val_batch_size", "data.data_dir")


def _build_fit_cli():
    from ..cli import MATMUL_KEY, _flatten, cli_base_class, default_experiment, is_free

    class LensbenchFitCLI(cli_base_class()):
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
            from lightning.pytorch.callbacks import ModelCheckpoint
            from lightning.pytorch.loggers import CSVLogger

            from .callbacks import HuggingFaceCheckpoints, MemoryUsage, WriteAtFitStart

            run_dir = self.model.run_dir
            self.at_start = WriteAtFitStart()  # config.yaml and run.json, filled in by before_fit
            extra = [self.at_start, HuggingFaceCheckpoints(run_dir, self.model.save_every),
                     ModelCheckpoint(dirpath=run_dir / "lightning", filename="step{step}", save_last=True,
                                     save_top_k=0, every_n_train_steps=self.model.save_every)]
            if self.model.track_memory_every:
                extra.append(MemoryUsage(run_dir, self.model.track_memory_every))
            kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + extra
            cfg = self.config_init[self.subcommand].trainer
            if cfg.get("logger") in (None, True):
                # one metrics/version_<n>/metrics.csv per (resumed) run: a resumed run never overwrites
                self.config_init[self.subcommand].trainer.logger = CSVLogger(str(run_dir), name="metrics")
            return super().instantiate_trainer(**kwargs)

        def before_fit(self) -> None:
            parser = self._subcommand_parsers[self.subcommand]
            cfg = self.config[self.subcommand]
            text = parser.dump(cfg, skip_none=False)
            resolved = yaml.safe_load(text)
            identity = {k: v for k, v in _flatten({"model": resolved.get("model"), "data": resolved.get("data")}).items()
                        if not is_free(k, FREE)}
            run_dir = self.model.run_dir
            ident_path = run_dir / "run.json"
            last = run_dir / "lightning" / "last.ckpt"
            made_with = self.matmul_precision  # the float32 matmul precision: recorded, not matched
            if ident_path.exists():
                stored = json.loads(ident_path.read_text())
                made_with = stored.pop(MATMUL_KEY, None)
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
            self.at_start.files = {run_dir / "config.yaml": text,  # written once set-up has passed
                                   ident_path: json.dumps(record, indent=1, sort_keys=True)}
            if last.exists() and not cfg.get("ckpt_path"):
                console.info(f"resuming from {last}")
                self.config_init[self.subcommand].ckpt_path = str(last)

    return LensbenchFitCLI


def run_fit(argv: list[str] | None) -> Any:
    from ..cli import run_cli
    from ..plugins import active_registries
    from .data import SyntheticTextData
    from .module import CausalLMTraining

    return run_cli(
        _build_fit_cli(),
        CausalLMTraining,
        SyntheticTextData,
        active_registries(),
        "Train a model (a memory model by default): lensbench fit --config X.yaml",
        quiet=(r".*when logging on epoch level in distributed setting.*",),
        subclass_mode_model=False,
        subclass_mode_data=False,
        seed_everything_default=0,
        args=argv,
    )
