"""Quantized loading (load_in_4bit / load_in_8bit through bitsandbytes) on the CPU: the weights are
really quantized, analyses run on them and agree with the float model to the quantization's
precision, float weights of a quantized model are perturbed and restored bit-exactly, quantized
ones are refused in one line. (Without bitsandbytes, or with one too old for the CPU: tests/test_device_map.py.)"""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch
from conftest import installed
from helpers_cli import last_line, make_workdir

from lensbench.errors import LensbenchError
from lensbench.models.loading import ModelSpec, load_model
from lensbench.models.quantized import _bitsandbytes_on_cpu
from lensbench.plugins import active_registries
from lensbench.state import State, SubjectManager, TransformSpec
from lensbench.testing import save_tiny_llama

pytestmark = [pytest.mark.requires("bitsandbytes"),
              pytest.mark.skipif(installed("bitsandbytes") and not _bitsandbytes_on_cpu(),
                                 reason="bitsandbytes quantizes on the CPU from 0.46: pip install 'bitsandbytes>=0.46'")]
CPU = torch.device("cpu")
QUANT = {"load_in_4bit": ("Params4bit", torch.uint8), "load_in_8bit": ("Int8Params", torch.int8)}


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """The tiny Llama at width 64: bitsandbytes' 4-bit CPU kernels quantize in blocks of 64."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny64") / "tiny", hidden=64)


def _state(group: str, level: float = 0.5) -> State:
    return State("m", (TransformSpec("mult_gauss", (("group", group), ("level", level)), 3),))


@pytest.mark.parametrize("quant", sorted(QUANT))
def test_the_linear_weights_are_quantized_and_the_rest_stay_float(tiny64, quant):
    model = load_model(ModelSpec(str(tiny64), **{quant: True}), device=CPU).model
    kind, dtype = QUANT[quant]
    weight = model.get_parameter("model.layers.1.mlp.down_proj.weight")
    assert type(weight).__name__ == kind and weight.dtype == dtype
    assert model.get_parameter("model.embed_tokens.weight").dtype == torch.float32
    assert model.get_parameter("model.norm.weight").dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is not None


@pytest.mark.parametrize("quant", sorted(QUANT))
def test_float_weights_of_a_quantized_model_are_perturbed_and_restored_and_quantized_ones_refused(tiny64, quant):
    manager = SubjectManager({"m": ModelSpec(str(tiny64), **{quant: True})}, CPU, active_registries().perturbations)
    model = manager.activate(State("m")).model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    manager.activate(_state("embed_only"))
    now = dict(model.named_parameters())
    assert [n for n in before if not torch.equal(before[n], now[n])] == ["model.embed_tokens.weight"]
    with pytest.raises(LensbenchError, match=rf"v_proj.weight is quantized \(.*{quant}\)") as info:
        manager.activate(_state("attn_only"))
    assert "\n" not in info.value.message
    manager.activate(State("m"))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # bit-exact, packed bytes too


def test_activation_norms_of_quantized_models_follow_the_float_model(tmp_path, tiny64, monkeypatch):
    from lensbench.cli import main

    folder = make_workdir(tmp_path / "work", tiny64)
    run = (folder / "run.yaml").read_text()
    for quant in QUANT:
        (folder / f"{quant}.yaml").write_text(run.replace("models: [tiny]", f"models: [{{source: tiny, {quant}: true}}]"))
    monkeypatch.chdir(folder)
    monkeypatch.setattr("sys.argv", ["lensbench"])
    tables = {}
    for name in ("run", *QUANT):
        assert main(["predict", "--config", f"{name}.yaml"]) == 0
        tables[name] = pd.read_csv(folder / f"outputs/activation_norms/{name}/activation_norms.csv")
    plain = tables["run"]
    for quant, tolerance in (("load_in_8bit", 5e-3), ("load_in_4bit", 5e-2)):
        table = tables[quant]
        assert table[["model", "dataset", "layer", "n_tokens"]].equals(plain[["model", "dataset", "layer", "n_tokens"]])
        embedded = table["layer"] == 0  # the embeddings' output: float weights, the same numbers
        assert table.loc[embedded, "mean_norm"].tolist() == plain.loc[embedded, "mean_norm"].tolist()
        deeper = table.loc[~embedded, "mean_norm"].to_numpy()
        relative = abs(deeper / plain.loc[~embedded, "mean_norm"].to_numpy() - 1)
        assert relative.max() < tolerance, (quant, relative.max())
        assert relative.max() > 0, quant  # the layers computed from quantized weights
    for quant in QUANT:  # quantization is part of a run's identity (placement is not)
        identity = json.loads((folder / f"outputs/activation_norms/{quant}/run.json").read_text())
        assert identity["model.init_args.models"][0][quant] is True
        assert not [key for key in identity["model.init_args.models"][0] if key.startswith("load_in_") and key != quant]


def test_a_perturbation_run_on_a_4bit_model_records_load_4bit_and_refuses_quantized_groups(tmp_path, tiny64,
                                                                                           monkeypatch, capsys):
    from test_perturbation_runs import perturbation_yaml

    from lensbench.cli import main

    (tmp_path / "tiny").symlink_to(tiny64)
    (tmp_path / "prompts.txt").write_text("what is the capital of france\nname a color\n")
    model = "{source: tiny, load_in_4bit: true}"
    (tmp_path / "embed.yaml").write_text(perturbation_yaml(group="embed_only", levels="[0.5]", n_rep=1, model=model))
    (tmp_path / "attn.yaml").write_text(perturbation_yaml(group="attn_only", levels="[0.5]", n_rep=1, model=model))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lensbench"])
    assert main(["predict", "--config", "embed.yaml"]) == 0
    records = json.loads((tmp_path / "outputs/perturbation/embed/outputs_mult_gauss_tiny.json").read_text())
    assert {r["load_4bit"] for r in records} == {True}
    assert {tuple(r["touched_tensors"]) for r in records if not r["is_baseline"]} == {("model.embed_tokens.weight",)}
    capsys.readouterr()
    assert main(["predict", "--config", "attn.yaml"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert last_line(err).startswith("lensbench: error: model.init_args.perturbation.param_group: "
                                     "model.layers.0.self_attn.v_proj.weight is quantized (uint8, load_in_4bit)")
    # refused with the baseline, before any prompt is generated: nothing stored
    shards = tmp_path / "outputs/perturbation/attn/shards"
    assert not [p for p in shards.glob("*.jsonl") if p.read_text().strip()] if shards.exists() else True
    assert not (tmp_path / "outputs/perturbation/attn/run.json").exists()


@pytest.fixture(scope="module")
def saved_4bit(tmp_path_factory, tiny64):
    """The tiny Llama saved already quantized to 4 bits, its packed values stored as float32
    (``bnb_4bit_quant_storage``, as checkpoints prepared for sharded fine-tuning do): its config.json
    carries the ``quantization_config`` that quantizes it again on every load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    folder = tmp_path_factory.mktemp("saved_4bit") / "tiny4"
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_storage=torch.float32,
                                bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(tiny64, quantization_config=config, device_map="cpu").save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny64).save_pretrained(folder)
    return folder


def test_a_checkpoint_saved_in_4bit_with_float_storage_is_refused_and_recorded_as_4bit(saved_4bit, tiny64):
    """Its packed values are float32 tensors: the test on the dtype alone would let noise in."""
    from lensbench.models.quantized import loaded_in_4bit

    manager = SubjectManager({"m": ModelSpec(str(saved_4bit))}, CPU, active_registries().perturbations)
    model = manager.activate(State("m")).model
    weight = model.get_parameter("model.layers.0.mlp.up_proj.weight")
    assert type(weight).__name__ == "Params4bit" and weight.dtype == torch.float32  # packed, in float32
    assert loaded_in_4bit(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(LensbenchError, match=r"layers.0.mlp.gate_proj.weight is quantized \(float32, saved quantized: bitsandbytes\): "
                                             r".*perturb a float checkpoint of the model"):
        manager.activate(_state("mlp_only"))
    # refused before any change (compared as bytes: packed values read as float32 include NaNs)
    assert [n for n, p in model.named_parameters()
            if not torch.equal(p.data.view(torch.uint8), before[n].view(torch.uint8))] == []
    manager.activate(_state("embed_only"))  # its float weights are still perturbed
    assert not loaded_in_4bit(load_model(ModelSpec(str(tiny64)), device=CPU).model)
    assert not loaded_in_4bit(load_model(ModelSpec(str(tiny64), load_in_8bit=True), device=CPU).model)


@pytest.mark.parametrize("side", ["base", "other", "perturbed"])
def test_param_diff_refuses_a_checkpoint_saved_quantized_in_one_line(tmp_path, tiny64, saved_4bit, side,
                                                                     monkeypatch, capsys):
    """Base, other, or the model a perturbed other perturbs (its float embeddings only)."""
    from lensbench.cli import main

    base, other = (saved_4bit, tiny64) if side == "base" else (tiny64, saved_4bit)
    if side == "perturbed":
        other = f"{{perturbation: mult_gauss, level: 0.1, param_group: embed_only, of: {saved_4bit}}}"
    (tmp_path / "diff.yaml").write_text(
        "model:\n  class_path: param_diff\n"
        "data:\n  class_path: lensbench.data.checkpoints.CheckpointPairs\n  init_args:\n"
        f"    base: {base}\n    others: [{other}]\n"
        "trainer: {accelerator: cpu, devices: 1}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lensbench"])
    assert main(["predict", "--config", "diff.yaml"]) == 1
    err = capsys.readouterr().err
    field = "data.init_args.base" if side == "base" else r"data.init_args.others\[0\]"
    assert re.fullmatch(rf"lensbench: error: {field}: \S*tiny4( perturbed in memory by .*)? holds quantized weights "
                        r"\(bitsandbytes\): param_diff "
                        r"compares float weights; give the checkpoint before quantization \(or its de-quantized copy\)",
                        last_line(err)), err[-2000:]
    assert "Traceback" not in err
    assert not list((tmp_path / "outputs").rglob("*.jsonl")) if (tmp_path / "outputs").exists() else True
