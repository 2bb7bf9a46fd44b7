"""perturbation: damage a model's weights at a grid of levels, then generate and score it.

States are (level, repetition) pairs of one perturbation method on one parameter group; each
prompt of each state is one work item keyed ``(state, prompt_group, prompt_id)``, so resume works
at prompt level. Consecutive prompts of one state are generated together in batches of
``max_batch_size``. Before each state only the touched tensors are restored, then perturbed with
a generator seeded ``seed + repeat_index``; each generate call is seeded ``prompt_seed`` of its
first prompt (the record's ``sampling_seed``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..analysis import Analysis
from ..errors import LensbenchError
from ..generation import (
    DEFAULT_PERPLEXITY_TEXT,
    Batching,
    GenerationSettings,
    GenerationStopped,
    PerplexitySettings,
    generate,
    model_positions,
    perplexity_state,
    pooled_perplexity,
    within_context,
)
from ..hookspecs import hookimpl
from ..intervals import error_bars, mean_interval, wilson
from ..models.loading import ModelSpec, takes_images
from ..models.quantized import loaded_in_4bit
from ..models.spec import EMBEDDED
from ..perturbations import PerturbationGrid
from ..state import State
from ..tables import pyplot, read_csv, save_figure, write_csv
from ..work import WorkItem

SUMMARY = "summary.csv"
IMAGES = ("auto", "always", "never")
# A child of Lightning's logger, so that its messages print like Lightning's own, on every rank.
log = logging.getLogger("lightning.pytorch.lensbench")


class PerturbationAnalysis(Analysis):
    """Weight perturbation followed by generation (and optional perplexity), per level and repetition."""

    name = "perturbation"
    comparison_tables = (SUMMARY,)  # several runs on shared axes in a report: a line per run,
    comparison_column = "param_group_name"  # method and parameter group
    padding_side = "left"  # generation
    # More levels or repetitions, and another batch size or memory threshold, extend a run (the
    # DataModule adds prompts).
    extendable = (*Analysis.extendable, "generation.max_batch_size", "generation.memory_grow_below",
                  "generation.memory_warn_above", "generation.memory_stop_above")

    def __init__(
        self,
        model: str | ModelSpec = "smollm2",
        perturbation: PerturbationGrid | None = None,
        generation: GenerationSettings | None = None,
        perplexity: PerplexitySettings | None = None,
        name_suffix: str = "",
        force_run: bool = False,
        experiment: str | None = None,
        output_dir: str = "outputs",
    ) -> None:
        """
        Args:
            model: The model to damage: alias, hub id, folder, .safetensors or .gguf file, or a ModelSpec.
            perturbation: Method, parameter group, levels, repetitions and seed.
            generation: Sampling settings and batch size.
            perplexity: Score a sentence (``text``) or a text file (``file``), not both, on every
                perturbed state; neither: the sentence "The quick brown fox jumps over the lazy dog."
                (null: off).
            name_suffix: Appended to the merged output file's name.
            force_run: Recompute everything: earlier results of this run are moved to
                ``superseded/`` (kept, not deleted) before the run.
            experiment: Name of the run: results go to ``<output_dir>/<experiment>/``. Default:
                ``perturbation/<config file's stem>``.
            output_dir: Folder holding one sub-folder per experiment.
        """
        super().__init__(experiment=experiment, output_dir=output_dir)
        self.spec = self.declare_model(model, "model.init_args.model")
        self.generation = generation or GenerationSettings()
        self.ppl = perplexity
        self.name_suffix = name_suffix
        self.force_run = force_run
        _check_generation(self.generation)
        if self.ppl is not None:
            if self.ppl.text is not None and self.ppl.file is not None:
                raise LensbenchError(f"is given together with model.init_args.perplexity.file ({self.ppl.file!r}); "
                                     "give one, not both: set text to null to score the file, or file to null to "
                                     "score the sentence", "model.init_args.perplexity.text")
            datasets = self.registries.datasets
            if self.ppl.file in datasets:  # a registered text dataset by name
                self.ppl.file = str(datasets.get(self.ppl.file).path)
            if self.ppl.file is not None and not Path(self.ppl.file).is_file():
                raise LensbenchError(f"{self.ppl.file!r} does not exist; give a UTF-8 text file, a registered dataset or null",
                                     "model.init_args.perplexity.file")
            if self.ppl.text is not None and not self.ppl.text.strip():
                raise LensbenchError("is empty; give a sentence, or null for the default sentence "
                                     f"{DEFAULT_PERPLEXITY_TEXT!r}", "model.init_args.perplexity.text")
            if self.ppl.max_length < 2:
                raise LensbenchError("must be at least 2", "model.init_args.perplexity.max_length")
        self._ppl_text = None
        if self.ppl is not None:  # read once, scored on every state
            if self.ppl.file is not None:
                from ..data.textio import read_text

                self._ppl_text = read_text(self.ppl.file, "model.init_args.perplexity.file")
            else:
                self._ppl_text = self.ppl.text if self.ppl.text is not None else DEFAULT_PERPLEXITY_TEXT
        self.declare_grid(perturbation or PerturbationGrid())
        self.items_per_step = self.generation.max_batch_size
        self._state_info: dict[str, dict[str, Any]] = {}
        self._warned_text_only = False
        self._batching: Batching | None = None  # batch sizes kept across the run's generate calls

    def inputs_fingerprint(self) -> dict[str, Any]:
        """The scored perplexity text's hash: an edited file (or dataset) is a changed run."""
        if self._ppl_text is None:
            return {}
        import hashlib

        return {"perplexity_text_sha256": hashlib.sha256(self._ppl_text.encode("utf-8")).hexdigest()[:16]}

    def prepare_run_dir(self) -> None:
        if self.force_run:  # the folder is locked and its config checked: earlier shards move aside
            _supersede(self.run_dir)

    def setup(self, stage: str) -> None:
        if self.generation.images == "always" and not takes_images(self.spec, "model.init_args.model"):
            raise LensbenchError(f"always needs a vision-language model, but {self.spec.label()!r} takes text only; "
                                 f"use such a model or set images to auto or never", "model.init_args.generation.images")
        super().setup(stage)

    def _enter(self, state: State) -> dict[str, Any]:
        """Move the model to ``state``; its touched tensors, finiteness and perplexity (once per state)."""
        loaded = self.subjects.activate(state)
        if state.id not in self._state_info:
            finite = self.subjects.weights_finite()
            info = {"touched_tensors": self.subjects.touched_names(), "weights_finite": finite, "perplexity": None,
                    "perplexity_state": None}
            if self.ppl is not None and finite:
                context = model_positions(loaded.model)
                window = within_context(self.ppl.max_length, context and context[0],
                                        "model.init_args.perplexity.max_length", context,
                                        "perplexity is scored over windows of the context's length")
                ppl_state = perplexity_state(loaded.model, loaded.tokenizer, self._ppl_text, window, self.device)
                info["perplexity_state"] = ppl_state
                info["perplexity"] = pooled_perplexity([ppl_state])
            elif self.ppl is not None:  # non-finite weights: not scored
                info["perplexity"] = math.nan
            self._state_info = {state.id: info}  # one state at a time
        return self._state_info[state.id]

    def process_batch(self, items: list[WorkItem]) -> list[dict[str, Any]]:
        state = items[0].state
        info = self._enter(state)
        labels = dict(state.labels)
        loaded = self.subjects.loaded
        shown = [self._picture(it.payload) for it in items]
        if info["weights_finite"]:
            seeds = [prompt_seed(labels["seed"], it.payload.group, it.payload.prompt_id) for it in items]
            if self._batching is None:
                self._batching = Batching(self.generation, self.device)
            try:
                results = generate(loaded.model, loaded.tokenizer, [it.payload.text for it in items],
                                   self.generation, seeds, self.device, images=shown, processor=loaded.processor,
                                   batching=self._batching, key=state.id)
            except GenerationStopped as stop:  # near the end of GPU memory: store what was generated, then stop
                done = items[: len(stop.results)]
                for item, record in zip(done, self._records(done, stop.results, shown, info, labels)):
                    digest = {"digest": item.digest} if item.digest is not None else {}
                    self.store.write(item.key_str, {"state": item.state.id, **digest, **record})
                raise
        else:
            results = [None] * len(items)
        return self._records(items, results, shown, info, labels)

    def _records(self, items: list[WorkItem], results: list, shown: list, info: dict[str, Any],
                 labels: dict[str, Any]) -> list[dict[str, Any]]:
        loaded = self.subjects.loaded
        stamp = utc_timestamp()
        records = []
        for item, result, picture in zip(items, results, shown):
            prompt = item.payload
            records.append({
                "timestamp": stamp,
                "model_name": self.spec.source,
                "model_label": self.spec.label(),
                "degradation_method": labels["degradation_method"],
                "level_value": labels["level_value"],
                "std_dev": labels["level_value"],  # every method: the seed's name for the level (its resume key)
                "is_baseline": labels["is_baseline"],
                "param_group_name": labels["param_group_name"],
                "touched_tensors": info["touched_tensors"],
                "n_touched_tensors": len(info["touched_tensors"]),
                "weights_finite": info["weights_finite"],
                "repeat_index": labels["repeat_index"],
                "seed": labels["seed"],
                "sampling_seed": result.seed if result else None,
                "prompt_group": prompt.group,
                "prompt_id": prompt.prompt_id,
                "category": prompt.category,
                "expected_answer": prompt.answer,
                "prompt_text": prompt.text,
                "image": Path(prompt.image).name if prompt.image else None,
                "image_used": picture is not None and result is not None,
                "output": result.output if result else None,
                "duration": result.duration if result else 0.0,
                "tokens": result.tokens if result else 0,
                "batch_size_effective": result.batch_size if result else 0,
                "temperature": self.generation.temperature,
                "do_sample": self.generation.do_sample,
                "top_p": self.generation.top_p,
                "max_new_tokens": (result.max_new_tokens if result and result.max_new_tokens is not None
                                   else self.generation.max_new_tokens),  # less where the model's context ends
                "perplexity": info["perplexity"],
                "perplexity_state": info["perplexity_state"],
                "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
                "device": str(self.device),
                "load_4bit": loaded_in_4bit(loaded.model),
                "name_suffix": self.name_suffix,
            })
        return records

    def _picture(self, prompt):
        """The PIL picture shown with ``prompt``, or None (no picture, or not shown: see ``images``)."""
        if prompt.image is None or self.generation.images == "never":
            return None
        if self.subjects.loaded.processor is None:  # images: auto (always was checked in setup)
            if not self._warned_text_only:
                log.warning(f"lensbench: model {self.spec.label()!r} takes text only: prompts with a picture are "
                            f"given their text alone (image_used: false)")
                self._warned_text_only = True
            return None
        from ..data.images import load_image

        return load_image(prompt.image, "data.init_args.prompts")

    def process(self, item: WorkItem) -> dict[str, Any]:
        return self.process_batch([item])[0]

    @classmethod
    def merge(cls, records: list[dict[str, Any]], run_dir: Path) -> list[Path]:
        import pandas as pd

        run_dir = Path(run_dir)
        records = sorted(records, key=lambda r: (r["level_value"], r["repeat_index"], r["prompt_group"], r["prompt_id"]))
        first = records[0]
        clean = model_name_clean(first["model_name"], first["model_label"])
        suffix = f"_{first['name_suffix']}" if first["name_suffix"] else ""
        merged = run_dir / f"outputs_{first['degradation_method']}_{clean}{suffix}.json"
        # the store's bookkeeping (work key, state id, unit digest) stays in the shards
        fields = [k for k in first if k not in ("key", "state", "digest")]
        _atomic_text(merged, json.dumps([{k: r.get(k) for k in fields} for r in records], indent=1,
                                        ensure_ascii=False, allow_nan=True))
        table = pd.DataFrame(records)
        table["output_chars"] = table["output"].fillna("").str.len()
        table["answer_match"] = [answer_match(o, a) for o, a in zip(table["output"], table["expected_answer"])]
        rows = []
        keys = ["degradation_method", "param_group_name", "level_value"]
        for (method, group, level), g in table.groupby(keys, sort=True):
            ppl = g.groupby("repeat_index")["perplexity"].first().astype(float)
            # one Perplexity state per repetition (null where not scored), pooled with merge_state
            # (a state whose likelihood is NaN is left out, as perplexity_mean leaves out its NaN)
            states = [s for s in g.groupby("repeat_index")["perplexity_state"].first()
                      if isinstance(s, dict) and not math.isnan(float(s["total"]))] if "perplexity_state" in g else []
            scored = g["answer_match"].dropna().astype(bool)
            tokens_ci = mean_interval(g["tokens"])
            match_ci = wilson(int(scored.sum()), len(scored))
            rows.append({
                "degradation_method": method, "param_group_name": group, "level_value": level,
                "is_baseline": bool(g["is_baseline"].iloc[0]), "n_outputs": len(g),
                "n_repeats": g["repeat_index"].nunique(),
                "mean_tokens": g["tokens"].mean(), "std_tokens": g["tokens"].std(ddof=0),
                "mean_tokens_ci_low": tokens_ci[0], "mean_tokens_ci_high": tokens_ci[1],
                "n_scored": len(scored), "answer_match": scored.mean() if len(scored) else math.nan,
                "answer_match_ci_low": match_ci[0], "answer_match_ci_high": match_ci[1],
                "mean_output_chars": g["output_chars"].mean(),
                "perplexity_mean": ppl.mean() if ppl.notna().any() else math.nan,
                "perplexity_std": ppl.std(ddof=0) if ppl.notna().any() else math.nan,
                "perplexity_pooled": pooled_perplexity(states),
                "n_nonfinite_states": int((~g.groupby("repeat_index")["weights_finite"].first()).sum()),
                "mean_duration": g["duration"].mean(),
            })
        return [merged, write_csv(pd.DataFrame(rows), run_dir / SUMMARY)]

    @classmethod
    def plot(cls, run_dir: Path) -> list[Path]:
        plt = pyplot()
        summary = read_csv(run_dir, SUMMARY)
        outputs = []
        for column, err, ylabel, name in (("perplexity_mean", "perplexity_std", "perplexity", "perplexity_vs_level.png"),
                                          ("mean_tokens", "std_tokens", "output length (tokens)", "output_length_vs_level.png")):
            if summary[column].isna().all():
                continue
            fig, ax = plt.subplots(figsize=(6.5, 4.2))
            for (method, group), g in summary.groupby(["degradation_method", "param_group_name"], sort=True):
                ax.errorbar(g["level_value"], g[column], yerr=g[err], marker="o", capsize=3, label=f"{method} / {group}")
            if column.startswith("perplexity"):
                ax.set_yscale("log")
            ax.set_xlabel("level")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            out = Path(run_dir) / name
            save_figure(fig, out, dpi=120)
            plt.close(fig)
            outputs.append(out)
        if "answer_match" in summary and summary["answer_match"].notna().any():
            fig, ax = plt.subplots(figsize=(6.5, 4.2))
            for (method, group), g in summary.groupby(["degradation_method", "param_group_name"], sort=True):
                ax.errorbar(g["level_value"], g["answer_match"], yerr=error_bars(g, "answer_match"), marker="o",
                            capsize=3, label=f"{method} / {group}")
            ax.set_xlabel("level")
            ax.set_ylabel("answer match (95% Wilson interval)")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            out = Path(run_dir) / "answer_match_vs_level.png"
            save_figure(fig, out, dpi=120)
            plt.close(fig)
            outputs.append(out)
        return outputs


def answer_match(output: str | None, expected: str | None) -> bool | None:
    """Whether a generated ``output`` gives the prompt's ``expected`` answer: the answer appears in
    it as a whole word or number (case-insensitive, not inside a longer word or number: "96" is
    found in "The answer is 96." but not in "196"). None when there is nothing to score (no
    expected answer, or no output: non-finite weights)."""
    import re

    if isinstance(expected, int) and not isinstance(expected, bool):  # a JSONL answer given as a number
        expected = str(expected)
    if not isinstance(output, str) or not isinstance(expected, str) or not expected.strip():
        return None  # also a table's NaN
    pattern = r"(?<!\w)" + re.escape(expected.strip()) + r"(?!\w)"
    return re.search(pattern, output, flags=re.IGNORECASE) is not None


def utc_timestamp(now: dt.datetime | None = None) -> str:
    """UTC time in the seed's form, ``2025-10-06T12:34:56.789Z`` (milliseconds, ``Z``)."""
    now = (now or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def prompt_seed(seed: int, group: str, prompt_id: int) -> int:
    """The sampling seed of one prompt in one repetition: stable across runs, ranks and resumes."""
    import zlib

    return (seed * 1_000_003 + zlib.crc32(f"{group}/{prompt_id}".encode())) % (2**63)


def model_name_clean(model_name: str, label: str) -> str:
    """``google/gemma-3-4b-it`` -> ``gemma-3-4b-it``; aliases stay; paths give their stem."""
    if model_name in EMBEDDED:
        return model_name
    name = Path(model_name.rstrip("/")).name
    return Path(name).stem if name.endswith((".gguf", ".safetensors")) else (name or label)


def _check_generation(g: GenerationSettings) -> None:
    f = "model.init_args.generation"
    if g.max_new_tokens < 1:
        raise LensbenchError(f"must be at least 1, got {g.max_new_tokens}", f"{f}.max_new_tokens")
    if g.max_batch_size < 1:
        raise LensbenchError(f"must be at least 1, got {g.max_batch_size}", f"{f}.max_batch_size")
    if not (g.temperature > 0 and math.isfinite(g.temperature)):
        raise LensbenchError(f"must be a positive number, got {g.temperature}", f"{f}.temperature")
    if g.images not in IMAGES:
        raise LensbenchError(f"unknown value {g.images!r}; use one of {', '.join(IMAGES)}", f"{f}.images")
    if not 0 < g.top_p <= 1:
        raise LensbenchError(f"must be in (0, 1], got {g.top_p}", f"{f}.top_p")
    for name in ("memory_grow_below", "memory_warn_above", "memory_stop_above"):
        value = getattr(g, name)
        if not 0 <= value <= 1:
            raise LensbenchError(f"is a fraction of the GPU's memory, in [0, 1]; got {value}", f"{f}.{name}")


def _supersede(run_dir: Path) -> None:
    shards = Path(run_dir) / "shards"
    if shards.exists() and any(shards.iterdir()):
        dest = Path(run_dir) / "superseded" / time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(shards), str(dest))


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@hookimpl
def lensbench_register_analyses() -> list[type]:
    return [PerturbationAnalysis]
