"""Benchmark: layer_sweep's one pass for all layers against one layer alone and one pass per layer.

    python bench/layer_sweep.py [--model smollm2 --task lensbench_sts --layers 0 5 10 --reps 3] [--write-docs]

One task, one model, three ways to get MTEB scores, timed side by side in one process (the order
rotating from one repetition to the next), each through the classes the analysis runs
(``LayerEmbeddings``, the per-layer MTEB encoder, ``mteb.evaluate``; a fresh result cache each time):

- all layers (lensbench): one ``LayerEmbeddings`` for every layer: one forward pass per batch of
  texts, then ``mteb.evaluate`` once per layer from the kept embeddings;
- one layer: the same for the last layer alone (one forward pass, one evaluation);
- one pass per layer (the seed's way: one run per layer): for each layer a fresh
  ``LayerEmbeddings`` of that layer alone, so a forward pass over the task per layer.

Before any time is reported, the scores of "all layers" and "one pass per layer" must agree for
every layer, and "one layer" with the last of them. Figures: medians over ``--reps``; the forward
time (``LayerEmbeddings``' own passes) is reported apart from MTEB's evaluation time. With
``--write-docs`` the section "## layer_sweep" of docs/benchmarks.md is rewritten.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import cpu_name, report  # noqa: E402

SECTION = "## layer_sweep"
GOAL = 1.3  # the goal: all layers in one run / one layer alone


def sweep(store_cls, backbone, tokenizer, task, layers: list[int], per_layer_store: bool, batch_size: int):
    """Scores of ``layers``, seconds in forward passes, seconds in total."""
    import mteb

    from lensbench.layer_sweep.embeddings import layer_meta, make_encoder

    begin = time.perf_counter()
    forward = 0.0
    scores = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = mteb.ResultCache(cache_dir)
        shared = None if per_layer_store else store_cls(backbone, tokenizer, layers, batch_size=batch_size)
        for layer in layers:
            store = store_cls(backbone, tokenizer, [layer], batch_size=batch_size) if per_layer_store else shared
            timed = _Timed(store)
            meta = layer_meta("bench", None, layer, {"way": "per" if per_layer_store else "all"}, None)
            result = mteb.evaluate(make_encoder(timed, layer, meta), task, cache=cache,
                                   overwrite_strategy="always", show_progress_bar=False)
            forward += timed.seconds
            scores[layer] = result.task_results[0].get_score()
    return scores, forward, time.perf_counter() - begin


class _Timed:
    """Wraps a LayerEmbeddings: time spent computing (forward passes) in ``get``."""

    def __init__(self, store) -> None:
        self.store, self.seconds = store, 0.0

    def get(self, layer, texts):
        begin = time.perf_counter()
        before = self.store.forward_passes
        out = self.store.get(layer, texts)
        if self.store.forward_passes > before:
            self.seconds += time.perf_counter() - begin
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="an embedded alias, folder or hub id")
    parser.add_argument("--task", default="lensbench_sts", help="a registered local task or MTEB task")
    parser.add_argument("--layers", type=int, nargs="*", default=None,
                        help="hidden-state indices to score (default: every one)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from lensbench.layer_sweep.embeddings import LayerEmbeddings
    from lensbench.layer_sweep.tasks import ensure_loaded, resolve_tasks, task_texts
    from lensbench.models.loading import ModelSpec, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(ModelSpec(args.model))
    backbone = getattr(loaded.model, "base_model", loaded.model).eval()
    task = ensure_loaded(resolve_tasks([args.task])[0].task)
    n_layers = backbone.config.num_hidden_layers
    layers = list(range(n_layers + 1)) if args.layers is None else sorted(args.layers)
    ways = {
        "all layers (lensbench)": lambda: sweep(LayerEmbeddings, backbone, loaded.tokenizer, task, layers, False,
                                                args.batch_size),
        "one layer": lambda: sweep(LayerEmbeddings, backbone, loaded.tokenizer, task, [layers[-1]], False,
                                   args.batch_size),
        "one pass per layer (seed)": lambda: sweep(LayerEmbeddings, backbone, loaded.tokenizer, task, layers, True,
                                                   args.batch_size),
    }
    names = list(ways)
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    scores: dict[str, dict[int, float]] = {}
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            s, fwd, total = ways[name]()
            scores[name] = s
            times[name].append((fwd, total))
            print(f"rep {rep}: {name}: {total:.2f} s ({fwd:.2f} s forward)", flush=True)
    all_s, per_s, one_s = scores[names[0]], scores[names[2]], scores[names[1]]
    for layer in layers:
        assert abs(all_s[layer] - per_s[layer]) <= 1e-6, (layer, all_s[layer], per_s[layer])
    assert abs(one_s[layers[-1]] - all_s[layers[-1]]) <= 1e-6
    med = {n: (statistics.median(t[0] for t in times[n]), statistics.median(t[1] for t in times[n])) for n in names}
    all_t, one_t, per_t = (med[n] for n in names)
    rows = {
        "model, task": (f"{args.model} (layers {', '.join(map(str, layers))} of 0..{n_layers}), "
                        f"{args.task} ({task_texts(task)} texts)"),
        **{f"{n}: total / forward (s)": f"{t[1]:.2f} / {t[0]:.2f}" for n, t in med.items()},
        "all layers / one layer, total": f"{all_t[1] / one_t[1]:.2f} (goal <= {GOAL})",
        "all layers / one layer, forward passes": f"{all_t[0] / one_t[0]:.2f}",
        "one pass per layer / all layers, total": f"{per_t[1] / all_t[1]:.2f}",
        "one pass per layer / all layers, forward passes": f"{per_t[0] / all_t[0]:.2f} (L = {len(layers)})",
        "best layer (score) / last layer (score)": (
            f"{max(all_s, key=all_s.get)} ({max(all_s.values()):.4f}) / {layers[-1]} ({all_s[layers[-1]]:.4f})"),
    }
    for k, v in rows.items():
        print(f"{k}: {v}")
    if args.write_docs:
        report(SECTION,
               "`python bench/layer_sweep.py --write-docs`: MTEB scores of every layer of one model on one task, "
               "three ways in one process (medians over repetitions, order rotating): all layers from one forward "
               "pass per batch (what layer_sweep does), the last layer alone, and one forward pass per layer (the "
               "seed's one run per layer). Scores agree to 1e-6 before any time is reported.",
               f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), "
               f"{args.reps} repetition(s)", rows,
               "Forward = time spent in the model's forward passes; the rest is MTEB's evaluation (for STS: cosine "
               "similarities and a correlation per layer; for classification: logistic regressions, which grow "
               "with the number of layers scored).")


if __name__ == "__main__":
    main()
