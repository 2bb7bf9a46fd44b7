"""Catalogue cases of layer_sweep's embedding options: a ``layer_norm`` or ``metrics_layer_norm``
that is neither ``final`` nor ``none`` is one line naming the field and both values."""

from __future__ import annotations

SWEEP = ("predict", "--model", "layer_sweep", "--model.init_args.models", "[tiny]", "--model.init_args.batch_size",
         "8", "--data", "lensbench.layer_sweep.data.LayerSweepData", "--data.init_args.tasks", "[sts]",
         "--trainer.accelerator", "cpu")

#: id -> (arguments, exit code, fragment of the one line)
CASES = {
    "sweep_unknown_layer_norm": ((*SWEEP, "--model.init_args.layer_norm", "rms"), 1,
                                 "model.init_args.layer_norm: unknown layer_norm 'rms'; use final (the model's final "
                                 "norm on every layer, as information_flow) or none (raw hidden states)"),
    "sweep_unknown_metrics_layer_norm": ((*SWEEP, "--model.init_args.metrics_layer_norm", "true"), 1,
                                         "model.init_args.metrics_layer_norm: unknown metrics_layer_norm 'true'; use "
                                         "final"),
}
