"""param_diff against a perturbed state of a model (PerturbedCheckpoint): no edited copy on disk."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml
from conftest import ROOT, clean_env, lensbench
from tiny import save_tiny_llama

from lensbench.data.checkpoints import CheckpointPairs, PerturbedCheckpoint
from lensbench.linalg import frobenius
from lensbench.models.checkpoint import open_checkpoint
from lensbench.models.loading import ModelSpec
from lensbench.plugins import active_registries
from lensbench.state import State, SubjectManager, TransformSpec

LAYERS = 3
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NOISY = "noisy"  # mult_gauss 0.05 on mlp_only, seed 0
ABLATED = "ablated"  # ablation 0.3 on attn[1], seed 5
CONFIG = """\
model:
  class_path: param_diff
data:
  class_path: lensbench.data.checkpoints.CheckpointPairs
  init_args:
    base: base
    others:
      - perturbation: mult_gauss
        level: 0.05
      - perturbation: ablation
        level: 0.3
        param_group: attn[1]
        seed: 5
        name: ablated
      - {perturbation: add_gauss, level: 0, param_group: all}
trainer: {accelerator: cpu, devices: 1}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("perturbed")
    save_tiny_llama(root / "base", layers=LAYERS)
    (root / "diff.yaml").write_text(CONFIG)
    result = lensbench("predict", "--config", "diff.yaml", "--model.init_args.experiment", "diff", cwd=root)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(root / "outputs" / "diff" / "per_matrix.csv")
    return root, table, result


def by_hand(folder, method: str, group: str, level: float, seed: int) -> dict[str, torch.Tensor]:
    """The perturbed weights, made in this process by SubjectManager as a perturbation run does."""
    spec = ModelSpec(str(folder))
    manager = SubjectManager({"m": spec}, torch.device("cpu"), active_registries().perturbations)
    loaded = manager.activate(State("m", (TransformSpec(method, (("group", group), ("level", level)), seed),)))
    return {n: p.detach().clone() for n, p in loaded.model.named_parameters()}


def test_default_label_and_outputs(run):
    root, table, _ = run
    assert sorted(table["other"].unique()) == sorted(["base+mult_gauss(mlp_only)@0.05", ABLATED,
                                                      "base+add_gauss(all)@0"])
    assert len(table) == 3 * (LAYERS * 7 + 1)  # every linear matrix of every other, lm_head included
    assert pd.read_csv(root / "outputs" / "diff" / "mismatches.csv").empty


def test_only_the_group_changes(run):
    _, table, _ = run
    noisy = table[table["other"] == "base+mult_gauss(mlp_only)@0.05"]
    inside = noisy["module"].isin(MLP)
    assert inside.sum() == 3 * LAYERS
    assert (noisy.loc[~inside, "dW_fro"] == 0).all() and (noisy.loc[~inside, "dW_spec"] == 0).all()
    assert (noisy.loc[inside, "dW_fro"] > 0).all()
    # multiplicative N(1, 0.05) noise: ||W * 0.05 e|| ~ 0.05 ||W|| (loose: tiny 32x64 matrices)
    assert noisy.loc[inside, "rel_change"].between(0.035, 0.065).all()
    ablated = table[table["other"] == ABLATED]
    inside = (ablated["layer"] == 1) & ablated["module"].str.startswith("self_attn.")
    assert inside.sum() == 4
    assert (ablated.loc[~inside, "dW_fro"] == 0).all() and (ablated.loc[inside, "dW_fro"] > 0).all()


def test_level_zero_changes_nothing(run):
    _, table, _ = run
    zero = table[table["other"] == "base+add_gauss(all)@0"]
    assert len(zero) == LAYERS * 7 + 1
    assert (zero["dW_fro"] == 0).all() and (zero["dW_spec"] == 0).all() and (zero["W_other_fro"] == zero["W_fro"]).all()


def test_changes_are_those_of_the_perturbation_run(run):
    """dW of the run equals W - W_base with W made by SubjectManager by hand, to the stored digits."""
    root, table, _ = run
    base = open_checkpoint(ModelSpec(str(root / "base")))
    for label, (method, group, level, seed) in {"base+mult_gauss(mlp_only)@0.05": ("mult_gauss", "mlp_only", 0.05, 0),
                                               ABLATED: ("ablation", "attn[1]", 0.3, 5)}.items():
        weights = by_hand(root / "base", method, group, level, seed)
        rows = table[(table["other"] == label) & (table["dW_fro"] > 0)].set_index("name")
        assert len(rows) >= 4
        for name in list(rows.index)[:4]:
            dw = weights[name] - base.get(name)
            assert rows.loc[name, "dW_fro"] == pytest.approx(frobenius(dw), rel=1e-9)
            assert rows.loc[name, "W_other_fro"] == pytest.approx(frobenius(weights[name]), rel=1e-9)


def test_reader_serves_the_perturbed_weights_exactly(tmp_path):
    """In process: the reader's tensors are bit for bit those of SubjectManager; the other model
    perturbed may be named with `of`; a tied lm_head is not listed twice."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from tiny import tiny_tokenizer

    save_tiny_llama(tmp_path / "a", seed=0)
    save_tiny_llama(tmp_path / "b", seed=1)
    pairs = CheckpointPairs(base=str(tmp_path / "a"), others=[
        PerturbedCheckpoint("mult_gauss", 0.1, param_group="mlp_only[1]", seed=3),
        PerturbedCheckpoint("add_gauss", 0.2, param_group="attn", of=str(tmp_path / "b"), name="b_noisy"),
    ])
    assert [o.label() for o in pairs.others] == ["a+mult_gauss(mlp_only[1],seed=3)@0.1", "b_noisy"]
    for label, folder, args in (("a+mult_gauss(mlp_only[1],seed=3)@0.1", "a", ("mult_gauss", "mlp_only[1]", 0.1, 3)),
                                ("b_noisy", "b", ("add_gauss", "attn", 0.2, 0))):
        reader, weights = pairs.reader(label), by_hand(tmp_path / folder, *args)
        disk = open_checkpoint(ModelSpec(str(tmp_path / folder)))
        assert sorted(reader.names()) == sorted(disk.names()) and reader.shapes() == disk.shapes()
        for name in disk.names():
            assert torch.equal(reader.get(name), weights[name]), name
            assert torch.equal(torch.cat(list(reader.iter_rows(name, max_bytes=256))), weights[name]), name
    fingerprint = pairs.fingerprint()
    assert fingerprint["b_noisy"] != fingerprint["a"]  # the model perturbed: b
    assert fingerprint["a+mult_gauss(mlp_only[1],seed=3)@0.1"] == fingerprint["a"]

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    tiny_tokenizer().save_pretrained(tmp_path / "tied")
    tied = CheckpointPairs(base=str(tmp_path / "tied"), others=[PerturbedCheckpoint("mult_gauss", 0.1)])
    reader = tied.reader(tied.others[0].label())
    assert "lm_head.weight" not in reader.names()
    assert sorted(reader.names()) == sorted(open_checkpoint(ModelSpec(str(tmp_path / "tied"))).names())
    assert all(u.payload.kind != "mismatch" for u in tied.units())


def test_rerun_resumes(run):
    root, _, _ = run
    again = lensbench("predict", "--config", "diff.yaml", "--model.init_args.experiment", "diff", cwd=root)
    assert again.returncode == 0, again.stderr
    assert "0 to do" in again.stderr + again.stdout


@pytest.mark.parametrize("entry, field, words", [
    ("{perturbation: mult_gaus, level: 0.05}", "data.init_args.others[1].perturbation",
     ["unknown perturbation 'mult_gaus'", "did you mean 'mult_gauss'"]),
    ("{perturbation: ablation, level: 1.5}", "data.init_args.others[1].level", ["probability in [0, 1]", "1.5"]),
    ("{perturbation: mult_gauss, level: -0.1}", "data.init_args.others[1].level", [">= 0", "-0.1"]),
    ("{perturbation: uni_quant, level: 2.5}", "data.init_args.others[1].level", ["integer >= 2"]),
    ("{perturbation: mult_gauss}", "data.init_args.others[1].level", ["is missing"]),
    ("{perturbation: mult_gauss, level: 0.1, param_group: mlp_onyl}", "data.init_args.others[1].param_group",
     ["unknown parameter group 'mlp_onyl'", "did you mean 'mlp_only'"]),
])
def test_bad_entries_fail_with_one_line(run, entry, field, words):
    root, _, _ = run
    result = lensbench("predict", "--config", "diff.yaml", "--data.init_args.others", f"[base, {entry}]",
                       "--model.init_args.experiment", "bad", cwd=root)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"lensbench: error: {field}: "), result.stderr
    for word in words:
        assert word in line
    assert not (root / "outputs" / "bad").exists()  # refused before any work


def test_glob_matching_nothing_names_the_field(run):
    root, _, _ = run
    result = lensbench("predict", "--config", "diff.yaml", "--data.init_args.others",
                       "[{perturbation: mult_gauss, level: 0.1, param_group: model.layers.9.mlp.up_proj.weight}]",
                       "--model.init_args.experiment", "badglob", cwd=root)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("lensbench: error: data.init_args.others[0].param_group: glob "), result.stderr


def test_shipped_config_parses(tmp_path):
    env = clean_env(LENSBENCH_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf"))
    result = lensbench("predict", "--config", str(ROOT / "configs" / "model_diff" / "param_stats.yaml"),
                       "--print_config", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)["data"]
    assert data["class_path"] == "lensbench.data.checkpoints.CheckpointPairs"
    assert data["init_args"]["base"] == "smollm2"
    # the mapping with `perturbation:` was read as a PerturbedCheckpoint (its defaults are filled in)
    assert data["init_args"]["others"] == [{"perturbation": "mult_gauss", "level": 0.05, "param_group": "mlp_only",
                                            "seed": 0, "of": None, "name": None}]
