"""``lensbench pipeline``: param_diff and activation_norms of one base and others named once, and a
summary whose figures follow from the two steps' tables."""

from __future__ import annotations

import math
import shutil

import pandas as pd
import pytest
import yaml

from lensbench.cli import main


@pytest.fixture
def pipeline(tmp_path, tiny_model):
    shutil.copytree(tiny_model, tmp_path / "copy")  # identical weights: no change at all
    (tmp_path / "texts.txt").write_text("".join(f"the cat sat on a mat number {i}\n" for i in range(6)))
    config = {
        "base": str(tiny_model),
        "others": [str(tmp_path / "copy"),
                   {"perturbation": "mult_gauss", "level": 0.2, "param_group": "mlp_only", "seed": 3}],
        "experiment": "diff",
        "activation_norms": {"datasets": [str(tmp_path / "texts.txt")], "batch_size": 4},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
    }
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def run(folder, monkeypatch, *args) -> int:
    monkeypatch.chdir(folder)
    return main(["pipeline", "--config", "pipeline.yaml", *args])


def test_both_steps_run_and_the_summary_follows_from_their_tables(pipeline, monkeypatch):
    assert run(pipeline, monkeypatch) == 0
    out = pipeline / "outputs" / "diff"
    per_matrix = pd.read_csv(out / "param_diff" / "per_matrix.csv")
    norms = pd.read_csv(out / "activation_norms" / "activation_norms.csv")
    summary = pd.read_csv(out / "summary.csv").set_index("model")
    perturbed = "tiny+mult_gauss(mlp_only,seed=3)@0.2"
    assert sorted(summary.index) == sorted(["copy", perturbed])
    assert set(norms["model"]) == {"tiny", "copy", perturbed}  # the models named once, in both steps
    copy = summary.loc["copy"]
    assert copy["n_changed"] == copy["n_nonfinite"] == 0 and copy["rel_change_total"] == 0
    assert copy["rel_norm_change_texts"] == 0 and copy["max_rel_norm_change_texts"] == 0
    g = per_matrix[per_matrix["other"] == perturbed]
    row = summary.loc[perturbed]
    assert row["n_changed"] == (g["dW_fro"] > 0).sum() == 2 * 3  # gate, up, down of 2 blocks
    assert row["rel_change_total"] == pytest.approx(math.sqrt((g["dW_fro"] ** 2).sum() / (g["W_fro"] ** 2).sum()))
    base = norms[norms["model"] == "tiny"].set_index("layer")["mean_norm"]
    mine = norms[norms["model"] == perturbed].set_index("layer")["mean_norm"]
    assert row["rel_norm_change_texts"] == pytest.approx(((mine - base) / base).mean())
    assert row["rel_norm_change_texts"] != 0
    for step in ("param_diff", "activation_norms"):
        config = yaml.safe_load((out / "steps" / f"{step}.yaml").read_text())
        assert config["model"]["init_args"]["experiment"] == f"diff/{step}"

    before = (out / "summary.csv").read_bytes()
    assert run(pipeline, monkeypatch) == 0  # both steps resume: nothing recomputed
    assert (out / "summary.csv").read_bytes() == before


def test_print_steps_and_bad_keys(pipeline, monkeypatch, capsys):
    assert run(pipeline, monkeypatch, "--print_steps") == 0
    steps = yaml.safe_load(capsys.readouterr().out)
    assert steps["param_diff"]["data"]["init_args"]["others"][0].endswith("copy")
    models = steps["activation_norms"]["model"]["init_args"]["models"]
    assert models[2]["transforms"] == [{"name": "mult_gauss", "seed": 3, "params": {"group": "mlp_only", "level": 0.2}}]
    assert not (pipeline / "outputs").exists()
    config = yaml.safe_load((pipeline / "pipeline.yaml").read_text())
    config["activation_norm"] = config.pop("activation_norms")
    (pipeline / "pipeline.yaml").write_text(yaml.safe_dump(config))
    assert run(pipeline, monkeypatch) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'activation_norm'; did you mean 'activation_norms'" in err[0]


def test_the_float32_matmul_precision_reaches_both_steps(pipeline, monkeypatch):
    import json

    config = yaml.safe_load((pipeline / "pipeline.yaml").read_text())
    config["float32_matmul_precision"] = "medium"
    (pipeline / "pipeline.yaml").write_text(yaml.safe_dump(config))
    assert run(pipeline, monkeypatch) == 0
    for step in ("param_diff", "activation_norms"):
        run_json = json.loads((pipeline / "outputs" / "diff" / step / "run.json").read_text())
        assert run_json["float32_matmul_precision"] == "medium", step

