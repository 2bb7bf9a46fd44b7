"""logit_lens: every layer's hidden state read as the model's next-token prediction.

The logit lens (nostalgebraist 2020) applies the model's own final norm and unembedding (LM head,
with the logit scaling or soft-capping its forward applies) to the hidden state after each layer,
as if the remaining layers were skipped: p_l = softmax(W_U norm(h_l)). Layer 0 is the embedding
output and layer L the model's output, as in transformers' ``output_hidden_states``; layer L's
distribution is the model's own (its logits), so agreement there is 1 and KL 0.

At every token position t that has a next token (the predicting positions: each text's first
length - 1 tokens, padding left out) and every layer l it measures:

- ``top1_agreement``: argmax p_l = argmax p_L (the lens predicts what the model predicts);
- ``top1_accuracy``: argmax p_l = the text's token t + 1;
- ``kl_to_final``: KL(p_L || p_l) = Σ_v p_L(v) (log p_L(v) - log p_l(v)), in nats, the
  divergence of the lens from the final distribution (as the tuned lens, Belrose et al. 2023,
  reports it);
- ``entropy``: H(p_l) = -Σ_v p_l(v) log p_l(v), in nats.

Each record holds, per text and layer, the sums of these over the text's predicting tokens; the
merge reports their means over all tokens of a (model state, dataset), with a 95% interval that
takes the texts as the independent units (``lensbench.intervals.ratio_interval``). The first text
of each dataset also keeps the top-1 token at each layer for its first positions (the familiar
logit-lens picture, ``logit_lens_tokens.csv``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..analysis import Analysis
from ..errors import LensbenchError
from ..hookspecs import hookimpl
from ..models.loading import ModelSpec
from ..perturbations import LINE_COLUMNS, PerturbationGrid
from ..tables import finite, pyplot, read_csv, save_figure, write_csv
from ..work import WorkItem

TABLE = "logit_lens.csv"
TOKENS = "logit_lens_tokens.csv"
FIGURE = "logit_lens.png"
METRICS = ("top1_agreement", "top1_accuracy", "kl_to_final", "entropy")
RATES = ("top1_agreement", "top1_accuracy")


class LogitLens(Analysis):
    """Per layer: the final norm and unembedding applied to the hidden state, compared with the
    model's own prediction and the next token."""

    name = "logit_lens"
    comparison_tables = (TABLE,)  # several runs on shared axes in a report
    # chunk_tokens only sets how many positions are unembedded at once: lowering it after an
    # out-of-memory stop resumes the run.
    extendable = (*Analysis.extendable, "chunk_tokens")

    def __init__(
        self,
        models: list[str | ModelSpec] | None = None,
        perturbation: PerturbationGrid | None = None,
        max_length: int | None = 512,
        chunk_tokens: int = 256,
        top_tokens: int = 12,
        experiment: str | None = None,
        output_dir: str = "outputs",
    ) -> None:
        """
        Args:
            models: Causal LMs to read: embedded alias (``smollm2``), hub ids, folders, .safetensors
                or .gguf files, or ``ModelSpec`` entries (a looped or ablated model is a spec with
                ``transforms``). Default: smollm2.
            perturbation: Read every model at a grid of perturbed states as well (method, group,
                levels, repetitions); adds the state's columns to the tables.
            max_length: Texts are cut to this many tokens (null: the model's context).
            chunk_tokens: Token positions unembedded at once: memory holds two chunk x vocabulary
                float32 matrices (256 x 49152: 100 MB). No effect on the results.
            top_tokens: Positions of each dataset's first text kept in ``logit_lens_tokens.csv``
                (0: none).
            experiment: Name of the run: results go to ``<output_dir>/<experiment>/``. Default:
                ``logit_lens/<config file's stem>``.
            output_dir: Folder holding one sub-folder per experiment.
        """
        super().__init__(experiment=experiment, output_dir=output_dir)
        for key, value, low in (("max_length", max_length, 2), ("chunk_tokens", chunk_tokens, 1),
                                ("top_tokens", top_tokens, 0)):
            if value is None and key == "max_length":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise LensbenchError(f"must be an integer >= {low}, got {value!r}", f"model.init_args.{key}")
        self.max_length, self.chunk_tokens, self.top_tokens = max_length, chunk_tokens, top_tokens
        self.declare_models(models)
        self.declare_grid(perturbation)

    # -- the work ---------------------------------------------------------------------------------
    def process(self, item: WorkItem) -> dict[str, Any]:
        from ..models.unembed import Unembedding

        label = item.state.checkpoint
        loaded = self.subjects.activate(item.state)
        unembed = Unembedding(loaded.model, loaded.anatomy, self.fields[label], "logit_lens", "the lens")
        limit, _ = self.length_limit(label, loaded)
        texts = list(item.payload.texts)
        cut = {} if limit is None else {"truncation": True, "max_length": limit}
        batch = loaded.tokenizer(texts, return_tensors="pt", padding=True, **cut).to(self.device)
        with torch.inference_mode():
            out = loaded.model(**batch, output_hidden_states=True)
            ids, mask = batch["input_ids"], batch["attention_mask"].bool()
            rows, cols = (mask[:, :-1] & mask[:, 1:]).nonzero(as_tuple=True)  # predicting positions
            targets = ids[rows, cols + 1]
            n_layers = len(out.hidden_states)
            sums = torch.zeros(len(METRICS), n_layers, len(texts), dtype=torch.float64, device=self.device)
            top: list[list[int]] = [[] for _ in range(n_layers)]  # first text's top-1 ids per layer
            first = item.key[-2] == 0 and self.top_tokens > 0  # the dataset's first batch
            keep = int(min(self.top_tokens, int((rows == 0).sum()))) if first else 0
            for lo in range(0, rows.numel(), self.chunk_tokens):
                r, c = rows[lo:lo + self.chunk_tokens], cols[lo:lo + self.chunk_tokens]
                final = torch.log_softmax(out.logits[r, c].float(), dim=-1)
                final_top, final_p = final.argmax(-1), final.exp()  # once per chunk, not per layer
                next_token = targets[lo:lo + r.numel()]
                for layer in range(n_layers):
                    if layer == n_layers - 1:
                        lens = final
                    else:
                        lens = torch.log_softmax(unembed.logits(out.hidden_states[layer][r, c]).float(), dim=-1)
                    guess = lens.argmax(-1)
                    probs = lens.exp()
                    values = torch.stack([(guess == final_top).double(), (guess == next_token).double(),
                                          (final_p * (final - lens)).sum(-1).double(),
                                          -(probs * lens).sum(-1).double()])
                    sums[:, layer].index_add_(1, r, values)
                    if lo < keep:  # the first text's positions come first (row-major order)
                        top[layer] += guess[: keep - lo].tolist()
            counts = torch.bincount(rows, minlength=len(texts))
        record = {"model": label, "dataset": item.payload.dataset, "labels": dict(item.state.labels),
                  "n": counts.tolist(), **{m: sums[i].tolist() for i, m in enumerate(METRICS)}}
        if keep:
            record["top"] = {"input": ids[0, cols[:keep]].tolist(), "next": targets[:keep].tolist(), "layers": top,
                             "tokens": _token_strings(loaded.tokenizer, [ids[0, cols[:keep]].tolist(),
                                                                         targets[:keep].tolist(), *top])}
        return record

    # -- tables and figures -----------------------------------------------------------------------
    @classmethod
    def merge(cls, records: list[dict[str, Any]], run_dir: Path) -> list[Path]:
        import numpy as np
        import pandas as pd

        from ..intervals import ratio_interval

        groups: dict[tuple, list[dict[str, Any]]] = {}
        for rec in records:  # ordered by key: the same order whatever the number of ranks
            groups.setdefault((rec["model"], rec["dataset"], tuple(rec["labels"].items())), []).append(rec)
        rows, tokens = [], []
        for (model, dataset, labels), recs in groups.items():
            n = np.concatenate([r["n"] for r in recs])
            for layer in range(len(recs[0][METRICS[0]])):
                row = {"model": model, "dataset": dataset, **dict(labels), "layer": layer,
                       "n_tokens": int(n.sum()), "n_texts": int((n > 0).sum())}
                for metric in METRICS:
                    per_text = np.concatenate([r[metric][layer] for r in recs])
                    low, high = ratio_interval(per_text, n)
                    if metric in RATES:
                        low, high = max(low, 0.0), min(high, 1.0)
                    row.update({metric: per_text.sum() / n.sum() if n.sum() else float("nan"),
                                f"{metric}_ci_low": low, f"{metric}_ci_high": high})
                rows.append(row)
            first = next((r["top"] for r in recs if "top" in r), None)
            for layer, guesses in enumerate(first["layers"] if first else []):
                names = first["tokens"]
                for position, (token, nxt, guess) in enumerate(zip(first["input"], first["next"], guesses)):
                    tokens.append({"model": model, "dataset": dataset, **dict(labels), "layer": layer,
                                   "position": position, "input_id": token, "input_token": names.get(str(token), ""),
                                   "next_id": nxt, "next_token": names.get(str(nxt), ""),
                                   "top1_id": guess, "top1_token": names.get(str(guess), "")})
        label_names = list(dict.fromkeys(k for (_, _, labels) in groups for k, _ in labels))
        keys = ["model", "dataset", *label_names, "layer"]
        written = [write_csv(pd.DataFrame(rows).sort_values(keys, kind="stable"), Path(run_dir) / TABLE)]
        if tokens:
            written.append(write_csv(pd.DataFrame(tokens).sort_values([*keys, "position"], kind="stable"),
                                     Path(run_dir) / TOKENS))
        return written

    @classmethod
    def plot(cls, run_dir: Path) -> list[Path]:
        plt = pyplot()
        table = read_csv(run_dir, TABLE)
        fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
        titles = {"top1_agreement": "top-1 agrees with the model's prediction",
                  "top1_accuracy": "top-1 is the next token", "kl_to_final": "KL(final || lens), nats",
                  "entropy": "entropy of the lens, nats"}
        keys = ["model", "dataset"] + [c for c in LINE_COLUMNS if c in table.columns and table[c].nunique() > 1]
        for ax, metric in zip(axes.flat, METRICS):
            for values, group in table.groupby(keys, sort=True):
                name = " / ".join(f"{v}" if k in ("model", "dataset") else f"{k}={v}" for k, v in zip(keys, values))
                line, = ax.plot(group["layer"], finite(group[metric]), marker="o", markersize=3, label=name)
                ax.fill_between(group["layer"], finite(group[f"{metric}_ci_low"]), finite(group[f"{metric}_ci_high"]),
                                color=line.get_color(), alpha=0.2, linewidth=0)
            ax.set_title(titles[metric], fontsize=10)
            ax.grid(alpha=0.3)
        for ax in axes[1]:
            ax.set_xlabel("layer (0 = embedding output)")
        axes[0, 0].legend(fontsize=7)
        fig.suptitle("Logit lens: each layer's hidden state through the final norm and LM head (95% intervals)")
        fig.tight_layout()
        out = save_figure(fig, Path(run_dir) / FIGURE, dpi=120)
        plt.close(fig)
        return [out]


def _token_strings(tokenizer, id_lists: list[list[int]]) -> dict[str, str]:
    """Token id -> the tokenizer's token string, for the ids of ``id_lists``; an id the tokenizer
    has no token for (a model's vocabulary padded beyond its tokenizer's) maps to ""."""
    ids = sorted({i for ids in id_lists for i in ids})
    return {str(i): token or "" for i, token in zip(ids, tokenizer.convert_ids_to_tokens(ids))}


@hookimpl
def lensbench_register_analyses() -> list[type]:
    return [LogitLens]
