"""Non-finite values (a block whose weights are NaN) through the real console script: every analysis
counts them in its table, says so in one console warning, and still draws its figures (also with
``lensbench plot``), the finite values drawn and the run finished."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from helpers_cli import run_many
from tiny import save_tiny_llama, write_texts
from transformers import AutoModelForCausalLM

NAN_MATRIX = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def nan_runs(tmp_path_factory):
    """``tiny`` (3 blocks) and ``nanmodel``, the same model with block 1's MLP down projection all NaN;
    activation_norms over both, param_diff of nanmodel against tiny and loop_identity of nanmodel's blocks 0..1,
    run at the same time; then ``lensbench plot`` on each run folder (figures deleted first)."""
    root = tmp_path_factory.mktemp("nonfinite")
    save_tiny_llama(root / "tiny", layers=3)
    save_tiny_llama(root / "nanmodel", layers=3)
    model = AutoModelForCausalLM.from_pretrained(root / "nanmodel")
    with torch.no_grad():
        model.get_parameter(NAN_MATRIX).fill_(math.nan)
    model.save_pretrained(root / "nanmodel")
    write_texts(root / "alpha.txt", 7, seed=1)
    cpu = ("--trainer.accelerator", "cpu")
    texts = ("--data", "lensbench.data.modules.TextDataModule", "--data.init_args.datasets", "[alpha.txt]",
             "--data.init_args.batch_size", "4")
    calls = {
        "norms": ("predict", "--model", "activation_norms", "--model.init_args.models", "[tiny, nanmodel]", *texts,
                  *cpu),
        "diff": ("predict", "--model", "param_diff", "--data", "lensbench.data.checkpoints.CheckpointPairs",
                 "--data.init_args.base", "tiny", "--data.init_args.others", "[nanmodel]", *cpu),
        "loop": ("predict", "--model", "loop_identity", "--model.init_args.baseline", "nanmodel",
                 "--model.init_args.start", "0", "--model.init_args.end", "1", "--model.init_args.loop_counts",
                 "[0, 1, 2]", *texts, *cpu),
    }
    runs = run_many({name: ((*args, "--model.init_args.experiment", name), root, None) for name, args in calls.items()})
    for name, proc in runs.items():
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    figures = {name: sorted(p.name for p in (root / "outputs" / name).glob("*.png")) for name in calls}
    for name in calls:
        for png in (root / "outputs" / name).glob("*.png"):
            png.unlink()
    plots = run_many({name: (("plot", str(root / "outputs" / name)), root, None) for name in calls})
    return root, runs, figures, plots


def _warning(proc, analysis: str, what: str = "") -> str:
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith(f"{analysis}: ")
             and f"non-finite (NaN or inf) {what}" in line]
    assert len(lines) == 1, (proc.stdout + proc.stderr)[-3000:]
    return lines[0]


def _redrawn(nan_runs, name: str, expected: list[str]) -> None:
    root, _, figures, plots = nan_runs
    assert figures[name] == sorted(expected), figures[name]
    assert plots[name].returncode == 0, plots[name].stderr[-3000:]
    assert "Traceback" not in plots[name].stderr
    for png in expected:
        assert (root / "outputs" / name / png).stat().st_size > 1000, png


def test_activation_norms_counts_nan_layers_and_says_so(nan_runs):
    root, runs, _, _ = nan_runs
    table = pd.read_csv(root / "outputs" / "norms" / "activation_norms.csv").set_index(["model", "layer"])
    n = int(table["n_tokens"].iloc[0])
    # hidden state 2 leaves block 1, whose MLP adds NaN: every token from there on
    assert table.loc["nanmodel", "n_nonfinite_norm"].tolist() == [0, 0, n, n]
    assert table.loc[("nanmodel", 2), ["mean_norm", "std_norm", "min_norm", "max_norm"]].isna().all()
    assert table.loc["nanmodel"].loc[[0, 1], "mean_norm"].notna().all()
    assert (table.loc["tiny", "n_nonfinite_norm"] == 0).all() and table.loc["tiny", "mean_norm"].notna().all()
    line = _warning(runs["norms"], "activation_norms")
    assert f"{2 * n} non-finite (NaN or inf) token statistics" in line, line
    assert f"nanmodel / alpha layer 2 (norm): {n}" in line and "n_nonfinite_<stat>" in line, line
    _redrawn(nan_runs, "norms", ["activation_norms.png"])


def test_param_diff_reports_a_nan_change_as_non_finite_not_unchanged(nan_runs):
    root, runs, _, _ = nan_runs
    run = root / "outputs" / "diff"
    per_matrix = pd.read_csv(run / "per_matrix.csv").set_index("name")
    assert math.isnan(per_matrix.loc[NAN_MATRIX, "dW_fro"])
    assert (per_matrix.drop(NAN_MATRIX)["dW_fro"] == 0).all()  # the rest is the same model
    per_layer = pd.read_csv(run / "per_layer.csv").set_index("layer")
    assert per_layer.loc[1, "n_changed"] == 0 and per_layer.loc[1, "n_nonfinite"] == 1
    assert per_layer.loc[1, ["dW_fro_layer", "rel_change_layer", "mean_dW_spec", "max_dW_spec"]].isna().all()
    others = per_layer.drop(1)
    assert (others["n_nonfinite"] == 0).all() and (others["dW_fro_layer"] == 0).all()
    line = _warning(runs["diff"], "param_diff")
    assert "1 non-finite (NaN or inf) matrix changes" in line and f"nanmodel {NAN_MATRIX}" in line, line
    _redrawn(nan_runs, "diff", [f"param_diff_{s}.png" for s in ("dW_fro", "rel_change", "dW_spec", "dW_stable_rank")]
             + [f"param_diff_layer_{s}.png" for s in ("dW_fro_layer", "rel_change_layer", "mean_dW_stable_rank")])


def test_loop_identity_with_a_nan_baseline_finishes_and_draws_what_is_finite(nan_runs):
    root, runs, _, _ = nan_runs
    table = pd.read_csv(root / "outputs" / "loop" / "loop_metrics.csv").set_index("loop_count")
    n = int(table["n_tokens"].iloc[0])
    assert table.loc[0, "n_nonfinite_tokens"] == 0 and table.loc[0, "cosine_mean"] == pytest.approx(1)
    assert table.loc[0, "cosine_median"] == pytest.approx(1, rel=1e-3)
    for k in (1, 2):  # h_out leaves block 1: NaN for every token
        assert table.loc[k, "n_nonfinite_tokens"] == n
        assert table.loc[k, ["cosine_mean", "cosine_median", "mse_mean", "step_rel_change_mean"]].isna().all()
        assert math.isnan(table.loc[k, "perplexity"])
    assert math.isfinite(table.loc[0, "perplexity"])  # k = 0 skips the NaN block
    line = _warning(runs["loop"], "loop_identity", "tokens")
    assert f"{2 * n} non-finite (NaN or inf) tokens" in line and f"baseline / alpha k=1: {n}" in line, line
    assert "n_nonfinite_tokens" in line, line
    line = _warning(runs["loop"], "loop_identity", "perplexities")
    assert line.startswith("loop_identity: 2 non-finite (NaN or inf) perplexities (baseline / alpha k=1: 1; "
                           "baseline / alpha k=2: 1); left as NaN or inf in loop_metrics.csv"), line
    _redrawn(nan_runs, "loop", ["cosine_similarity_vs_loop_count.png", "mse_vs_loop_count.png",
                                "norm_diff_vs_loop_count.png", "convergence_vs_loop_count.png",
                                "perplexity_vs_loop_count.png"])


def test_the_warning_line_is_one_line_and_absent_without_non_finite_values(monkeypatch):
    from lensbench.logs import console
    from lensbench.stats import nonfinite_warning

    said: list[str] = []
    monkeypatch.setattr(console, "warning", said.append)
    assert nonfinite_warning("x", {"a": 0, "b": 0}, "values", "n_bad", "t.csv") is None and said == []
    line = nonfinite_warning("x", {f"p{i}": i for i in range(6)}, "values", "n_bad", "t.csv")
    assert line.startswith("x: 15 non-finite (NaN or inf) values (p1: 1; p2: 2; p3: 3; and 2 more)")
    assert "\n" not in line and said == [line]
