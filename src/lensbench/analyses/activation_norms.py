"""activation_norms: per-layer statistics of every non-padding token's hidden state.

For each model state, dataset and layer (0 = the embedding output, as in transformers'
``output_hidden_states``; the last layer has passed through the final norm), every registered
per-token statistic (``norm`` = L2 norm by default) is reduced over all tokens of the dataset:
count, mean, sum of squared deviations (M2), min and max are computed per work item in float64
and combined exactly (Chan et al.'s pairwise update), so the result does not depend on batching
across ranks and memory does not grow with the number of tokens.

Texts are truncated to ``max_length`` tokens, by default the model's context (``generation.model_context``).
What truncation drops is never silent: each record counts the tokens and texts cut off, the table
has an ``n_tokens_dropped`` column, and the merge says it in one console line. Nor are non-finite
values (NaN or inf, e.g. from a layer whose weights hold NaN): they enter the statistics (which
are then not finite), ``n_nonfinite_<stat>`` counts them per layer, the merge says where in one
console warning, and the figure draws the finite values only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..analysis import Analysis
from ..errors import LensbenchError
from ..hookspecs import hookimpl
from ..logs import console
from ..models.loading import ModelSpec
from ..perturbations import LINE_COLUMNS, PerturbationGrid
from ..stats import chan_merge, nonfinite_warning, place
from ..tables import finite, pyplot, read_csv, save_figure, write_csv
from ..work import WorkItem

TABLE = "activation_norms.csv"


class ActivationNorms(Analysis):
    """Per-layer hidden-state norms (and other token statistics) per model and dataset."""

    name = "activation_norms"
    comparison_tables = (TABLE,)  # several runs on shared axes in a report

    def __init__(
        self,
        models: list[str | ModelSpec] | None = None,
        statistics: list[str] | None = None,
        perturbation: PerturbationGrid | None = None,
        max_length: int | None = None,
        experiment: str | None = None,
        output_dir: str = "outputs",
    ) -> None:
        """
        Args:
            models: Models to compare: embedded aliases (``smollm2``, ``minilm``), hub ids,
                folders, .safetensors or .gguf files, or full ``ModelSpec`` entries. Default (null):
                smollm2; an empty list is refused.
            statistics: Registered per-token statistics (see ``lensbench plugins``). Default: norm.
            perturbation: Measure every model at a grid of perturbed states (method, group,
                levels, repetitions) instead of as it is; adds the state's columns to the table.
            max_length: Texts are truncated to this many tokens (special tokens included).
                Default (null): the model's context (the tokenizer's ``model_max_length``, else
                the config's ``max_position_embeddings``). Dropped tokens are counted in
                ``n_tokens_dropped`` and reported at the end of the run.
            experiment: Name of the run: results go to ``<output_dir>/<experiment>/``. Default:
                ``<analysis>/<config file's stem>``.
            output_dir: Folder holding one sub-folder per experiment.
        """
        super().__init__(experiment=experiment, output_dir=output_dir)
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise LensbenchError(f"must be a positive number of tokens or null (the model's context), "
                                 f"got {max_length!r}", "model.init_args.max_length")
        self.declare_models(models, "model.init_args.models", default=("smollm2",))
        names = statistics or ["norm"]
        self.statistics = [self.registries.metrics.get(n, f"model.init_args.statistics[{i}]") for i, n in enumerate(names)]
        self.max_length = max_length
        self.declare_grid(perturbation)

    def process(self, item: WorkItem) -> dict[str, Any]:
        loaded = self.subjects.activate(item.state)
        texts = list(item.payload.texts)
        limit, limit_from = self.length_limit(item.state.checkpoint, loaded)
        if limit is None:  # no known context: nothing is cut
            batch = loaded.tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
            full_lengths = None
        else:
            # Untruncated lengths first, to count what truncation drops (verbose=False: no warning
            # about texts longer than the tokenizer's maximum; they are counted instead).
            full_lengths = [len(ids) for ids in loaded.tokenizer(texts, verbose=False)["input_ids"]]
            batch = loaded.tokenizer(texts, return_tensors="pt", padding=True,
                                     truncation=True, max_length=limit).to(self.device)
        backbone = getattr(loaded.model, "base_model", loaded.model)  # skip the LM head
        with torch.inference_mode():
            out = backbone(**batch, output_hidden_states=True)
        mask = batch["attention_mask"].bool()  # [B, T]
        where = mask.flatten().nonzero().squeeze(1)  # the kept tokens' positions, found once
        moments = []  # per layer and statistic: mean, m2, min, max, non-finite (on the device: read back once)
        for hidden in out.hidden_states:  # L+1 tensors [B, T, D]
            tokens = hidden.flatten(0, 1).index_select(0, where).float()  # [N, D], as hidden[mask]
            for stat in self.statistics:
                values = stat(tokens).double()  # [N]
                mean = values.mean()
                moments.append(torch.stack([mean, ((values - mean) ** 2).sum(), values.min(), values.max(),
                                            (~torch.isfinite(values)).sum().double()]))
        table = torch.stack(moments).view(len(out.hidden_states), len(self.statistics), 5).tolist()
        stats = {stat.name: {key: [layer[j][k] for layer in table] for k, key in enumerate(("mean", "m2", "min", "max"))}
                 for j, stat in enumerate(self.statistics)}
        nonfinite = {stat.name: [int(layer[j][4]) for layer in table] for j, stat in enumerate(self.statistics)}
        kept = mask.sum(dim=1).tolist()
        dropped = [0] * len(kept) if full_lengths is None else [max(0, f - k) for f, k in zip(full_lengths, kept)]
        return {
            "model": item.state.checkpoint,
            "dataset": item.payload.dataset,
            "labels": dict(item.state.labels),
            "n_tokens": int(sum(kept)),
            "n_tokens_dropped": int(sum(dropped)),
            "n_texts_truncated": sum(1 for d in dropped if d > 0),
            "max_length": limit,
            "max_length_from": limit_from,
            "stats": stats,
            "nonfinite": nonfinite,
        }

    @classmethod
    def merge(cls, records: list[dict[str, Any]], run_dir: Path) -> list[Path]:
        import pandas as pd

        groups: dict[tuple, dict[str, Any]] = {}
        for rec in records:  # ordered by key: the same order whatever the number of ranks
            labels = tuple((rec.get("labels") or {}).items())
            acc = groups.setdefault((rec["model"], rec["dataset"], labels), {"n": 0, "dropped": 0, "stats": {},
                                                                          "nonfinite": {}})
            n_b = rec["n_tokens"]
            acc["dropped"] += rec.get("n_tokens_dropped", 0)  # records written before the count: 0
            for name, s in rec["stats"].items():
                # records written before the count hold finite values only (they were not counted): 0
                counts = (rec.get("nonfinite") or {}).get(name) or [0] * len(s["mean"])
                total = acc["nonfinite"].setdefault(name, [0] * len(counts))
                acc["nonfinite"][name] = [a + b for a, b in zip(total, counts)]
                cur = acc["stats"].setdefault(name, {k: [] for k in ("mean", "m2", "min", "max")})
                if not cur["mean"]:
                    cur.update({k: list(v) for k, v in s.items()})
                    continue
                n_a = acc["n"]
                for layer in range(len(s["mean"])):
                    cur["mean"][layer], cur["m2"][layer] = chan_merge(n_a, cur["mean"][layer], cur["m2"][layer],
                                                                      n_b, s["mean"][layer], s["m2"][layer])
                    cur["min"][layer] = _extreme(min, cur["min"][layer], s["min"][layer])
                    cur["max"][layer] = _extreme(max, cur["max"][layer], s["max"][layer])
            acc["n"] += n_b
        rows = []
        label_names: list[str] = []
        bad: dict[str, int] = {}  # "model / dataset [state] layer l (stat)" -> non-finite values
        for (model, dataset, labels), acc in groups.items():
            label_names += [k for k, _ in labels if k not in label_names]
            n_layers = len(next(iter(acc["stats"].values()))["mean"])
            for layer in range(n_layers):
                row = {"model": model, "dataset": dataset, **dict(labels), "layer": layer, "n_tokens": acc["n"],
                       "n_tokens_dropped": acc["dropped"]}
                for name, s in acc["stats"].items():
                    row[f"mean_{name}"] = s["mean"][layer]
                    row[f"std_{name}"] = math.sqrt(max(s["m2"][layer], 0.0) / acc["n"])
                    row[f"min_{name}"] = s["min"][layer]
                    row[f"max_{name}"] = s["max"][layer]
                    row[f"n_nonfinite_{name}"] = acc["nonfinite"][name][layer]
                    bad[f"{place(model, dataset, labels)} layer {layer} ({name})"] = acc["nonfinite"][name][layer]
                rows.append(row)
        table = pd.DataFrame(rows).sort_values(["model", "dataset", *label_names, "layer"], kind="stable")
        written = [write_csv(table, Path(run_dir) / TABLE)]
        message = truncation_message(records)
        if message:
            console.info(message)
        nonfinite_warning("activation_norms", bad, "token statistics", "n_nonfinite_<stat>", TABLE)
        return written

    @classmethod
    def plot(cls, run_dir: Path) -> list[Path]:
        plt = pyplot()
        table = read_csv(run_dir, TABLE)
        outputs = []
        for column in [c for c in table.columns if c.startswith("mean_")]:
            stat = column.removeprefix("mean_")
            fig, ax = plt.subplots(figsize=(7, 4.5))
            keys = ["model", "dataset"] + [c for c in LINE_COLUMNS if c in table.columns and table[c].nunique() > 1]
            for values, group in table.groupby(keys, sort=True):
                name = " / ".join(f"{v}" if k in ("model", "dataset") else f"{k}={v}" for k, v in zip(keys, values))
                ax.plot(group["layer"], finite(group[column]), marker="o", markersize=3, label=name)
            ax.set_xlabel("layer (0 = embedding output)")
            ax.set_ylabel(f"mean {stat} per token")
            ax.set_title(f"Activation {stat} per layer")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            out = Path(run_dir) / ("activation_norms.png" if stat == "norm" else f"activation_norms_{stat}.png")
            save_figure(fig, out, dpi=120)
            plt.close(fig)
            outputs.append(out)
        return outputs


def _extreme(pick, a: float, b: float) -> float:
    """``pick`` (min or max) of two values, NaN when either is NaN (as torch's min and max of a
    tensor holding NaN), whatever their order: Python's min(1.0, nan) is 1.0, min(nan, 1.0) NaN."""
    return math.nan if math.isnan(a) or math.isnan(b) else pick(a, b)


def truncation_message(records: list[dict[str, Any]]) -> str | None:
    """One line saying how many tokens of how many texts truncation dropped (None when none were).

    Every state of a model (a perturbation grid's) cuts the same tokens, so each model's texts are
    counted once, not once per state."""
    # (max_length, what set it) -> model -> state's labels -> [tokens, texts]
    found: dict[tuple, dict[str, dict[tuple, list[int]]]] = {}
    for rec in records:
        if rec.get("n_tokens_dropped", 0) > 0:
            cause = (rec.get("max_length"), rec.get("max_length_from", "max_length"))
            labels = tuple((rec.get("labels") or {}).items())
            counts = found.setdefault(cause, {}).setdefault(rec["model"], {}).setdefault(labels, [0, 0])
            counts[0] += rec["n_tokens_dropped"]
            counts[1] += rec.get("n_texts_truncated", 0)
    causes = {cause: [sum(max(c[i] for c in states.values()) for states in models.values()) for i in (0, 1)]
              for cause, models in found.items()}
    if not causes:
        return None
    parts, fixes = [], set()
    for (limit, limit_from), (tokens, texts) in sorted(causes.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        where = f"max_length={limit}" if limit_from == "max_length" else f"the model's context of {limit} tokens"
        parts.append(f"{tokens} tokens of {texts} texts beyond {where}")
        fixes.add(limit_from)
    fix = []
    if "max_length" in fixes:
        fix.append("raise max_length or set it to null")
    if "context" in fixes:
        fix.append("split longer texts to measure all their tokens")
    return (f"activation_norms: {', '.join(parts)} were not measured (n_tokens_dropped in {TABLE}); "
            f"{' and '.join(fix)}")


@hookimpl
def lensbench_register_analyses() -> list[type]:
    return [ActivationNorms]
