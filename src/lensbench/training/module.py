"""The LightningModule of ``lensbench fit``: causal-LM training on the answer tokens.

The loss is the mean cross-entropy over the tokens the answer mask keeps (labels -100 elsewhere),
optimised by AdamW with a linear warm-up and a cosine, linear or constant decay (gradient clipping
and bf16 are the Trainer's ``gradient_clip_val`` and ``precision``). Validation reports the loss and
the exact-match accuracy of the answers per exposure bucket and split: an answer counts as exact
when every one of its tokens is the model's top prediction given the true prefix, which is what
greedy decoding of the answer would produce.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from ..errors import LensbenchError
from ..logs import console
from .build import build_config, build_model, load_tokenizer
from .curves import VAL_N
from .freezing import freeze as freeze_parameters
from .layer_loading import PretrainedLayers, load_pretrained_layers

FIELD = "model"
DECAYS = ("cosine", "linear", "constant")


class CausalLMTraining(pl.LightningModule):
    """Train a causal LM (by default a ``memory_llama``) on masked answers; save Hugging Face folders."""

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        base_model: str | None = None,
        tokenizer: str = "smollm2",
        init_seed: int = 0,
        pretrained_layers: PretrainedLayers | None = None,
        freeze: dict[str, str] | list[str] | str | None = None,
        freeze_strict: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        decay: str = "cosine",
        min_lr_ratio: float = 0.1,
        experiment: str | None = None,
        output_dir: str = "outputs",
        save_every: int = 500,
        track_memory_every: int = 100,
    ) -> None:
        """
        Args:
            config: transformers config fields of the model to train, with ``model_type`` (default
                ``memory_llama``: a Llama whose ``memory_layers`` read a product-key memory; see
                docs/memory.md for its ``memory_*`` fields). ``vocab_size`` defaults to the tokenizer's.
            base_model: A model (alias, folder) whose config.json the ``config`` fields update,
                e.g. ``smollm2`` with ``{model_type: memory_llama, memory_layers: [15]}``.
            tokenizer: The model (alias or folder) whose tokenizer encodes the data, or ``chars``
                (one token per character: small models train much faster on synthetic data).
            init_seed: Seed of the random initialisation.
            pretrained_layers: Weights copied from another checkpoint after initialisation
                (``source``, ``step``, ``layer_mappings`` source->target, ``component_mappings``, ``load_all``).
            freeze: Parameters not trained: ``{pattern: freeze|train}`` in order, a list of
                patterns, or that as JSON. Patterns are exact names, globs (``*.memory.keys``) or
                module prefixes (``model.layers.0.``).
            freeze_strict: A freeze pattern that matches nothing is an error.
            lr: Peak learning rate of AdamW.
            weight_decay: AdamW weight decay (not applied to norms, biases, and memory keys and values:
                a slot no token reads would decay at every step and forget what it stores).
            betas: AdamW betas.
            warmup_steps: Linear warm-up from 0 to ``lr`` over these optimizer steps.
            decay: After warm-up: cosine or linear to ``min_lr_ratio * lr`` at ``trainer.max_steps``, or constant.
            min_lr_ratio: Final learning rate as a share of ``lr``.
            experiment: Run name; the run goes to ``<output_dir>/<experiment>/``. Default:
                ``fit/<config file's stem>``.
            output_dir: Folder holding one sub-folder per run.
            save_every: A Hugging Face folder ``checkpoint-<step>/`` (and the Lightning checkpoint to
                resume from) every this many optimizer steps, and at the end.
            track_memory_every: Log the memory layers' slot usage every this many steps (0: never).
        """
        super().__init__()
        if lr <= 0:
            raise LensbenchError(f"lr={lr} is out of range; use a positive learning rate", f"{FIELD}.lr")
        if warmup_steps < 0:
            raise LensbenchError(f"warmup_steps={warmup_steps} is out of range; use 0 or more", f"{FIELD}.warmup_steps")
        if decay not in DECAYS:
            from ..errors import did_you_mean

            raise LensbenchError(f"unknown decay {decay!r}; {did_you_mean(decay, DECAYS)}", f"{FIELD}.decay")
        if not 0 <= min_lr_ratio <= 1:
            raise LensbenchError(f"min_lr_ratio={min_lr_ratio} is out of range; use 0..1", f"{FIELD}.min_lr_ratio")
        if save_every < 1:
            raise LensbenchError(f"save_every={save_every} is out of range; use 1 or more", f"{FIELD}.save_every")
        if track_memory_every < 0:
            raise LensbenchError(f"track_memory_every={track_memory_every} is out of range; use 0 or more",
                                 f"{FIELD}.track_memory_every")
        self.save_hyperparameters(ignore=["experiment", "output_dir"])
        self.experiment = experiment or "fit"
        self.output_dir = output_dir
        self.save_every = save_every
        self.track_memory_every = track_memory_every
        self.tokenizer = load_tokenizer(tokenizer, f"{FIELD}.tokenizer")
        model_config = build_config(config or {}, base_model, self.tokenizer, FIELD)
        self.model = build_model(model_config, init_seed)
        self.load_report = None
        if pretrained_layers is not None:
            self.load_report = load_pretrained_layers(self.model, pretrained_layers, f"{FIELD}.pretrained_layers")
        self.freeze_report = None
        if freeze is not None:
            self.freeze_report = freeze_parameters(self.model, freeze, strict=freeze_strict, field=f"{FIELD}.freeze")
        if not any(p.requires_grad for p in self.model.parameters()):
            raise LensbenchError("every parameter is frozen; train something (e.g. {\"*.memory.*\": train})", f"{FIELD}.freeze")

    @property
    def run_dir(self) -> Path:
        from ..run_folders import run_folder

        return run_folder(self.output_dir, self.experiment, "model.experiment")

    def setup(self, stage: str) -> None:
        from ..logs import RunLog

        self.run_log = RunLog(self.run_dir, self.global_rank)
        self.run_log.attach()
        if self.global_rank == 0:
            from .parameters import parameter_table

            counts = parameter_table(self.model).iloc[-1]  # the row "all"
            console.info(f"model: {type(self.model).__name__}, {counts.parameters:,} parameters, {counts.active:,} "
                         f"active per token, {counts.trained:,} trained, on {self.device}")
            if self.load_report is not None:
                console.info(self.load_report.summary())
            if self.freeze_report is not None:
                console.info(self.freeze_report.summary())

    def teardown(self, stage: str) -> None:
        log = getattr(self, "run_log", None)
        if log is not None:
            log.detach()

    # -- training ---------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels") if k in batch}
        return self.model(**inputs, use_cache=False)  # no cache: packed rows get their block-diagonal mask

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self(batch).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=int(batch["input_ids"].shape[0]))
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sums: dict[str, torch.Tensor] = {}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self(batch)
        n = int(batch["input_ids"].shape[0])
        self.log("val_loss", out.loss, prog_bar=True, batch_size=n, sync_dist=True)
        exact = exact_answers(out.logits, batch["labels"])
        for group, hit in zip(batch["groups"], exact.tolist()):
            sums = self._val_sums.setdefault(group, torch.zeros(2, device=self.device))
            sums += torch.tensor([float(hit), 1.0], device=self.device)

    def on_validation_epoch_end(self) -> None:
        groups = sorted(self.trainer.datamodule.val_groups)  # every rank knows every group
        sums = torch.stack([self._val_sums.get(g, torch.zeros(2, device=self.device)) for g in groups]) if groups else None
        if sums is None:
            return
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        for g, (hit, total) in zip(groups, sums.tolist()):
            if total:
                self.log(f"val_exact/{g}", hit / total, batch_size=int(total), rank_zero_only=True)
                self.log(f"{VAL_N}{g}", total, batch_size=1, rank_zero_only=True)  # the curves' interval

    def on_train_end(self) -> None:
        """Exact match of the answers of the data's ``test_split`` per group, on rank 0:
        ``<run>/exact_match.csv`` (the memorization curve when the groups are exposure buckets);
        then ``<run>/report.html``, the page of every table and figure of the run."""
        if self.global_rank == 0:
            self.draw_curves()
        dm = self.trainer.datamodule
        rows = dm.test_rows() if dm is not None and hasattr(dm, "test_rows") else []
        if self.global_rank != 0:
            return
        if rows:
            table = exact_match_table(self.model, rows, dm.val_collate, dm.val_batch_size, self.device)
            path = self.run_dir / "exact_match.csv"
            table.to_csv(path, index=False)
            console.info("exact match on %s (%d examples): %s -> %s", dm.test_split, len(rows),
                         ", ".join(f"{r.group} {r.exact_match:.2f}" for r in table.itertuples()), path)
        from ..report import write_report_or_warn
        from .curves import FitRun

        for path in write_report_or_warn(self.run_dir, FitRun):  # after the callbacks' tables (they run first)
            console.info(f"report -> {path}")

    def draw_curves(self) -> None:
        """``<run>/curves.png``: loss and validation exact match against the step, from the metrics
        the loggers wrote (every version: a resumed run's figure covers the whole training)."""
        from .curves import CURVES, plot_runs

        for logger in self.trainer.loggers:
            logger.save()  # the last steps' metrics, still in memory
        try:
            path = plot_runs([self.run_dir], self.run_dir / CURVES)
        except LensbenchError as exc:  # no CSV metrics (another logger, or none)
            console.info(f"no training curves drawn: {exc}")
            return
        console.info(f"training curves -> {path}")

    # -- optimizer --------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or name.endswith((".keys", ".values")) or "norm" in name else decay).append(p)
        groups = [g for g in ({"params": decay, "weight_decay": hp.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        if total is None and hp.decay != "constant":
            total = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(hp.warmup_steps, hp.decay, total, hp.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def lr_lambda(warmup: int, decay: str, total: int | None, floor: float):
    """Learning-rate multiplier per optimizer step: linear warm-up to 1, then ``decay`` to ``floor``
    at step ``total``."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if decay == "constant" or not total or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
        return floor + (1 - floor) * shape

    return factor


def exact_answers(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: True when every trained token (label != -100) is the top prediction from the
    position before it (a row with no trained token counts as False)."""
    pred = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    trained = target != -100
    right = (pred == target) | ~trained
    return right.all(-1) & trained.any(-1)


@torch.no_grad()
def exact_match_table(model: torch.nn.Module, rows: list[dict], collate: Any, batch_size: int, device: Any):
    """One row per group of ``rows`` (the values of ``GROUP_FIELDS`` they carry): ``group``, those
    fields, ``n``, ``exact_match`` (share of answers whose every token is the top prediction) and
    its 95% Wilson interval ``exact_match_ci_low``, ``exact_match_ci_high`` (lensbench.intervals)."""
    import pandas as pd

    from ..intervals import wilson
    from ..synthetic.datasets import GROUP_FIELDS, group_of

    was_training = model.training
    model.eval()
    hits = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk).items() if torch.is_tensor(v)}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).logits
        hits += exact_answers(logits, batch["labels"]).tolist()
    model.train(was_training)
    frame = pd.DataFrame([{"group": group_of(r), **{f: r.get(f) for f in GROUP_FIELDS}, "hit": h}
                          for r, h in zip(rows, hits)])
    fields = [f for f in GROUP_FIELDS if frame[f].notna().any()]
    table = (frame.groupby(["group", *fields], dropna=False, sort=False).hit
             .agg(n="size", exact_match="mean", hits="sum").reset_index())
    table["exact_match_ci_low"], table["exact_match_ci_high"] = wilson(table.pop("hits"), table["n"])
    return table.sort_values(fields or ["group"], kind="stable").reset_index(drop=True)
