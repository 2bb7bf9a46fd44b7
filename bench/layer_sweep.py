"""Benchmark: layer_sweep's one pass for all layers against one layer alone and the reference's model cut per layer.

    python bench/layer_sweep.py [--model smollm2 --task lensbench_sts --layers 0 5 10 --reps 3] [--write-docs]

One task, one model, three ways to get MTEB scores, timed side by side in one process (the order
rotating from one repetition to the next), each through the classes the analysis runs
(``LayerEmbeddings``, the per-layer MTEB encoder, ``mteb.evaluate``; a fresh result cache each time):

- all layers (lensbench): one ``LayerEmbeddings`` for every layer, with the analysis' default embedding
  (the model's final norm applied to every layer): one forward pass per batch of texts, then
  ``mteb.evaluate`` once per layer from the kept embeddings;
- one layer: the same for the last layer alone (one forward pass, one evaluation);
- model cut per layer (the seed's way, information_flow's ``setup_model``): for each layer ``l`` the
  model is loaded again with ``config.num_hidden_layers = l`` (so only ``l`` blocks), and layer ``l``
  is ``hidden_states[l]`` of that cut model (its output, after the final norm): one load and one
  forward pass over the task per layer. A decoder cut to 0 blocks records no hidden state in
  transformers 5; its output (the final norm of the embeddings, which is what transformers 4 gave as
  ``hidden_states[0]``) stands for it.

Before any time is reported, the scores of "all layers" and "model cut per layer" must agree for
every layer, and "one layer" with the last of them. Figures: medians over ``--reps``; the forward
time (``LayerEmbeddings``' own passes) and the loads of the cut models are reported apart from
MTEB's evaluation time. With ``--write-docs`` the section "## layer_sweep" of docs/benchmarks.md is
rewritten.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import cpu_name, median, report, rotated  # noqa: E402

SECTION = "## layer_sweep"
GOAL = 1.3  # the goal: all layers in one run / one layer alone


def sweep(make_store, per_layer: bool, task, layers: list[int]):
    """Scores of ``layers``, seconds in forward passes, seconds loading models, seconds in total.

    ``make_store(layers)`` gives a ``LayerEmbeddings`` and the seconds spent loading for it; called
    once with every layer, or (``per_layer``) once per layer with that layer alone."""
    import mteb

    from lensbench.layer_sweep.embeddings import layer_meta, make_encoder

    begin = time.perf_counter()
    forward = loading = 0.0
    scores = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = mteb.ResultCache(cache_dir)
        shared = None
        for layer in layers:
            if per_layer or shared is None:
                shared, seconds = make_store([layer] if per_layer else layers)
                loading += seconds
            timed = _Timed(shared)
            meta = layer_meta("bench", None, layer, {"way": make_store.__name__}, None)
            result = mteb.evaluate(make_encoder(timed, layer, meta), task, cache=cache,
                                   overwrite_strategy="always", show_progress_bar=False)
            forward += timed.seconds
            scores[layer] = result.task_results[0].get_score()
    return scores, forward, loading, time.perf_counter() - begin


class _CutModel:
    """The model cut to ``layer`` blocks, read as the reference reads it: ``hidden_states[layer]``, or
    its output where transformers records no hidden state (a decoder cut to 0 blocks)."""

    def __init__(self, model, layer: int) -> None:
        self.model, self.layer = model, layer

    def __call__(self, **kwargs):
        out = self.model(**kwargs)
        hidden = tuple(out.hidden_states or ())
        if len(hidden) <= self.layer:
            hidden += (out.last_hidden_state,) * (self.layer + 1 - len(hidden))
        return SimpleNamespace(hidden_states=hidden)


def cut_model(loaded, layer: int):
    """``loaded``'s model loaded again from its files with ``config.num_hidden_layers = layer``
    (information_flow's ``setup_model``), as a backbone for ``LayerEmbeddings`` at ``layer``."""
    import transformers

    config = copy.deepcopy(loaded.model.config)
    config.num_hidden_layers = layer
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the blocks left out are "unexpected" weights
    try:
        model = type(loaded.model).from_pretrained(loaded.model.name_or_path, config=config,
                                                   dtype=next(loaded.model.parameters()).dtype)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return _CutModel(getattr(model, "base_model", model).eval(), layer)


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

    from lensbench.layer_sweep.embeddings import LayerEmbeddings, final_norm
    from lensbench.layer_sweep.tasks import ensure_loaded, resolve_tasks, task_texts
    from lensbench.models.loading import ModelSpec, load_model
    from lensbench.plugins import active_registries

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(ModelSpec(args.model), padding_side="left")  # the analysis' (and the reference's) side
    backbone = getattr(loaded.model, "base_model", loaded.model).eval()
    _, norm = final_norm(loaded)
    task = ensure_loaded(resolve_tasks([args.task], registry=active_registries().mteb_tasks)[0].task)
    n_layers = backbone.config.num_hidden_layers
    layers = list(range(n_layers + 1)) if args.layers is None else sorted(args.layers)

    def all_layers(wanted):
        return LayerEmbeddings(backbone, loaded.tokenizer, wanted, batch_size=args.batch_size, final_norm=norm), 0.0

    def cut_per_layer(wanted):
        begin = time.perf_counter()
        model = cut_model(loaded, wanted[0])
        return LayerEmbeddings(model, loaded.tokenizer, wanted, batch_size=args.batch_size), \
            time.perf_counter() - begin

    ways = {
        "all layers (lensbench)": lambda: sweep(all_layers, False, task, layers),
        "one layer": lambda: sweep(all_layers, False, task, [layers[-1]]),
        "model cut per layer (seed)": lambda: sweep(cut_per_layer, True, task, layers),
    }
    names = list(ways)
    times: dict[str, list[tuple[float, float, float]]] = {n: [] for n in names}
    scores: dict[str, dict[int, float]] = {}
    for rep in range(args.reps):
        for name in rotated(names, rep):
            s, fwd, load, total = ways[name]()
            scores[name] = s
            times[name].append((fwd, load, total))
            print(f"rep {rep}: {name}: {total:.2f} s ({fwd:.2f} s forward, {load:.2f} s loading)", flush=True)
    all_s, cut_s, one_s = scores[names[0]], scores[names[2]], scores[names[1]]
    for layer in layers:
        assert abs(all_s[layer] - cut_s[layer]) <= 1e-6, (layer, all_s[layer], cut_s[layer])
    assert abs(one_s[layers[-1]] - all_s[layers[-1]]) <= 1e-6
    med = {n: tuple(median([t[i] for t in times[n]]) for i in range(3)) for n in names}
    all_t, one_t, cut_t = (med[n] for n in names)
    rows = {
        "model, task": (f"{args.model} (layers {', '.join(map(str, layers))} of 0..{n_layers}), "
                        f"{args.task} ({task_texts(task)} texts)"),
        "all layers (lensbench): total / forward (s)": f"{all_t[2]:.2f} / {all_t[0]:.2f}",
        "one layer: total / forward (s)": f"{one_t[2]:.2f} / {one_t[0]:.2f}",
        "model cut per layer (seed): total / forward / loading (s)": (
            f"{cut_t[2]:.2f} / {cut_t[0]:.2f} / {cut_t[1]:.2f}"),
        "all layers / one layer, total": f"{all_t[2] / one_t[2]:.2f} (goal <= {GOAL})",
        "all layers / one layer, forward passes": f"{all_t[0] / one_t[0]:.2f}",
        "model cut per layer / all layers, total": f"{cut_t[2] / all_t[2]:.2f}",
        "model cut per layer / all layers, forward passes": (
            f"{cut_t[0] / all_t[0]:.2f} (L = {len(layers)}; blocks run: "
            f"{sum(layers)} cut / {n_layers} whole = {sum(layers) / n_layers:.2f})"),
        "best layer (score) / last layer (score)": (
            f"{max(all_s, key=all_s.get)} ({max(all_s.values()):.4f}) / {layers[-1]} ({all_s[layers[-1]]:.4f})"),
    }
    for k, v in rows.items():
        print(f"{k}: {v}")
    if args.write_docs:
        command = "python bench/layer_sweep.py " + " ".join(sys.argv[1:])
        report(SECTION,
               f"`{command}`: MTEB scores of the given layers of one model on one task, three ways in one "
               "process (medians over repetitions, order rotating): all layers from one forward pass per batch "
               "(what layer_sweep does, the model's final norm applied to every layer), the last layer alone, and "
               "the seed's way as information_flow does it: per layer, the model loaded again cut to that many "
               "blocks (`config.num_hidden_layers = l`), one forward pass over the task, `hidden_states[l]`. "
               "Scores agree to 1e-6 before any time is reported.",
               f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), "
               f"{args.reps} repetition(s)", rows,
               ("One torch thread: with two, other work on the same two cores made single forward passes vary "
                "from 0.8 s to 18 s, and no ratio was stable. " if torch.get_num_threads() == 1 else "") +
               "Forward = time spent in the model's forward passes; loading = reading the cut models (the "
               "whole model is loaded once, before the clock starts); the rest is MTEB's evaluation (for STS: "
               "cosine similarities and a correlation per layer; for classification: logistic regressions, which "
               "grow with the number of layers scored). A model cut to l blocks runs l of the n blocks, so the "
               "seed's forward passes cost the sum of the layers swept over n whole passes, not one whole pass "
               "per layer.")


if __name__ == "__main__":
    main()
