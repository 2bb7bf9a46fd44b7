"""param_diff end to end through the console script: exact statistics, mismatches, DDP, errors."""

from __future__ import annotations

import math
import shutil

import pandas as pd
import pytest
import torch
from conftest import lensbench
from safetensors.torch import load_file, save_file
from tiny import save_tiny_llama

CHANGED = "model.layers.1.mlp.down_proj.weight"
NOISY = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("diff")
    base = save_tiny_llama(root / "base", layers=3)
    state = load_file(base / "model.safetensors")
    # "edited": a rank-1 change of one matrix and a random change of another
    edited = root / "edited"
    shutil.copytree(base, edited)
    g = torch.Generator().manual_seed(7)
    u, v = torch.randn(32, 1, generator=g), torch.randn(1, 64, generator=g)
    noise = 0.01 * torch.randn(state[NOISY].shape, generator=g)
    new = dict(state)
    new[CHANGED] = state[CHANGED] + u @ v
    new[NOISY] = state[NOISY] + noise
    save_file(new, edited / "model.safetensors", metadata={"format": "pt"})
    # "broken": one matrix missing, one with another shape
    broken = root / "broken"
    shutil.copytree(base, broken)
    partial = {k: t for k, t in state.items() if k != "model.layers.2.mlp.up_proj.weight"}
    partial["model.layers.2.self_attn.o_proj.weight"] = torch.zeros(16, 32)
    save_file(partial, broken / "model.safetensors", metadata={"format": "pt"})
    (root / "diff.yaml").write_text(
        "model:\n  class_path: param_diff\n"
        "data:\n  class_path: lensbench.data.checkpoints.CheckpointPairs\n  init_args:\n"
        "    base: base\n    others: [edited, broken]\n"
        "trainer: {accelerator: cpu, devices: 1}\n")
    return root, state, {"uv": u @ v, "noise": noise}


def test_statistics_mismatches_and_resume(checkpoints):
    root, state, deltas = checkpoints
    result = lensbench("predict", "--config", "diff.yaml", cwd=root)
    assert result.returncode == 0, result.stderr
    run = root / "outputs" / "param_diff" / "diff"
    per_matrix = pd.read_csv(run / "per_matrix.csv").set_index(["other", "name"])
    edited = per_matrix.loc["edited"]
    assert len(edited) == 3 * 7 + 1  # 7 linear layers per block + the untied lm_head
    unchanged = edited.drop([CHANGED, NOISY])
    assert (unchanged["dW_fro"] == 0).all() and (unchanged["rel_change"] == 0).all()
    assert unchanged["dW_stable_rank"].isna().all()  # undefined without a change, not 0
    assert edited["expert"].isna().all()
    rank1 = edited.loc[CHANGED]
    exact = torch.linalg.matrix_norm(deltas["uv"].double(), ord=2).item()
    assert rank1["dW_fro"] == pytest.approx(torch.linalg.matrix_norm(deltas["uv"]).item(), rel=1e-5)
    assert rank1["dW_spec"] == pytest.approx(exact, rel=1e-4)
    assert rank1["dW_stable_rank"] == pytest.approx(1.0, rel=1e-4)
    assert rank1["W_fro"] == pytest.approx(torch.linalg.matrix_norm(state[CHANGED]).item(), rel=1e-6)
    assert rank1["rel_change"] == pytest.approx(rank1["dW_fro"] / rank1["W_fro"])
    assert (rank1["layer"], rank1["module"], rank1["shape"]) == (1, "mlp.down_proj", "32x64")
    noisy = edited.loc[NOISY]
    exact_noise = torch.linalg.matrix_norm(deltas["noise"].double(), ord=2).item()
    # 1e-4 (the default tol), no longer 1e-3: power iteration's stopping rule could stop 1e-3 short
    assert noisy["dW_spec"] == pytest.approx(exact_noise, rel=1e-4) and noisy["dW_spec_converged"]
    assert noisy["dW_stable_rank"] > 3  # a random change spreads over many directions
    assert edited.loc[NOISY, "W_spec"] == pytest.approx(torch.linalg.matrix_norm(state[NOISY].double(), ord=2).item(), rel=1e-4)
    # the tiny model's matrices (smaller side <= exact_max_dim) get exact spectral norms by default
    assert (per_matrix[["dW_spec_method", "W_spec_method"]] == "exact").all().all()
    assert (per_matrix[["dW_spec_iters", "W_spec_iters", "dW_spec_bound", "W_spec_bound"]] == 0).all().all()
    assert per_matrix[["dW_spec_converged", "W_spec_converged"]].all().all()

    per_layer = pd.read_csv(run / "per_layer.csv").set_index(["other", "layer"])
    layer1 = per_layer.loc[("edited", 1)]
    assert layer1["n_matrices"] == 7 and layer1["n_changed"] == 1
    assert layer1["mean_dW_stable_rank"] == pytest.approx(1.0, rel=1e-4)  # over the changed matrix only
    assert per_layer.loc[("edited", 2), "n_changed"] == 0 and pd.isna(per_layer.loc[("edited", 2), "mean_dW_stable_rank"])
    assert layer1["dW_fro_layer"] == pytest.approx(rank1["dW_fro"], rel=1e-9)  # the only change in layer 1
    layer0 = per_layer.loc[("edited", 0)]
    assert layer0["dW_fro_layer"] == pytest.approx(noisy["dW_fro"], rel=1e-9)
    assert per_layer.loc[("edited", 2), "dW_fro_layer"] == 0

    mismatches = pd.read_csv(run / "mismatches.csv")
    assert sorted(zip(mismatches["other"], mismatches["name"], mismatches["reason"])) == [
        ("broken", "model.layers.2.mlp.up_proj.weight", "missing in other"),
        ("broken", "model.layers.2.self_attn.o_proj.weight", "shape differs"),
    ]
    assert mismatches.set_index("name").loc["model.layers.2.self_attn.o_proj.weight", "other_shape"] == "16x32"
    assert len(per_matrix.loc["broken"]) == 3 * 7 + 1 - 2  # the run went on for the rest
    for stat in ("dW_fro", "rel_change", "dW_spec", "dW_stable_rank"):
        assert (run / f"param_diff_{stat}.png").stat().st_size > 1000
    for stat in ("dW_fro_layer", "rel_change_layer", "mean_dW_stable_rank"):
        assert (run / f"param_diff_layer_{stat}.png").stat().st_size > 1000
    skipped = pd.read_csv(run / "skipped.csv")
    assert list(zip(skipped["name"], skipped["reason"])) == [("model.embed_tokens.weight", "embedding")]
    assert "skipping 1 (1 embedding): listed in skipped.csv" in result.stderr + result.stdout

    before = (run / "per_matrix.csv").read_bytes()
    again = lensbench("predict", "--config", "diff.yaml", cwd=root)
    assert again.returncode == 0 and "0 to do" in again.stderr + again.stdout
    assert (run / "per_matrix.csv").read_bytes() == before


def test_lanczos_matches_the_exact_values_and_bad_methods_are_refused(checkpoints):
    root, state, deltas = checkpoints
    result = lensbench("predict", "--config", "diff.yaml", "--model.init_args.experiment", "lanczos",
                       "--model.init_args.spectral_method", "lanczos", "--data.init_args.others", "[edited]", cwd=root)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(root / "outputs" / "lanczos" / "per_matrix.csv").set_index("name")
    assert (table[["dW_spec_method", "W_spec_method"]] == "lanczos").all().all()
    assert table[["dW_spec_converged", "W_spec_converged"]].all().all()
    for name, row in table.iterrows():
        w = state[name].double()
        assert row["W_spec"] == pytest.approx(torch.linalg.matrix_norm(w, ord=2).item(), rel=1e-4)
        assert 0 <= row["W_spec_bound"] <= 1e-4 * row["W_spec"] and row["W_spec_iters"] >= 1
    for name, delta in ((NOISY, deltas["noise"]), (CHANGED, deltas["uv"])):
        assert table.loc[name, "dW_spec"] == pytest.approx(torch.linalg.matrix_norm(delta.double(), ord=2).item(), rel=1e-4)
    assert (table.drop([NOISY, CHANGED])["dW_spec"] == 0).all()
    bad = lensbench("predict", "--config", "diff.yaml", "--model.init_args.experiment", "bad",
                    "--model.init_args.spectral_method", "svd", cwd=root)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == (
        "lensbench: error: model.init_args.spectral_method: must be one of auto, lanczos, power, exact, got 'svd'")


def test_two_processes_match_one(checkpoints):
    root, _, _ = checkpoints
    one = lensbench("predict", "--config", "diff.yaml", "--model.init_args.experiment", "one", cwd=root)
    two = lensbench("predict", "--config", "diff.yaml", "--model.init_args.experiment", "two",
                    "--trainer.devices", "2", "--trainer.strategy", "ddp", cwd=root)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert len(list((root / "outputs" / "two" / "shards").glob("*.jsonl"))) == 2
    a = pd.read_csv(root / "outputs" / "one" / "per_matrix.csv")
    b = pd.read_csv(root / "outputs" / "two" / "per_matrix.csv")
    pd.testing.assert_frame_equal(a, b, rtol=1e-5)


def test_checkpoints_of_different_architectures_are_refused(checkpoints, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    root, _, _ = checkpoints
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    result = lensbench("predict", "--config", "diff.yaml", "--data.init_args.others", f"[{tmp_path / 'gpt2'}]",
                       "--model.init_args.experiment", "arch", cwd=root)
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("lensbench: error: data.init_args.others[0]:")
    assert "'gpt2'" in line and "'llama'" in line and "Traceback" not in result.stderr


def test_mixture_of_experts_matrices_are_compared_with_their_expert_index(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "base")
    state = load_file(tmp_path / "base" / "model.safetensors")
    expert = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    router = "model.layers.0.block_sparse_moe.gate.weight"
    assert expert in state and router in state, sorted(state)[:8]
    shutil.copytree(tmp_path / "base", tmp_path / "tuned")
    changed = dict(state)
    changed[expert] = state[expert] + 0.1
    changed[router] = state[router] * 2
    save_file(changed, tmp_path / "tuned" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "moe.yaml").write_text(
        "model:\n  class_path: param_diff\n"
        "data:\n  class_path: lensbench.data.checkpoints.CheckpointPairs\n  init_args:\n"
        "    base: base\n    others: [tuned]\n"
        "trainer: {accelerator: cpu, devices: 1}\n")
    result = lensbench("predict", "--config", "moe.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "outputs" / "param_diff" / "moe"
    per_matrix = pd.read_csv(run / "per_matrix.csv")
    two_d = [n for n, t in state.items() if t.ndim == 2]
    skipped = pd.read_csv(run / "skipped.csv")
    assert sorted(per_matrix["name"]) + sorted(skipped["name"]) == sorted(two_d) or \
        sorted([*per_matrix["name"], *skipped["name"]]) == sorted(two_d)  # every 2-D weight accounted for
    assert list(skipped["reason"]) == ["embedding"]
    row = per_matrix.set_index("name").loc[expert]
    assert (row["layer"], row["module"], row["expert"]) == (1, "block_sparse_moe.experts.w1", 2)
    assert row["dW_fro"] == pytest.approx(0.1 * math.sqrt(state[expert].numel()), rel=1e-5)
    assert per_matrix.set_index("name").loc[router, "rel_change"] == pytest.approx(1.0, rel=1e-5)
    experts = per_matrix[per_matrix["expert"].notna()]
    assert len(experts) == 2 * 4 * 3 and set(experts["expert"]) == {0, 1, 2, 3}
    assert (per_matrix.loc[per_matrix["name"] != expert, "dW_fro"].drop(
        per_matrix.index[per_matrix["name"] == router]) == 0).all()


@pytest.mark.parametrize("side", ["base", "other"])
def test_a_checkpoint_saved_quantized_is_refused_before_any_work(tmp_path, tiny_model, side):
    """Its config names a quantization_config (GPTQ here): its tensors are packed values and scales."""
    import json

    from lensbench.data.checkpoints import CheckpointPairs
    from lensbench.errors import LensbenchError

    quantized = tmp_path / "gptq"
    shutil.copytree(tiny_model, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (quantized / "config.json").write_text(json.dumps(config))
    base, other = (quantized, tiny_model) if side == "base" else (tiny_model, quantized)
    pairs = CheckpointPairs(base=str(base), others=[str(other)])
    with pytest.raises(LensbenchError) as info:
        pairs.units()
    assert info.value.field == ("data.init_args.base" if side == "base" else "data.init_args.others[0]")
    assert info.value.message == (f"{quantized} holds quantized weights (gptq): param_diff compares float weights; "
                                  "give the checkpoint before quantization (or its de-quantized copy)")
    # the same folders without the quantization_config are compared
    config.pop("quantization_config")
    (quantized / "config.json").write_text(json.dumps(config))
    assert any(u.payload.kind == "diff" for u in CheckpointPairs(base=str(base), others=[str(other)]).units())


@pytest.mark.parametrize("where", ["base", "other", "of"])
def test_quantizing_on_load_is_refused_for_the_models_param_diff_compares(tiny_model, where):
    from lensbench.data.checkpoints import CheckpointPairs, PerturbedCheckpoint
    from lensbench.errors import LensbenchError
    from lensbench.models.loading import ModelSpec

    quantized = ModelSpec(str(tiny_model), load_in_8bit=True)
    base = quantized if where == "base" else str(tiny_model)
    other = {"base": str(tiny_model), "other": quantized,
             "of": PerturbedCheckpoint("mult_gauss", 0.1, param_group="mlp_only", of=quantized)}[where]
    with pytest.raises(LensbenchError) as info:
        CheckpointPairs(base=base, others=[other])
    assert info.value.field == {"base": "data.init_args.base", "other": "data.init_args.others[0]",
                                "of": "data.init_args.others[0].of"}[where] + ".load_in_8bit"
    assert info.value.message.startswith("param_diff compares float weights; remove it")
