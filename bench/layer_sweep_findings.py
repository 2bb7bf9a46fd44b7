"""The findings docs/layer_sweep.md reports for the quickstart sweep, under both embeddings.

Reads two finished run folders of ``configs/layer_sweep/quickstart.yaml``, one with the default
``layer_norm: final`` (information_flow's embedding) and one with ``layer_norm: none`` (the raw
hidden states), and prints, side by side:

- per (model, task): the best layer and its score, and the model's last layer and its score;
- the range of each model's scores over a band of layers (``--band``, default SmolLM2's 12..29);
- the representation metrics (prompt entropy, effective rank) at chosen layers;
- with ``--dominance``: the share of the squared norm of the mean-pooled vectors held by their
  largest dimension, per layer, measured on the shipped ``retain`` texts with ``LayerEmbeddings``.

    lensbench predict --config configs/layer_sweep/quickstart.yaml
    lensbench predict --config configs/layer_sweep/quickstart.yaml \\
        --model.init_args.layer_norm none --model.init_args.experiment layer_sweep/quickstart_raw
    python bench/layer_sweep_findings.py outputs/layer_sweep/quickstart outputs/layer_sweep/quickstart_raw --dominance
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import table  # noqa: E402


def frame_table(frame: pd.DataFrame, index: bool = False) -> str:
    """A markdown table of ``frame`` (floats to 3 decimals)."""
    if index:
        frame = frame.reset_index()
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    return "\n".join(table(list(frame.columns), cells))


def _read(run_dir: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(run_dir / name, keep_default_na=False, na_values=[""], dtype={"revision": str})


def best_and_last(run_dir: Path) -> pd.DataFrame:
    best = _read(run_dir, "best_layers.csv")
    return best[["model", "task", "best_layer", "best_score", "last_layer", "last_score"]]


def band(run_dir: Path, model: str, low: int, high: int) -> pd.DataFrame:
    scores = _read(run_dir, "layer_sweep.csv")
    part = scores[(scores["model"] == model) & scores["layer"].between(low, high)]
    return part.groupby("task")["main_score"].agg(["min", "max"])


def metrics_at(run_dir: Path, model: str, layers: list[int]) -> pd.DataFrame:
    metrics = _read(run_dir, "representation_metrics.csv")
    part = metrics[(metrics["model"] == model) & metrics["layer"].isin(layers)]
    return part[["layer", "dataset", "prompt_entropy", "effective_rank"]]


def dominance(model: str, layers: list[int], norm: str) -> dict[int, tuple[int, float, float]]:
    """Per layer: (largest dimension, its share of the squared norm, mean norm) of the mean-pooled
    ``retain`` vectors under ``norm``."""
    import numpy as np

    from lensbench.data.modules import load_datasets
    from lensbench.layer_sweep.embeddings import LayerEmbeddings, final_norm
    from lensbench.models.loading import ModelSpec, load_model

    rows, _ = load_datasets(["retain"], "datasets", None)
    texts = [r["text"] for r in rows["retain"]]
    loaded = load_model(ModelSpec(model), padding_side="left")
    module = final_norm(loaded)[1] if norm == "final" else None
    backbone = getattr(loaded.model, "base_model", loaded.model)
    store = LayerEmbeddings(backbone, loaded.tokenizer, layers, "mean", batch_size=32, final_norm=module)
    out = {}
    for layer in layers:
        vectors = store.get(layer, texts).astype(np.float64)
        energy = (vectors ** 2).sum(axis=0)
        top = int(energy.argmax())
        out[layer] = (top, float(energy[top] / energy.sum()), float(np.linalg.norm(vectors, axis=1).mean()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("final", type=Path, help="run folder of the sweep with layer_norm: final")
    parser.add_argument("raw", type=Path, help="run folder of the sweep with layer_norm: none")
    parser.add_argument("--model", default="smollm2", help="model whose band, metrics and dominance are shown")
    parser.add_argument("--band", type=int, nargs=2, default=[12, 29])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 8, 11, 12, 20, 29, 30])
    parser.add_argument("--dominance", action="store_true", help="also measure the largest dimension's share")
    args = parser.parse_args()
    pd.set_option("display.width", 200)
    for title, run_dir in (("layer_norm: final", args.final), ("layer_norm: none", args.raw)):
        print(f"## {title} ({run_dir})\n")
        print(frame_table(best_and_last(run_dir)), "\n")
        print(f"{args.model}, layers {args.band[0]}..{args.band[1]}: score range per task")
        print(frame_table(band(run_dir, args.model, *args.band), index=True), "\n")
        print(f"{args.model}: metrics at layers {args.layers}")
        print(frame_table(metrics_at(run_dir, args.model, args.layers)), "\n")
    if args.dominance:
        for norm in ("final", "none"):
            print(f"## largest dimension of the mean-pooled retain vectors, {args.model}, layer_norm: {norm}\n")
            print("| layer | dimension | share of squared norm | mean norm |\n| --- | --- | --- | --- |")
            for layer, (dim, share, size) in dominance(args.model, args.layers, norm).items():
                print(f"| {layer} | {dim} | {share:.3f} | {size:.1f} |")
            print()


if __name__ == "__main__":
    main()
