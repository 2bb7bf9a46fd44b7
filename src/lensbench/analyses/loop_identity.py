"""loop_identity: does a looped block range degenerate into the identity?

For a baseline model and trained checkpoints, the hidden state ``h_in`` entering block ``start``
is passed k times through blocks ``start..end`` (inclusive); ``h_out(k)`` is what leaves block
``end`` after the k-th pass (``h_out(0) = h_in``). Per non-padding token:

- ``cosine``: cos(h_in, h_out(k)); ``mse``: mean over hidden dims of (h_out(k) - h_in)^2;
  ``norm_diff``: ||h_out(k)|| - ||h_in||;
- ``step_cosine``: cos(h_out(k), h_out(k-1)) and ``step_rel_change``:
  ||h_out(k) - h_out(k-1)|| / ||h_out(k-1)||, for every k >= 1 relative to the pass just before
  (k-1, computed anyway, whether or not it is in ``loop_counts``);

each reduced over tokens to count, mean and M2 per work item (float64) and combined exactly with
Chan et al.'s pairwise update, and to a log-bucketed histogram (``lensbench.stats.value_sketch``)
whose counts add up exactly, for medians within 0.1%. ``skip_first_position`` leaves each text's
first token out of these metrics (its hidden state carries outlier activations). Tokens with a
non-finite value (NaN or inf) are counted (``n_nonfinite_tokens``) and named in one console warning. ``perplexity``: the model runs its remaining blocks on ``h_out(k)``,
then its final norm and LM head; next-token negative log-likelihoods of the non-padding tokens are
kept as torchmetrics Perplexity states per work item and pooled on rank 0.

All loop counts of one batch cost one forward pass (capturing every block's arguments), one pass
of the block range per extra loop and one tail pass per loop count (``lensbench.models.replay``);
``step_group`` keeps a batch's loop counts on one rank and in one step, so the forward is done once
per batch, also on resume and under DDP.

A work item is one (model state, dataset, batch, loop count); the loop counts of one batch are
computed together (``items_per_step``), so a run extends with more loop counts or checkpoints.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..analysis import Analysis
from ..errors import LensbenchError
from ..hookspecs import hookimpl
from ..models.loading import ModelSpec, resolve_source
from ..perturbations import LINE_COLUMNS, PerturbationGrid
from ..state import State
from ..stats import (
    chan_merge,
    merge_sketches,
    nonfinite_warning,
    place,
    sketch_quantile,
    value_sketch,
)
from ..tables import finite, pyplot, read_csv, save_figure, value_scale, write_csv
from ..work import WorkItem, content_digest

TABLE = "loop_metrics.csv"
METRICS = ("cosine", "mse", "norm_diff", "step_cosine", "step_rel_change")
STEP_METRICS = ("step_cosine", "step_rel_change")
DEFAULT_LOOP_COUNTS = (0, 1, 2, 4, 8, 16)
PERPLEXITY_CHUNK = 128  # positions per torchmetrics update (bounds the float64 copy of the logits)
FIGURES = {"cosine_mean": ("cosine_similarity_vs_loop_count.png", "mean cos(h_in, h_out)"),
           "mse_mean": ("mse_vs_loop_count.png", "mean MSE(h_in, h_out)"),
           "norm_diff_mean": ("norm_diff_vs_loop_count.png", "mean ||h_out|| - ||h_in||")}


@dataclass(frozen=True)
class LoopBatch:
    """The payload of one work item: a batch of texts and the loop count to measure on it."""

    batch: Any  # lensbench.data.modules.TextBatch
    loop_count: int


def trailing_step(label: str) -> int | None:
    """The training step in a checkpoint's name: its trailing number (``checkpoint-100`` -> 100)."""
    match = re.search(r"(\d+)$", label)
    return int(match.group(1)) if match else None


def expand_checkpoints(checkpoints: list | str | None, field: str) -> list[tuple[str | ModelSpec, str]]:
    """Each checkpoint entry with the config field to blame for it. A string is a folder pattern
    (braces ``{100,200}``, ranges ``{1-3}``, or glob characters), expanded in order."""
    if checkpoints is None:
        return []
    if isinstance(checkpoints, (list, tuple)):
        return [(entry, f"{field}[{i}]") for i, entry in enumerate(checkpoints)]
    import glob

    from ..models.anatomy import expand_braces

    pattern = str(checkpoints)
    out: list[tuple[str | ModelSpec, str]] = []
    for path in expand_braces(pattern):
        if any(c in path for c in "*?["):
            hits = sorted(glob.glob(str(Path(path).expanduser())),
                          key=lambda p: (trailing_step(p) is None, trailing_step(p) or 0, p))
            if not hits:
                raise LensbenchError(f"pattern {pattern!r}: {path!r} matches no folder", field)
            out += [(hit, field) for hit in hits]
        else:
            if not Path(path).expanduser().exists():
                raise LensbenchError(f"pattern {pattern!r} names {path!r}, which does not exist; fix the pattern "
                                     "or give a list of folders", field)
            out.append((path, field))
    if not out:
        raise LensbenchError(f"pattern {pattern!r} names no folder", field)
    return out


#: The field of ``checkpoints`` given as one folder pattern: the field of every folder it names.
PATTERN_FIELD = "model.init_args.checkpoints"


def pattern_error(exc: LensbenchError, folder: Any, where: str) -> LensbenchError:
    """``exc`` about a checkpoint folder that a pattern named, blamed on the pattern: the user wrote
    ``checkpoints: <pattern>``, not a ``source`` (``checkpoints.source`` is no field), so the error
    names ``model.init_args.checkpoints`` and the folder. Other errors are returned as they are."""
    if where != PATTERN_FIELD or not (exc.field or "").startswith(f"{where}."):
        return exc
    message = exc.message if str(folder) in exc.message else f"folder {str(folder)!r} of the pattern: {exc.message}"
    return LensbenchError(message, where)


# Model types of encoders: refused even when their config names an LM head class (BertLMHeadModel).
ENCODER_TYPES = frozenset({"bert", "roberta", "distilbert", "mpnet", "xlm-roberta", "albert", "electra",
                           "deberta", "deberta-v2", "camembert", "modernbert", "xlm", "flaubert"})
HEADS = ("auto", "causal_lm")
RESERVED_LABELS = (Path(TABLE).stem.removesuffix("_metrics"),)  # "loop": its per-model file is the merged table


def check_spec(spec: ModelSpec, field: str) -> None:
    """Refuse, before any work, settings of a model entry that loop_identity cannot honour."""
    if spec.transforms:
        raise LensbenchError("loop_identity loops blocks start..end itself and measures the models as they are; "
                             "remove the transforms (loop_layers or any other)", f"{field}.transforms")
    if spec.head not in HEADS:
        raise LensbenchError(f"head {spec.head!r}: loop_identity scores perplexity with the LM head, so a model loads "
                             f"as a causal LM; use one of {', '.join(HEADS)}", f"{field}.head")


def model_shape(spec: ModelSpec, field: str) -> tuple[int, int]:
    """(layers, hidden size) of a model, read from its config without loading weights. Refuses an
    encoder (or any config with no causal LM head) and logits scaled in a way the replay cannot
    reproduce."""
    from transformers import AutoConfig

    from ..models.embedded import embedded_smollm2_folder
    from ..models.loading import _common_kwargs, _head
    from ..models.unembed import unsupported_logit_scaling

    res = resolve_source(spec, field)
    try:
        if res.kind == "embedded":
            if res.location != "smollm2":
                raise LensbenchError(f"embedded model {res.location!r} is an encoder; loop_identity needs a decoder "
                                     "with an LM head (e.g. smollm2)", f"{field}.source")
            config = AutoConfig.from_pretrained(embedded_smollm2_folder())
        else:
            config = AutoConfig.from_pretrained(res.location, **_common_kwargs(res, spec))
    except Exception as exc:  # noqa: BLE001 - a config transformers rejects is the user's to fix
        from ..models.integrity import config_refusal

        refused = config_refusal(exc, res.location, field)
        if refused is not None:
            raise refused from None
        if not isinstance(exc, (OSError, ValueError)):
            raise
        raise LensbenchError(f"cannot read the config of {spec.source!r} ({str(exc).splitlines()[0][:120]})",
                             f"{field}.source") from exc
    model_type = getattr(config, "model_type", None)
    if model_type in ENCODER_TYPES or _head(config, "auto", res.gguf_file is not None) != "causal_lm":
        archs = ", ".join(getattr(config, "architectures", None) or []) or "none"
        raise LensbenchError(f"{spec.source!r} is not a decoder with an LM head ({type(config).__name__}, model_type "
                             f"{model_type!r}, architectures: {archs}); loop_identity needs a causal LM "
                             "(*ForCausalLM / *LMHeadModel)", f"{field}.source")
    text = config.get_text_config(decoder=True)
    refused = unsupported_logit_scaling(text, "loop_identity", "its perplexity")
    if refused:
        raise LensbenchError(refused, f"{field}.source")
    layers = getattr(text, "num_hidden_layers", None)
    hidden = getattr(text, "hidden_size", None)
    if not layers or not hidden:
        raise LensbenchError(f"the config of {spec.source!r} ({type(config).__name__}) names no num_hidden_layers "
                             "and hidden_size", f"{field}.source")
    return int(layers), int(hidden)


def _check_label(label: str, spec: ModelSpec, field: str) -> None:
    if label in RESERVED_LABELS:
        raise LensbenchError(f"model label {label!r} is reserved: its per-model table would overwrite {TABLE}; "
                             "give the model another `name`", f"{field}.name" if spec.name else field)


class LoopIdentity(Analysis):
    """Loop blocks start..end of a baseline and trained checkpoints k times; compare h_out(k) with h_in."""

    name = "loop_identity"
    comparison_tables = (TABLE,)  # several runs on shared axes in a report
    # More loop counts or checkpoints (or perturbation levels) add work items; the rest must match.
    extendable = ("loop_counts", "checkpoints", *Analysis.extendable)

    def __init__(
        self,
        baseline: str | ModelSpec = "smollm2",
        checkpoints: list[str | ModelSpec] | str | None = None,
        start: int = 6,
        end: int = 8,
        loop_counts: list[int] | None = None,
        perturbation: PerturbationGrid | None = None,
        max_length: int = 512,
        perplexity: bool = True,
        skip_first_position: bool = False,
        experiment: str | None = None,
        output_dir: str = "outputs",
    ) -> None:
        """
        Args:
            baseline: The untrained model (an embedded alias, hub id, folder, file, or ModelSpec);
                labelled ``baseline`` unless it has a ``name``.
            checkpoints: Trained checkpoints of the same shape: a list of folders/specs, or one
                folder pattern with braces (``ckpts/checkpoint-{100,200,300}``). Each is labelled by
                its folder name; its step is the name's trailing number.
            start: First block of the looped range (0-based): h_in is the hidden state entering it.
            end: Last block of the range (inclusive): h_out leaves it. May be the last block (h_out
                is then the block's output before the final norm).
            loop_counts: Passes through the block range to measure (0 = skip the block: h_out = h_in).
                Default: [0, 1, 2, 4, 8, 16].
            perturbation: Measure every model at a grid of perturbed states instead of as it is.
            max_length: Texts are truncated to this many tokens.
            perplexity: Score the text after k passes (one pass of the remaining blocks and the LM
                head per loop count); false: the hidden-state metrics only, at about the cost of
                one forward of the deepest loop count.
            skip_first_position: Leave each text's first token (BOS, where there is one) out of
                the hidden-state metrics: its state carries outlier activations that dominate the
                means. Perplexity is unchanged. Default false: every token, as the seed.
            experiment: Name of the run: results go to ``<output_dir>/<experiment>/``.
            output_dir: Folder holding one sub-folder per experiment.
        """
        super().__init__(experiment=experiment, output_dir=output_dir)
        self.score_perplexity = bool(perplexity)
        self.skip_first_position = bool(skip_first_position)

        if max_length < 2:
            raise LensbenchError(f"must be at least 2, got {max_length}", "model.init_args.max_length")
        counts = list(DEFAULT_LOOP_COUNTS) if loop_counts is None else list(loop_counts)
        if not counts:
            raise LensbenchError("is empty; give at least one loop count, e.g. [0, 1, 2, 4, 8]", "model.init_args.loop_counts")
        for i, k in enumerate(counts):
            if isinstance(k, bool) or int(k) != k or k < 0:
                raise LensbenchError(f"loop counts are numbers of passes, integers >= 0; got {k}",
                                     f"model.init_args.loop_counts[{i}]")
        self.loop_counts = sorted({int(k) for k in counts})
        if start < 0:
            raise LensbenchError(f"must be a block index >= 0, got {start}", "model.init_args.start")
        if end < 0:
            raise LensbenchError(f"must be a block index >= 0, got {end}", "model.init_args.end")
        if start > end:
            raise LensbenchError(f"start {start} is after end {end}; the looped range is blocks start..end "
                                 "(inclusive), so start <= end", "model.init_args.start")
        self.start, self.end = int(start), int(end)

        field = "model.init_args.baseline"
        base = ModelSpec(baseline) if isinstance(baseline, str) else baseline
        if base.name is None:
            base = ModelSpec(**{**base.__dict__, "name": "baseline"})
        check_spec(base, field)
        self.baseline_label = base.label()
        _check_label(self.baseline_label, base, field)
        self.declare_model(base, field)
        layers, hidden = model_shape(base, field)
        if self.end >= layers:
            raise LensbenchError(f"block {self.end} is outside the baseline's blocks 0..{layers - 1}",
                                 "model.init_args.end")
        self.shape = (layers, hidden)
        self._patterned: dict[str, str] = {}  # label -> folder, for checkpoints a pattern named
        for entry, where in expand_checkpoints(checkpoints, "model.init_args.checkpoints"):
            # A folder (from a pattern or a list) loads with the baseline's dtype and attention
            # implementation; a ModelSpec mapping keeps its own settings.
            spec = (ModelSpec(entry, dtype=base.dtype, attn_implementation=base.attn_implementation)
                    if isinstance(entry, str) else entry)
            try:
                check_spec(spec, where)
                _check_label(spec.label(), spec, where)
                label = self.declare_model(spec, where).label()
                shape = model_shape(spec, where)
            except LensbenchError as exc:
                raise pattern_error(exc, entry, where) from None
            if shape != self.shape:
                raise LensbenchError(f"checkpoint {label!r} has {shape[0]} layers and hidden size {shape[1]}, the baseline "
                                     f"{layers} and {hidden}; loop_identity compares checkpoints of the baseline's shape",
                                     where)
            if where == PATTERN_FIELD:
                self._patterned[label] = str(entry)
        self.max_length = max_length
        self.declare_grid(perturbation)
        # The loop counts of one batch are computed together (one forward, then pass after pass);
        # ``step_group`` keeps them on one rank and in one step.
        self.items_per_step = len(self.loop_counts)
        self._weights: dict[str, str] = {}

    # -- the plan: one work item per (state, dataset, batch, loop count) ----------------------------
    @property
    def plan(self) -> list[WorkItem] | None:
        return self._plan

    @plan.setter
    def plan(self, items: list[WorkItem] | None) -> None:
        """The base class plans (state, unit) items; each becomes one item per loop count, in
        (state, unit, loop count) order. A checkpoint's weight fingerprint and settings join each
        item's digest: checkpoints are extendable, so they are not in the run's identity, and a
        stored record of a checkpoint whose weights changed is refused by its digest."""
        if items is None:
            self._plan = None
            return
        expanded = []
        for item in items:
            digest = content_digest(item.digest, self._weights_of(item.state.checkpoint))
            for k in self.loop_counts:
                expanded.append(WorkItem((*item.key, k), item.state, LoopBatch(item.payload, k), digest))
        self._plan = expanded

    def _weights_of(self, label: str) -> str | None:
        if label == self.baseline_label:
            return None  # in the run's identity (fingerprint)
        if label not in self._weights:
            from ..models.fingerprint import model_fingerprint, weight_settings

            spec = self.specs[label]
            # Not the source: the fingerprint covers the weights' content, wherever the folder is
            # and however its path is written (./ckpts/x, ckpts/x, /abs/ckpts/x); not the placement.
            settings = weight_settings(spec)
            try:
                fingerprint = model_fingerprint(spec, self.fields[label])
            except LensbenchError as exc:
                raise pattern_error(exc, self._patterned.get(label, spec.source), self.fields[label]) from None
            self._weights[label] = content_digest(fingerprint, repr(settings))
        return self._weights[label]

    def step_group(self, item: WorkItem) -> tuple:
        """The loop counts of one batch share one capture: the core keeps them on one rank and in
        one step (rank slices and steps are cut only where this value changes)."""
        return item.key[:-1]

    def prepare_run_dir(self) -> None:
        """Refuse, before any work, a run folder holding records of a checkpoint (same label) whose
        weights or settings have changed since (checkpoints are extendable, so not in run.json)."""
        from ..results import ResultStore

        stored: dict[str, str] = {}
        for rec in ResultStore(self.run_dir).records():
            if rec.get("weights") is not None:
                stored.setdefault(rec["model"], rec["weights"])
        for label, weights in stored.items():
            if label in self.specs and label != self.baseline_label and self._weights_of(label) != weights:
                raise LensbenchError(f"{self.run_dir} holds results of checkpoint {label!r} computed with other weights "
                                     "or settings; restore them, or set another experiment name", self.fields[label])

    def identity_models(self) -> list[str]:
        """The baseline only: checkpoints are extendable, so each one's fingerprint joins the digests
        of its items instead (``plan``)."""
        return [self.baseline_label]

    # -- the work ---------------------------------------------------------------------------------
    def process(self, item: WorkItem) -> dict[str, Any]:
        return self.process_batch([item])[0]

    def process_batch(self, items: list[WorkItem]) -> list[dict[str, Any]]:
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(tuple(item.key[:-1]), []).append(i)
        records: list[dict[str, Any] | None] = [None] * len(items)
        for indices in groups.values():
            batch_items = [items[i] for i in indices]
            by_k = self._measure(batch_items[0].state, batch_items[0].payload.batch,
                                 sorted({it.payload.loop_count for it in batch_items}))
            for i, it in zip(indices, batch_items):
                records[i] = self._record(it, by_k[it.payload.loop_count])
        return records

    def _record(self, item: WorkItem, measured: dict[str, Any]) -> dict[str, Any]:
        label = item.state.checkpoint
        return {"model": label, "role": "baseline" if label == self.baseline_label else "checkpoint",
                "step": None if label == self.baseline_label else trailing_step(label),
                "weights": self._weights_of(label),
                "dataset": item.payload.batch.dataset, "labels": dict(item.state.labels),
                "loop_count": item.payload.loop_count, **measured}

    def _measure(self, state: State, batch, counts: list[int]) -> dict[int, dict[str, Any]]:
        """Every loop count of ``counts`` on one batch: one captured forward, then pass after pass."""
        from ..models.replay import BlockReplay

        try:
            loaded = self.subjects.activate(state)
        except LensbenchError as exc:
            label = state.checkpoint
            raise pattern_error(exc, self._patterned.get(label), self.fields.get(label, "")) from None
        replay = BlockReplay(loaded.model, loaded.anatomy, self.start, self.end)
        enc = loaded.tokenizer(list(batch.texts), return_tensors="pt", padding=True, truncation=True,
                               max_length=self.max_length).to(self.device)
        mask = enc["attention_mask"].bool()  # [B, T]
        measured = first_position_dropped(mask) if self.skip_first_position else mask  # the metrics' tokens
        out: dict[int, dict[str, Any]] = {}
        with torch.inference_mode():
            cap = replay.capture(dict(enc))
            h_in = cap.h_in
            tokens_in = h_in[measured].double()  # [N, D]
            prev = h = h_in
            for k in range(0, counts[-1] + 1):
                if k == 1:
                    h = cap.h_out
                elif k > 1:
                    h = replay.loop(cap, h)
                if k in counts:
                    ppl = None
                    if self.score_perplexity:
                        ppl = perplexity_state(replay.logits_after(cap, None if k == 1 else h), enc["input_ids"], mask)
                    out[k] = {**token_stats(tokens_in, h[measured].double(), prev[measured].double() if k else None),
                              "perplexity": ppl}
                prev = h
        return out

    # -- tables and figures -----------------------------------------------------------------------
    @classmethod
    def merge(cls, records: list[dict[str, Any]], run_dir: Path) -> list[Path]:
        import pandas as pd

        from ..generation import pooled_perplexity

        groups: dict[tuple, dict[str, Any]] = {}
        for rec in records:  # ordered by key: the same order whatever the number of ranks
            labels = tuple((rec.get("labels") or {}).items())
            key = (rec["model"], rec["dataset"], labels, rec["loop_count"])
            acc = groups.setdefault(key, {"rec": rec, "n": 0, "stats": {}, "ppl": [], "nonfinite": 0, "sketches": {}})
            n_a, n_b = acc["n"], rec["n_tokens"]
            n = n_a + n_b
            acc["nonfinite"] += rec.get("n_nonfinite_tokens", 0)  # records written before the count: 0
            sketches = rec.get("sketches")  # records written before the medians: none
            for name, (mean_b, m2_b) in rec["stats"].items():
                if n_b:  # a batch without measured tokens (one-token texts, skip_first_position) adds nothing
                    theirs = sketches.get(name) if sketches else None
                    acc["sketches"][name] = theirs if name not in acc["sketches"] else merge_sketches(
                        acc["sketches"][name], theirs)
                if name not in acc["stats"] or n_a == 0:
                    acc["stats"][name] = [mean_b, m2_b]
                    continue
                if n_b == 0:
                    continue
                cur = acc["stats"][name]
                cur[0], cur[1] = chan_merge(n_a, cur[0], cur[1], n_b, mean_b, m2_b)
            acc["n"] = n
            if rec["perplexity"] is not None:  # null: run with perplexity: false
                acc["ppl"].append(rec["perplexity"])
        rows, label_names = [], []
        bad: dict[str, int] = {}  # "model / dataset [state] k=.." -> tokens with a non-finite metric
        bad_ppl: dict[str, int] = {}  # the same places -> 1 where the perplexity scored is not finite
        for (model, dataset, labels, k), acc in groups.items():
            label_names += [name for name, _ in labels if name not in label_names]
            rec = acc["rec"]
            row: dict[str, Any] = {"model": model, "role": rec["role"], "step": rec["step"], "dataset": dataset,
                                   **dict(labels), "loop_count": k, "n_tokens": acc["n"],
                                   "n_nonfinite_tokens": acc["nonfinite"]}
            bad[f"{place(model, dataset, labels)} k={k}"] = acc["nonfinite"]
            for name in METRICS:
                mean, m2 = acc["stats"].get(name, (math.nan, math.nan))
                row[f"{name}_mean"] = mean
                row[f"{name}_std"] = math.sqrt(max(m2, 0.0) / acc["n"]) if acc["n"] else math.nan
                # a median over the finite values only would hide the others: NaN, as the mean
                row[f"{name}_median"] = (sketch_quantile(acc["sketches"].get(name), 0.5) if not acc["nonfinite"]
                                         else math.nan)
            row["perplexity"] = pooled_perplexity(acc["ppl"])
            row["perplexity_tokens"] = int(sum(p["count"] for p in acc["ppl"]))
            scored = bool(acc["ppl"])  # not with perplexity: false
            bad_ppl[f"{place(model, dataset, labels)} k={k}"] = int(scored and not math.isfinite(row["perplexity"]))
            rows.append(row)
        table = pd.DataFrame(rows)
        table["step"] = table["step"].astype("Int64")  # empty for the baseline
        table["_order"] = table["role"].ne("baseline")
        table = table.sort_values(["_order", "step", "model", "dataset", *label_names, "loop_count"],
                                  kind="stable", na_position="first").drop(columns="_order")
        outputs = [write_csv(table, Path(run_dir) / TABLE)]
        for model, part in table.groupby("model", sort=False):
            outputs.append(write_csv(part, Path(run_dir) / f"{model}_metrics.csv"))
        nonfinite_warning("loop_identity", bad, "tokens", "n_nonfinite_tokens", TABLE)
        nonfinite_warning("loop_identity", bad_ppl, "perplexities", None, TABLE)
        return outputs

    @classmethod
    def plot(cls, run_dir: Path) -> list[Path]:
        plt = pyplot()
        start, end = _block_range(run_dir)
        span = f"blocks {start}..{end}" if start is not None else "the looped block"
        return [_save(fig, plt, Path(run_dir) / file)
                for file, fig in figures(read_csv(run_dir, TABLE), span).items()]


#: Markers of the baseline's lines, one per state, and of the checkpoints' lines, one per round
#: of the colour cycle: no two lines of a figure look alike.
BASELINE_MARKERS = ("s", "D", "^", "v", "P", "X", "<", ">")
CHECKPOINT_MARKERS = ("o", "^", "v", "<", ">", "p", "h", "*")


def line_styles(table) -> list[tuple[str, Any, dict[str, Any]]]:
    """(label, rows sorted by loop count, matplotlib style) per line: one line per model and, where
    they vary, dataset and perturbed state. The baseline's lines are dashed, in greys from black,
    each state with its own marker; the checkpoints' lines are solid, each with its own colour and
    marker: every line of a figure can be told apart, the baseline's states too."""
    import numpy as np

    keys = ["model"] + [c for c in ("dataset", *LINE_COLUMNS) if c in table.columns and table[c].nunique() > 1]
    groups = []
    for values, group in table.groupby(keys, sort=False):
        values = values if isinstance(values, tuple) else (values,)
        name = " / ".join(f"{v}" if k in ("model", "dataset") else f"{k}={v}" for k, v in zip(keys, values))
        groups.append((name, group.sort_values("loop_count"), bool((group["role"] == "baseline").all())))
    n_base = sum(1 for _, _, baseline in groups if baseline)
    greys = np.linspace(0.0, 0.6, n_base) if n_base > 1 else [0.0]
    lines, b, c = [], 0, 0
    for name, group, baseline in groups:
        if baseline:
            grey = float(greys[b])
            style = {"color": (grey, grey, grey), "linestyle": "--", "linewidth": 2.0,
                     "marker": BASELINE_MARKERS[b % len(BASELINE_MARKERS)]}
            if b >= len(BASELINE_MARKERS):
                style["linestyle"] = ":"
            b += 1
            lines.append((name + ("" if name.startswith("baseline") else " (baseline)"), group, style))
        else:
            style = {"color": f"C{c % 10}", "marker": CHECKPOINT_MARKERS[(c // 10) % len(CHECKPOINT_MARKERS)]}
            c += 1
            lines.append((name, group, style))
    return lines


def figures(table, span: str = "the looped block") -> dict[str, Any]:
    """The run's figures from its table, by file name (matplotlib figures, not yet saved). Only
    finite values are drawn (a NaN or inf point is left out, its line broken there); a log axis
    becomes symlog where a value is 0 (drawn, not dropped) and stays linear with nothing > 0."""
    plt = pyplot()
    lines = line_styles(table)
    counts = sorted(table["loop_count"].unique())

    def draw(ax, column, ylabel, log=False):
        for name, group, style in lines:
            ax.plot(group["loop_count"], finite(group[column]), markersize=4, label=name, **style)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_xlabel("loop count k (passes through the block; 0 = h_in itself)")
        ax.set_ylabel(ylabel)
        if log:
            value_scale(ax, table[column])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    out = {}
    for column, (file, ylabel) in FIGURES.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw(ax, column, ylabel)
        ax.set_title(f"{ylabel.removeprefix('mean ')} vs loop count ({span})")
        out[file] = fig
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    draw(left, "step_rel_change_mean", "mean ||h_out(k) - h_out(k-1)|| / ||h_out(k-1)||", log=True)
    draw(right, "step_cosine_mean", "mean cos(h_out(k), h_out(k-1))")
    fig.suptitle(f"Change made by the k-th pass ({span})")
    out["convergence_vs_loop_count.png"] = fig
    if table["perplexity"].notna().any():  # not with perplexity: false
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw(ax, "perplexity", "perplexity (remaining blocks after k passes)", log=True)
        ax.set_title(f"Perplexity vs loop count ({span})")
        out["perplexity_vs_loop_count.png"] = fig
    return out


def _block_range(run_dir: Path) -> tuple[int | None, int | None]:
    try:
        from ..analysis import load_run_config

        init = load_run_config(run_dir)["model"]["init_args"]
        return int(init["start"]), int(init["end"])
    except (LensbenchError, KeyError, TypeError, ValueError):
        return None, None


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def first_position_dropped(mask: torch.Tensor) -> torch.Tensor:
    """The [B, T] attention mask without each text's first real token (padding on either side)."""
    first = mask.int().argmax(dim=1)  # the first True of each row (0 for a row of padding only)
    kept = mask.clone()
    kept[torch.arange(mask.shape[0], device=mask.device), first] = False
    return kept


def token_stats(h_in: torch.Tensor, h_out: torch.Tensor, prev: torch.Tensor | None) -> dict[str, Any]:
    """Count, tokens with a non-finite metric value, per-metric [mean, M2] and value sketch
    (``lensbench.stats.value_sketch``, for medians) over tokens of [N, D] float64 states (``prev``:
    h_out(k-1), None at k = 0, where the step metrics are undefined)."""
    import torch.nn.functional as F

    values = {
        "cosine": F.cosine_similarity(h_in, h_out, dim=-1),
        "mse": ((h_out - h_in) ** 2).mean(dim=-1),
        "norm_diff": h_out.norm(dim=-1) - h_in.norm(dim=-1),
    }
    if prev is not None:
        values["step_cosine"] = F.cosine_similarity(h_out, prev, dim=-1)
        values["step_rel_change"] = (h_out - prev).norm(dim=-1) / prev.norm(dim=-1).clamp_min(1e-30)
    stats, sketches = {}, {}
    finite_tokens = torch.ones(h_in.shape[0], dtype=torch.bool, device=h_in.device)
    for name, v in values.items():
        mean = v.mean()
        stats[name] = [mean.item(), ((v - mean) ** 2).sum().item()]
        sketches[name] = value_sketch(v)
        finite_tokens &= torch.isfinite(v)
    return {"n_tokens": int(h_in.shape[0]), "n_nonfinite_tokens": int((~finite_tokens).sum()), "stats": stats,
            "sketches": sketches}


def perplexity_state(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """The torchmetrics Perplexity state {total, count} of next-token prediction at every position
    whose token and next token are not padding; logits [B, T, V] cast to float64 in chunks."""
    from torchmetrics.text import Perplexity

    dtype = torch.float32 if logits.device.type == "mps" else torch.float64
    metric = Perplexity(sync_on_compute=False, compute_with_cache=False).set_dtype(dtype).to(logits.device)
    valid = mask[:, :-1] & mask[:, 1:]  # [B, T-1]
    preds = logits[:, :-1][valid]  # [M, V]
    targets = input_ids[:, 1:][valid]  # [M]
    for lo in range(0, preds.shape[0], PERPLEXITY_CHUNK):
        metric.update(preds[None, lo:lo + PERPLEXITY_CHUNK].to(dtype), targets[None, lo:lo + PERPLEXITY_CHUNK])
    return {"total": float(metric.total_log_probs), "count": int(metric.count)}


@hookimpl
def lensbench_register_analyses() -> list[type]:
    return [LoopIdentity]
