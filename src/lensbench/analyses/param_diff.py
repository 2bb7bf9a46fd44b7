"""param_diff: how much, and in how many directions, each weight matrix changed between checkpoints.

For every compared matrix, with ``dW = W_other - W_base`` in float32 or better:
``dW_fro = ||dW||_F``, ``rel_change = dW_fro / W_fro``, the spectral norm ``dW_spec = ||dW||_2``
(Lanczos on ``dWᵀdW`` with a certified error bound, or exact ``svdvals`` for small matrices:
see ``lensbench.linalg``; method, iterations and bound recorded) and the stable rank
``dW_stable_rank = dW_fro² / dW_spec²`` (undefined, NaN, for an unchanged matrix);
the same statistics for the base matrix ``W``. Tensors are read one at a time from disk, so memory
stays near a few times the largest matrix, whatever the checkpoints' size.

A matrix whose change is not finite (a NaN or inf in either checkpoint's matrix) is never counted
as unchanged: its statistics are NaN or inf, ``per_layer.csv`` counts it in ``n_nonfinite`` (not in
``n_changed``), the merge names it in one console warning, and the figures draw the finite values only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..analysis import Analysis
from ..errors import LensbenchError
from ..hookspecs import hookimpl
from ..linalg import EXACT_MAX_DIM, METHODS, frobenius, matrix_stats
from ..state import State
from ..stats import nonfinite_warning
from ..tables import finite, pyplot, read_csv, save_figure, write_csv
from ..work import WorkItem

PER_MATRIX = "per_matrix.csv"
PER_LAYER = "per_layer.csv"
MISMATCHES = "mismatches.csv"
SKIPPED = "skipped.csv"
SKIPPED_COLUMNS = ["name", "shape", "reason"]
DTYPES = {"float32": torch.float32, "float64": torch.float64}
PLOTTED = ("dW_fro", "rel_change", "dW_spec", "dW_stable_rank")
LAYER_PLOTTED = ("dW_fro_layer", "rel_change_layer", "mean_dW_stable_rank")


class ParamDiff(Analysis):
    """Parameter-change statistics (Frobenius, spectral norm, stable rank) per matrix and per layer."""

    name = "param_diff"

    def __init__(
        self,
        tol: float = 1e-4,
        max_iter: int = 1000,
        spectral_method: str = "auto",
        exact_max_dim: int = EXACT_MAX_DIM,
        compute_dtype: str = "float32",
        experiment: str | None = None,
        output_dir: str = "outputs",
    ) -> None:
        """
        Args:
            tol: Relative error bound of the spectral norm: an iterative method stops (and
                ``*_spec_converged`` is true) once its certified residual bound is at most
                ``tol * spec`` (docs/param_diff.md says what that guarantees).
            max_iter: Most iterations per matrix (one product with the matrix and one with its
                transpose each); a matrix that needs more is reported with ``*_spec_converged`` false.
            spectral_method: auto, lanczos, power or exact: how spectral norms are computed. auto:
                exact (``svdvals``) when the matrix's smaller side is at most ``exact_max_dim``,
                else lanczos. The method used is recorded per matrix (``*_spec_method``).
            exact_max_dim: Largest smaller side for which auto computes the exact value.
            compute_dtype: float32 or float64: the dtype of every computation, whatever the stored dtype.
            experiment: Name of the run: results go to ``<output_dir>/<experiment>/``. Default:
                ``<analysis>/<config file's stem>``.
            output_dir: Folder holding one sub-folder per experiment.
        """
        super().__init__(experiment=experiment, output_dir=output_dir)
        if not (tol > 0 and math.isfinite(tol)):
            raise LensbenchError(f"must be a positive number, got {tol}", "model.init_args.tol")
        if max_iter < 1:
            raise LensbenchError(f"must be at least 1, got {max_iter}", "model.init_args.max_iter")
        if compute_dtype not in DTYPES:
            raise LensbenchError(f"must be one of {', '.join(DTYPES)}, got {compute_dtype!r}",
                                 "model.init_args.compute_dtype")
        if spectral_method not in METHODS:
            raise LensbenchError(f"must be one of {', '.join(METHODS)}, got {spectral_method!r}",
                                 "model.init_args.spectral_method")
        if exact_max_dim < 0:
            raise LensbenchError(f"must be at least 0, got {exact_max_dim}", "model.init_args.exact_max_dim")
        self.tol, self.max_iter, self.compute_dtype = tol, max_iter, DTYPES[compute_dtype]
        self.spectral_method, self.exact_max_dim = spectral_method, exact_max_dim

    def _stats(self, matrix: torch.Tensor, prefix: str) -> dict[str, Any]:
        return matrix_stats(matrix, prefix, self.tol, self.max_iter, self.spectral_method, self.exact_max_dim)

    def states(self) -> list[State]:
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "base_label"):
            raise LensbenchError("param_diff needs data: {class_path: lensbench.data.checkpoints.CheckpointPairs}",
                                 "data.class_path")
        return [State(datamodule.base_label)]

    def _load(self, label: str, name: str) -> torch.Tensor:
        return self.trainer.datamodule.reader(label).get(name).to(self.device, self.compute_dtype)

    def process(self, item: WorkItem) -> dict[str, Any]:
        unit = item.payload
        record: dict[str, Any] = {"kind": unit.kind, "other": unit.other, "name": unit.info.name,
                                  "layer": unit.info.layer, "module": unit.info.module, "expert": unit.info.expert,
                                  "shape": list(unit.shape), "other_shape": list(unit.other_shape)}
        if unit.kind in ("mismatch", "skipped"):
            record["reason"] = unit.reason
            return record
        base = self._load(item.state.checkpoint, unit.info.name)
        if unit.kind == "base":
            record.update(self._stats(base, "W"))
            return record
        record["W_fro"] = frobenius(base)
        # dW = W_other - W_base, formed in the base matrix's memory from blocks of the other's rows:
        # one matrix in memory, plus a block.
        other_sq, row = 0.0, 0
        for block in self.trainer.datamodule.reader(unit.other).iter_rows(unit.info.name):
            block = block.to(self.device, self.compute_dtype).reshape(-1, *base.shape[1:])
            other_sq += frobenius(block) ** 2
            rows = base[row : row + block.shape[0]]
            torch.sub(block, rows, out=rows)  # other - base, in one pass (= -(base - other) exactly)
            row += block.shape[0]
        record["W_other_fro"] = math.sqrt(other_sq)
        record.update(self._stats(base, "dW"))
        return record

    @classmethod
    def merge(cls, records: list[dict[str, Any]], run_dir: Path) -> list[Path]:
        import numpy as np
        import pandas as pd

        base = {r["name"]: r for r in records if r["kind"] == "base"}
        rows, mismatches, skipped = [], [], []
        for r in records:
            if r["kind"] == "skipped":
                skipped.append({"name": r["name"], "shape": "x".join(map(str, r["shape"])), "reason": r["reason"]})
            elif r["kind"] == "mismatch":
                mismatches.append({"other": r["other"], "name": r["name"], "reason": r["reason"],
                                   "base_shape": "x".join(map(str, r["shape"])),
                                   "other_shape": "x".join(map(str, r["other_shape"]))})
            elif r["kind"] == "diff":
                w = base[r["name"]]
                rows.append({
                    "other": r["other"], "name": r["name"], "layer": r["layer"], "module": r["module"],
                    "expert": r.get("expert"), "shape": "x".join(map(str, r["shape"])), "numel": math.prod(r["shape"]),
                    "dW_fro": r["dW_fro"], "W_fro": r["W_fro"],
                    "rel_change": r["dW_fro"] / r["W_fro"] if r["W_fro"] > 0 else math.nan,
                    "dW_spec": r["dW_spec"], "dW_spec_iters": r["dW_spec_iters"],
                    "dW_spec_converged": r["dW_spec_converged"], "dW_spec_method": r.get("dW_spec_method"),
                    "dW_spec_bound": r.get("dW_spec_bound"), "dW_stable_rank": r["dW_stable_rank"],
                    "W_spec": w["W_spec"], "W_spec_iters": w["W_spec_iters"],
                    "W_spec_converged": w["W_spec_converged"], "W_spec_method": w.get("W_spec_method"),
                    "W_spec_bound": w.get("W_spec_bound"), "W_stable_rank": w["W_stable_rank"],
                    "W_other_fro": r["W_other_fro"],
                })
        run_dir = Path(run_dir)
        per_matrix = pd.DataFrame(rows, columns=PER_MATRIX_COLUMNS).sort_values(["other", "layer", "module", "expert"],
                                                                                kind="stable")
        per_matrix["expert"] = per_matrix["expert"].astype("Int64")  # empty for matrices outside experts
        outputs = [write_csv(per_matrix, run_dir / PER_MATRIX)]
        outputs.append(write_csv(per_layer_table(per_matrix), run_dir / PER_LAYER))
        bad = per_matrix[~np.isfinite(per_matrix["dW_fro"].astype(float))]
        nonfinite_warning("param_diff", {f"{r.other} {r.name}": 1 for r in bad.itertuples()}, "matrix changes",
                          "n_nonfinite", PER_LAYER)
        outputs.append(write_csv(pd.DataFrame(mismatches, columns=MISMATCH_COLUMNS), run_dir / MISMATCHES))
        outputs.append(write_csv(pd.DataFrame(skipped, columns=SKIPPED_COLUMNS), run_dir / SKIPPED))
        return outputs

    @classmethod
    def plot(cls, run_dir: Path) -> list[Path]:
        plt = pyplot()
        table = read_csv(run_dir, PER_MATRIX)
        table = table[table["layer"] >= 0]
        others = sorted(table["other"].unique())
        outputs = []
        for stat in PLOTTED:
            fig, axes = plt.subplots(1, max(len(others), 1), figsize=(6.5 * max(len(others), 1), 4.5), squeeze=False)
            for ax, other in zip(axes[0], others):
                rows = table[table["other"] == other]
                for module, group in rows.groupby("module", sort=True):
                    ax.plot(group["layer"], finite(group[stat]), marker="o", markersize=3, label=module)
                ax.set_title(f"{stat}: {other} vs base")
                ax.set_xlabel("layer")
                ax.set_ylabel(stat)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
            fig.tight_layout()
            out = Path(run_dir) / f"param_diff_{stat}.png"
            save_figure(fig, out, dpi=110)
            plt.close(fig)
            outputs.append(out)
        layers = read_csv(run_dir, PER_LAYER)
        for stat in LAYER_PLOTTED:  # the seed's per-layer figures; layer -1: matrices outside the blocks
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for other, group in layers.groupby("other", sort=True):
                group = group.sort_values("layer")
                ax.plot(group["layer"], finite(group[stat]), marker="o", markersize=3, label=str(other))
            if (layers["layer"] < 0).any():
                ax.axvline(-0.5, color="grey", linewidth=0.8, linestyle=":")
                ax.annotate("outside blocks", (-1, ax.get_ylim()[1]), fontsize=7, ha="center", va="top")
            ax.set_xlabel("layer (-1: matrices outside the blocks)")
            ax.set_ylabel(stat)
            ax.set_title(f"{stat} per layer")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            out = Path(run_dir) / f"param_diff_layer_{stat}.png"
            save_figure(fig, out, dpi=110)
            plt.close(fig)
            outputs.append(out)
        return outputs


PER_MATRIX_COLUMNS = ["other", "name", "layer", "module", "expert", "shape", "numel", "dW_fro", "W_fro", "rel_change",
                      "dW_spec", "dW_spec_iters", "dW_spec_converged", "dW_spec_method", "dW_spec_bound",
                      "dW_stable_rank", "W_spec", "W_spec_iters", "W_spec_converged", "W_spec_method",
                      "W_spec_bound", "W_stable_rank", "W_other_fro"]
MISMATCH_COLUMNS = ["other", "name", "reason", "base_shape", "other_shape"]


def per_layer_table(per_matrix):
    """Per (other, layer): root-sum-squares of the Frobenius norms, ``n_changed`` (matrices with a
    finite, non-zero change), ``n_nonfinite`` (matrices whose change is NaN or inf: neither changed
    nor unchanged), and means of the other statistics; ``mean_dW_stable_rank`` over the changed
    matrices only (an unchanged matrix has no stable rank). In a layer holding a non-finite change
    the sums and the change's means are NaN (or inf): a total without it would understate it."""
    import numpy as np
    import pandas as pd

    rows = []
    for (other, layer), g in per_matrix.groupby(["other", "layer"], sort=True):
        dw_fro = g["dW_fro"].astype(float)
        nonfinite = ~np.isfinite(dw_fro)
        changed = g[~nonfinite & (dw_fro > 0)]
        # sums with skipna=False: a NaN matrix makes the layer's total NaN, never a smaller total
        dw = float(np.sqrt((dw_fro ** 2).sum(skipna=False)))
        w = float(np.sqrt((g["W_fro"].astype(float) ** 2).sum(skipna=False)))
        rows.append({
            "other": other, "layer": layer, "n_matrices": len(g), "n_changed": len(changed),
            "n_nonfinite": int(nonfinite.sum()),
            "dW_fro_layer": dw, "W_fro_layer": w, "rel_change_layer": dw / w if w > 0 else math.nan,
            "mean_W_stable_rank": g["W_stable_rank"].mean(),
            # the change of a layer holding a non-finite one is not known: its means are NaN, not
            # means over the other matrices
            **({"mean_rel_change": math.nan, "mean_dW_spec": math.nan, "max_dW_spec": math.nan,
                "mean_dW_stable_rank": math.nan} if nonfinite.any() else {
                "mean_rel_change": g["rel_change"].mean(), "mean_dW_spec": g["dW_spec"].mean(),
                "max_dW_spec": g["dW_spec"].max(),
                "mean_dW_stable_rank": changed["dW_stable_rank"].mean() if len(changed) else math.nan}),
        })
    return pd.DataFrame(rows, columns=PER_LAYER_COLUMNS)


PER_LAYER_COLUMNS = ["other", "layer", "n_matrices", "n_changed", "n_nonfinite", "dW_fro_layer", "W_fro_layer",
                     "rel_change_layer", "mean_rel_change", "mean_dW_spec", "max_dW_spec", "mean_dW_stable_rank",
                     "mean_W_stable_rank"]


@hookimpl
def lensbench_register_analyses() -> list[type]:
    return [ParamDiff]
