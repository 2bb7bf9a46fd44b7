"""Run folders: default places per analysis, extending a finished run, refusing changed data, run logs."""

from __future__ import annotations

import json

import pandas as pd
from conftest import lensbench
from helpers_cli import last_line, snapshot
from tiny import write_texts


def _stored_keys(run_dir) -> list[str]:
    return [json.loads(line)["key"] for shard in sorted((run_dir / "shards").glob("*.jsonl"))
            for line in shard.read_text().splitlines() if line.strip()]


def test_extending_a_run_computes_only_new_items_and_changed_data_is_refused(workdir):
    run_dir = workdir / "outputs" / "activation_norms" / "run"  # <analysis>/<config stem>
    first = lensbench("predict", "--config", "run.yaml", "--data.init_args.datasets", "[alpha.txt]", cwd=workdir)
    assert first.returncode == 0, first.stderr[-2000:]
    assert sorted(pd.read_csv(run_dir / "activation_norms.csv")["dataset"].unique()) == ["alpha"]
    alpha_keys = _stored_keys(run_dir)
    assert len(alpha_keys) == 6  # 23 texts in batches of 4

    # Adding a dataset extends the run: only beta's 3 batches are computed, alpha's are not redone.
    second = lensbench("predict", "--config", "run.yaml", cwd=workdir)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "9 work items, 6 already stored" in second.stdout + second.stderr
    keys = _stored_keys(run_dir)
    assert keys[:6] == alpha_keys and len(keys) == len(set(keys)) == 9
    table = pd.read_csv(run_dir / "activation_norms.csv")
    assert sorted(table["dataset"].unique()) == ["alpha", "beta"]

    # A stored batch whose texts changed is refused before anything is written.
    before = snapshot(run_dir)
    lines = (workdir / "alpha.txt").read_text().splitlines()
    (workdir / "alpha.txt").write_text("\n".join(["moss on the moon", *lines[1:]]) + "\n")
    changed = lensbench("predict", "--config", "run.yaml", cwd=workdir)
    assert changed.returncode != 0
    line = last_line(changed.stderr)
    assert line.startswith("lensbench: error: data.init_args.datasets:"), line
    assert "holds results computed on other content" in line and '["tiny","alpha",0,4]' in line, line
    assert snapshot(run_dir) == before

    # A setting that changes what a record means is still refused, and says which.
    refused = lensbench("predict", "--config", "run.yaml", "--model.init_args.max_length", "7", cwd=workdir)
    assert refused.returncode != 0 and "model.init_args.max_length" in last_line(refused.stderr)
    assert snapshot(run_dir) == before


def test_fewer_items_merge_only_what_the_config_plans(workdir):
    run_dir = workdir / "outputs" / "activation_norms" / "run"
    assert lensbench("predict", "--config", "run.yaml", cwd=workdir).returncode == 0
    both = pd.read_csv(run_dir / "activation_norms.csv")
    fewer = lensbench("predict", "--config", "run.yaml", "--data.init_args.datasets", "[beta.txt]", cwd=workdir)
    assert fewer.returncode == 0, fewer.stderr[-2000:]
    assert "3 work items, 3 already stored" in fewer.stdout + fewer.stderr
    only_beta = pd.read_csv(run_dir / "activation_norms.csv")
    assert sorted(only_beta["dataset"].unique()) == ["beta"]
    pd.testing.assert_frame_equal(only_beta.reset_index(drop=True),
                                  both[both["dataset"] == "beta"].reset_index(drop=True))
    assert len(_stored_keys(run_dir)) == 9  # alpha's records are kept, not merged


def test_run_log_and_quiet_console(workdir):
    write_texts(workdir / "gamma.txt", 5, seed=3)
    proc = lensbench("predict", "--config", "run.yaml", "--data.init_args.datasets", "[gamma.txt]",
                     "--model.init_args.experiment", "logged", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = proc.stdout + proc.stderr
    assert "Tip:" not in console and "litlogger" not in console and "litmodels" not in console
    assert "Predicting" in proc.stdout  # Lightning's progress bar is kept
    log = (workdir / "outputs" / "logged" / "logs" / "rank0.log").read_text(encoding="utf-8")
    assert "loaded tiny on cpu" in log  # a console message reaches the log
    assert "2 work items, 0 already stored" in log  # Lightning-side info too
    assert "rank 0: 2/2 work items (100%)" in log and "memory: rss" in log  # progress, file only
    assert "work items (100%)" not in console
    assert "merged: activation_norms.csv" in log
    # A second run appends to the same log.
    again = lensbench("predict", "--config", "run.yaml", "--data.init_args.datasets", "[gamma.txt]",
                      "--model.init_args.experiment", "logged", cwd=workdir)
    assert again.returncode == 0
    log = (workdir / "outputs" / "logged" / "logs" / "rank0.log").read_text(encoding="utf-8")
    assert "2 work items, 2 already stored" in log and log.count("merged: activation_norms.csv") == 2


PERTURBATION_YAML = (
    "model:\n  class_path: perturbation\n  init_args:\n    model: tiny\n"
    "    perturbation: {method: mult_gauss, param_group: mlp_only, levels: [0.5], n_rep: 1, seed: 42}\n"
    "    generation: {do_sample: true, max_new_tokens: 4, max_batch_size: 2}\n"
    "    perplexity: {file: ppl.txt, max_length: 16}\n"
    "data:\n  class_path: lensbench.data.modules.PromptDataModule\n  init_args:\n    prompts: [p.txt]\n"
    "trainer:\n  accelerator: cpu\n  devices: 1\n"
)


def test_a_perturbation_sweep_extends_with_repetitions_levels_prompts_and_batch_size(workdir):
    write_texts(workdir / "p.txt", 3, seed=5)
    write_texts(workdir / "ppl.txt", 4, seed=6)
    (workdir / "sweep.yaml").write_text(PERTURBATION_YAML)
    run_dir = workdir / "outputs" / "perturbation" / "sweep"
    first = lensbench("predict", "--config", "sweep.yaml", cwd=workdir)
    assert first.returncode == 0, first.stderr[-2000:]
    stored = {json.loads(line)["key"]: line for line in (run_dir / "shards" / "rank00000.jsonl").read_text().splitlines()}
    assert len(stored) == 2 * 3  # (baseline, 0.5) x 3 prompts

    more = lensbench("predict", "--config", "sweep.yaml", "--model.init_args.perturbation.n_rep", "2",
                     "--model.init_args.perturbation.levels", "[0.5, 1.0]", "--model.init_args.generation.max_batch_size", "3",
                     cwd=workdir)
    assert more.returncode == 0, more.stderr[-2000:]
    assert "18 work items, 6 already stored" in more.stderr and "12 to do" in more.stderr
    lines = (run_dir / "shards" / "rank00000.jsonl").read_text().splitlines()
    assert len(lines) == 18 and lines[:6] == list(stored.values())  # first records untouched
    summary = pd.read_csv(run_dir / "summary.csv")
    assert summary["level_value"].tolist() == [0.0, 0.5, 1.0] and summary["n_outputs"].tolist() == [6, 6, 6]

    for option, value in (("--model.init_args.generation.max_new_tokens", "5"),
                          ("--model.init_args.perturbation.seed", "7"),
                          ("--model.init_args.perturbation.method", "add_gauss")):
        refused = lensbench("predict", "--config", "sweep.yaml", option, value, cwd=workdir)
        assert refused.returncode != 0
        assert option.removeprefix("--") in last_line(refused.stderr), last_line(refused.stderr)
    write_texts(workdir / "ppl.txt", 4, seed=7)  # the scored text changed under the same path
    refused = lensbench("predict", "--config", "sweep.yaml", cwd=workdir)
    assert refused.returncode != 0 and "inputs_fingerprint.perplexity_text_sha256" in last_line(refused.stderr)
    assert len((run_dir / "shards" / "rank00000.jsonl").read_text().splitlines()) == 18


def test_a_batch_that_grows_is_a_new_item(workdir):
    grown = workdir / "outputs" / "activation_norms" / "run"
    small = lensbench("predict", "--config", "run.yaml", "--data.init_args.datasets", "[alpha.txt]",
                      "--data.init_args.max_examples", "6", cwd=workdir)
    assert small.returncode == 0, small.stderr[-2000:]
    assert _stored_keys(grown) == ['["tiny","alpha",0,4]', '["tiny","alpha",4,6]']
    full = lensbench("predict", "--config", "run.yaml", cwd=workdir)  # 23 + 9 texts, batches of 4
    assert full.returncode == 0, full.stderr[-2000:]
    assert "9 work items, 1 already stored" in full.stderr
    fresh = lensbench("predict", "--config", "run.yaml", "--model.init_args.experiment", "fresh", cwd=workdir)
    assert fresh.returncode == 0
    pd.testing.assert_frame_equal(pd.read_csv(grown / "activation_norms.csv"),
                                  pd.read_csv(workdir / "outputs" / "fresh" / "activation_norms.csv"))


def test_a_failed_run_releases_its_log_and_folder(workdir, monkeypatch):
    import logging

    from lensbench.analyses.activation_norms import ActivationNorms
    from lensbench.cli import main

    monkeypatch.chdir(workdir)
    captured = {name: list(logging.getLogger(name).handlers) for name in ("lightning.pytorch", "lensbench.run")}
    args = ["predict", "--config", "run.yaml", "--data.init_args.datasets", "[beta.txt]"]

    def boom(self, item):
        raise RuntimeError("boom")

    with monkeypatch.context() as patch:
        patch.setattr(ActivationNorms, "process", boom)
        try:
            main(args)
        except RuntimeError as exc:
            assert str(exc) == "boom"
        else:
            raise AssertionError("the run did not fail")
    assert {name: list(logging.getLogger(name).handlers) for name in captured} == captured
    log = (workdir / "outputs" / "activation_norms" / "run" / "logs" / "rank0.log").read_text()
    assert "run stopped: RuntimeError: boom" in log
    assert main(args) == 0  # the folder is not left locked
    assert sorted(pd.read_csv(workdir / "outputs" / "activation_norms" / "run" / "activation_norms.csv")["dataset"].unique()) == ["beta"]


def test_a_run_folder_of_an_older_lensbench_is_named_as_such(workdir):
    run_dir = workdir / "outputs" / "activation_norms" / "run"
    args = ("predict", "--config", "run.yaml", "--data.init_args.datasets", "[beta.txt]")
    assert lensbench(*args, cwd=workdir).returncode == 0
    identity = json.loads((run_dir / "run.json").read_text())
    identity["data_fingerprint.datasets_sha256.beta"] = "0123456789abcdef"  # as older versions wrote
    (run_dir / "run.json").write_text(json.dumps(identity))
    before = snapshot(run_dir)
    old = lensbench(*args, cwd=workdir)
    assert old.returncode != 0
    line = last_line(old.stderr)
    assert line.startswith("lensbench: error: model.init_args.experiment:") and "older lensbench" in line, line
    assert snapshot(run_dir) == before


def test_a_folder_holding_no_record_takes_the_settings_of_the_next_run(workdir):
    """A run killed before its first record (an OOM kill while loading, say) left run.json and a
    shard with at most a torn line: the same command with corrected settings is not refused, and
    once a record is stored other settings are refused again."""
    run_dir = workdir / "outputs" / "activation_norms" / "run"
    args = ("predict", "--config", "run.yaml", "--data.init_args.datasets", "[beta.txt]")
    assert lensbench(*args, cwd=workdir).returncode == 0
    for table in run_dir.glob("*.csv"):
        table.unlink()
    shard = run_dir / "shards" / "rank00000.jsonl"
    shard.write_bytes(b'{"key": "[\\"tiny\\", \\"be')  # a torn first line: no record
    corrected = lensbench(*args, "--model.init_args.max_length", "7", cwd=workdir)
    assert corrected.returncode == 0, corrected.stderr[-2000:]
    assert json.loads((run_dir / "run.json").read_text())["model.init_args.max_length"] == 7
    assert "held no result: it takes this run's settings" in (run_dir / "logs" / "rank0.log").read_text()
    assert len(_stored_keys(run_dir)) == 3
    before = snapshot(run_dir)
    refused = lensbench(*args, "--model.init_args.max_length", "9", cwd=workdir)
    assert refused.returncode == 1 and "changed: model.init_args.max_length" in last_line(refused.stderr)
    assert snapshot(run_dir) == before

    # a run.json left damaged, with no record stored, is replaced too
    shard.write_bytes(b"")
    (run_dir / "run.json").write_text('{"model.init_args.max')
    again = lensbench(*args, cwd=workdir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((run_dir / "run.json").read_text())["model.init_args.max_length"] != 7


def test_a_fingerprint_of_an_older_lensbench_is_named_as_such(tmp_path):
    """A folder whose run.json holds a sampled fingerprint (16 hex digits, an older lensbench) is
    refused, and the line says why: the sample cannot show the weights unchanged."""
    import pytest

    from lensbench.analysis import Analysis
    from lensbench.errors import LensbenchError

    run = Analysis(experiment="x", output_dir=str(tmp_path))
    (tmp_path / "x" / "shards").mkdir(parents=True)
    (tmp_path / "x" / "shards" / "rank00000.jsonl").write_text('{"key": "k", "state": "s"}\n')
    (tmp_path / "x" / "run.json").write_text(json.dumps({"model_fingerprint.m": "0123456789abcdef"}))
    run.run_identity = {"model_fingerprint.m": "v2:0123456789abc"}
    with pytest.raises(LensbenchError, match="the weights of m changed since it started; the fingerprints of m "
                                             "were made by an older lensbench"):
        run.check_run_dir()
    (tmp_path / "x" / "run.json").write_text(json.dumps({"model_fingerprint.m": "v2:fedcba9876543"}))
    with pytest.raises(LensbenchError) as refused:
        run.check_run_dir()
    assert "older lensbench" not in str(refused.value)
