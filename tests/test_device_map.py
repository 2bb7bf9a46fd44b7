"""Models placed by a device_map (explicit maps, accelerate's CPU and disk offload) on the CPU:
the same outputs as the plain load, perturbations and restores bit-exact, the same fingerprint
and the same activation_norms table; quantization refused in one line where it cannot run."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from helpers_cli import last_line, make_workdir

from lensbench.errors import LensbenchError
from lensbench.models import placement, quantized
from lensbench.models.fingerprint import model_fingerprint, weight_settings
from lensbench.models.loading import ModelSpec, load_model, resolve_source
from lensbench.models.placed_weights import editable_weights
from lensbench.plugins import active_registries
from lensbench.state import State, SubjectManager, TransformSpec

MODULES = ("model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb", "lm_head")
#: Every module of the tiny Llama on the CPU, but through transformers' device_map path.
CPU_MAP = {m: "cpu" for m in MODULES}
#: Layer 1 offloaded to the disk (read from the checkpoint at each forward).
DISK_MAP = {**CPU_MAP, "model.layers.1": "disk"}
IDS = torch.tensor([[1, 5, 6, 7, 8, 9, 10], [1, 11, 12, 13, 14, 0, 0]])
MASK = (IDS != 0).long()


def _manager(spec: ModelSpec) -> SubjectManager:
    return SubjectManager({"m": spec}, torch.device("cpu"), active_registries().perturbations)


def _cpu_offloaded(folder) -> SubjectManager:
    """The plain model under accelerate's ``cpu_offload``: every weight on the meta device, its values
    in the hooks' host-memory weights map (what a GPU rank gets for modules mapped to cpu)."""
    from accelerate import cpu_offload

    manager = _manager(ModelSpec(str(folder)))
    loaded = manager.activate(State("m"))
    cpu_offload(loaded.model, execution_device=torch.device("cpu"))
    assert loaded.model.get_parameter("model.layers.0.mlp.down_proj.weight").device.type == "meta"
    return manager


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight's values, read where they live (offloaded ones from their hooks)."""
    names = [n for n, _ in model.named_parameters()]
    with editable_weights(model, names):
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def _forward(model: torch.nn.Module):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK, output_hidden_states=True)


@pytest.fixture(scope="module")
def plain(tiny_model):
    loaded = load_model(ModelSpec(str(tiny_model)))
    return loaded, _forward(loaded.model)


@pytest.fixture(scope="module", params=["cpu_map", "disk_map", "cpu_offload"])
def placed(request, tiny_model):
    if request.param == "cpu_offload":
        return _cpu_offloaded(tiny_model)
    return _manager(ModelSpec(str(tiny_model), device_map=CPU_MAP if request.param == "cpu_map" else DISK_MAP))


def test_a_placed_model_gives_the_plain_logits_and_hidden_states(plain, placed):
    loaded = placed.activate(State("m"))
    ref, out = plain[1], _forward(loaded.model)
    assert torch.equal(out.logits, ref.logits)
    assert len(out.hidden_states) == len(ref.hidden_states)
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, ref.hidden_states, strict=True))
    assert loaded.input_device == torch.device("cpu")


def test_the_disk_map_really_offloads(tiny_model):
    loaded = load_model(ModelSpec(str(tiny_model), device_map=DISK_MAP))
    assert loaded.model.get_parameter("model.layers.1.mlp.up_proj.weight").device.type == "meta"
    assert loaded.model.get_parameter("model.layers.0.mlp.up_proj.weight").device.type == "cpu"


@pytest.mark.parametrize("method,level,group", [("mult_gauss", 0.3, "all"), ("ablation", 0.5, "all"),
                                                ("mult_gauss", 0.3, "mlp_only"), ("ablation", 0.5, "attn_only")])
def test_perturbation_and_restore_are_bit_exact(plain, placed, tiny_model, method, level, group):
    before = _weights(plain[0].model)
    state = State("m", (TransformSpec(method, (("group", group), ("level", level)), 7),))
    reference = _manager(ModelSpec(str(tiny_model)))
    expected = _weights(reference.activate(state).model)
    perturbed = placed.activate(state)
    got = _weights(perturbed.model)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in got), "the same seed perturbs a placed model alike"
    assert any(not torch.equal(got[n], before[n]) for n in got)
    assert torch.equal(_forward(perturbed.model).logits, _forward(reference.loaded.model).logits)
    assert placed.weights_finite()
    restored = placed.activate(State("m"))
    after = _weights(restored.model)
    assert all(torch.equal(after[n], before[n]) for n in before), "restore is bit-exact"
    assert torch.equal(_forward(restored.model).logits, plain[1].logits)


def test_the_fingerprint_does_not_depend_on_the_placement(tiny_model):
    plain = model_fingerprint(ModelSpec(str(tiny_model)))
    for dm in (CPU_MAP, DISK_MAP, "auto", "cpu"):
        assert model_fingerprint(ModelSpec(str(tiny_model), device_map=dm)) == plain
    assert weight_settings(ModelSpec(str(tiny_model), device_map="auto", max_memory={"cpu": "1GiB"})) \
        == weight_settings(ModelSpec(str(tiny_model)))
    assert "load_in_4bit" not in weight_settings(ModelSpec(str(tiny_model)))  # digests made before it stay valid


def test_without_placement_gives_the_identity_of_a_config_without_the_new_fields():
    from dataclasses import asdict

    from lensbench.models.fingerprint import without_placement

    old = {k: v for k, v in asdict(ModelSpec("tiny")).items()
           if k not in ("device_map", "max_memory", "load_in_4bit", "load_in_8bit", "allow_missing_weights")}
    config = {"model": {"init_args": {"models": [asdict(ModelSpec("tiny", device_map=DISK_MAP)), "smollm2"],
                                      "model": asdict(ModelSpec("tiny", max_memory={"cpu": "1GiB"},
                                                                device_map="auto"))}}}
    assert without_placement(config) == {"model": {"init_args": {"models": [old, "smollm2"], "model": old}}}
    assert without_placement(asdict(ModelSpec("tiny", load_in_4bit=True)))["load_in_4bit"] is True


def test_a_named_map_on_a_cpu_rank_stays_on_the_cpu(tiny_model, plain):
    assert set(placement._rank_max_memory(torch.device("cpu"))) == {"cpu"}
    loaded = load_model(ModelSpec(str(tiny_model), device_map="auto"))
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    assert torch.equal(_forward(loaded.model).logits, plain[1].logits)


def test_ranks_sharing_a_node_take_every_other_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (1000 * (i + 1), 4000))
    memory = placement._rank_max_memory(torch.device("cuda:1"))
    assert set(memory) == {1, 3, "cpu"} and memory[1] == 1800 and memory[3] == 3600
    assert set(placement._rank_max_memory(torch.device("cuda:0"))) == {0, 2, "cpu"}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(LensbenchError, match="trainer.devices"):
        placement._rank_max_memory(torch.device("cuda:0"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert placement._rank_max_memory(torch.device("cuda:0")) is None  # one rank: every GPU it sees


@pytest.mark.parametrize("spec_args,field,words", [
    ({"device_map": "everywhere"}, "device_map", "neither a strategy"),
    ({"device_map": {"model.layers.0": "gpu7"}}, "device_map", "GPU index"),
    ({"device_map": {}}, "device_map", "empty map"),
    ({"device_map": CPU_MAP, "max_memory": {"cpu": "1GiB"}}, "max_memory", "only applies"),
    ({"device_map": "auto", "max_memory": {"cpu": "lots"}}, "max_memory", "not a size"),
    ({"device_map": "auto", "max_memory": {"ram": "1GiB"}}, "max_memory", "not a device"),
    ({"load_in_4bit": True, "load_in_8bit": True}, "load_in_8bit", "choose one"),
])
def test_a_bad_placement_is_one_line_before_loading(tiny_model, spec_args, field, words):
    with pytest.raises(LensbenchError) as info:
        resolve_source(ModelSpec(str(tiny_model), **spec_args), "model.init_args.models[0]")
    assert info.value.field == f"model.init_args.models[0].{field}"
    assert words in info.value.message and "\n" not in str(info.value)


@pytest.mark.parametrize("device_map,words", [
    ({**CPU_MAP, "model.layerz": "cpu"}, "not a module"),
    ({m: "cpu" for m in MODULES if m != "lm_head"}, "no device to lm_head.weight"),
    ({"": "cpu", "model.layers.1": "disk"}, "overlap"),
])
def test_an_explicit_map_must_name_modules_once_and_cover_every_weight(tiny_model, device_map, words):
    with pytest.raises(LensbenchError, match=words) as info:
        load_model(ModelSpec(str(tiny_model), device_map=device_map))
    assert info.value.field == "model.device_map"


@pytest.mark.parametrize("quant", ["load_in_4bit", "load_in_8bit"])
def test_quantization_without_bitsandbytes_is_one_line(tiny_model, quant, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(LensbenchError) as info:
        resolve_source(ModelSpec(str(tiny_model), **{quant: True}), "model.init_args.model")
    assert info.value.field == f"model.init_args.model.{quant}"
    assert "pip install 'bitsandbytes>=0.46'" in info.value.message
    assert "\n" not in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("optimum") is not None, reason="optimum is installed: GPTQ may load")
def test_a_checkpoint_saved_quantized_whose_library_is_missing_is_one_line(tmp_path, tiny_model):
    """transformers raises ImportError (GPTQ needs optimum): one line naming the source and the package."""
    import shutil

    folder = tmp_path / "gptq"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LensbenchError) as info:
        load_model(ModelSpec(str(folder)), device=torch.device("cpu"))
    assert info.value.field == "model.source"
    assert info.value.message.startswith(f"'{folder}' is saved quantized and cannot be loaded here: ")
    assert "optimum" in info.value.message and "\n" not in str(info.value)


def test_a_quantized_checkpoint_whose_library_mentions_kernels_is_not_blamed_on_the_attention(tmp_path, tiny_model):
    """EETQ's ImportError names the kernels package: with attn_implementation set, the line still names the
    source (the checkpoint), not attn_implementation."""
    import shutil

    if importlib.util.find_spec("kernels") is not None:
        pytest.skip("kernels is installed: EETQ may load")
    folder = tmp_path / "eetq"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "eetq"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LensbenchError) as info:
        load_model(ModelSpec(str(folder), attn_implementation="sdpa"), device=torch.device("cpu"))
    assert info.value.field == "model.source"
    assert info.value.message.startswith(f"'{folder}' is saved quantized and cannot be loaded here: ")


def test_remote_code_that_needs_a_missing_package_is_one_line(tmp_path, tiny_model):
    import shutil

    folder = tmp_path / "remote"
    shutil.copytree(tiny_model, folder)
    (folder / "modeling_remote.py").write_text(
        "import nosuchpkg_lensbench_test\nfrom transformers import LlamaForCausalLM\n\n\n"
        "class RemoteForCausalLM(LlamaForCausalLM):\n    pass\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LensbenchError) as info:
        load_model(ModelSpec(str(folder), trust_remote_code=True), device=torch.device("cpu"))
    assert info.value.field == "model.source"
    assert info.value.message.startswith(f"'{folder}' cannot be loaded here: ")
    assert "nosuchpkg_lensbench_test" in info.value.message and "\n" not in str(info.value)


def test_bitsandbytes_without_cpu_kernels_is_one_line_on_a_cpu_rank(tiny_model, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    monkeypatch.setattr(quantized, "_bitsandbytes_version", lambda: "0.45.5")
    with pytest.raises(LensbenchError) as info:
        load_model(ModelSpec(str(tiny_model), load_in_4bit=True), device=torch.device("cpu"))
    assert info.value.field == "model.load_in_4bit"
    assert "0.46 or newer on a CPU" in info.value.message and "0.45.5" in info.value.message
    assert "\n" not in info.value.message


def test_quantized_weights_are_not_perturbed(tiny_model):
    manager = _manager(ModelSpec(str(tiny_model)))
    model = manager.activate(State("m")).model
    proj = model.get_submodule("model.layers.0.self_attn.v_proj")
    proj._parameters["weight"] = torch.nn.Parameter(torch.zeros(proj.weight.shape, dtype=torch.uint8),
                                                    requires_grad=False)  # as bitsandbytes stores 4-bit weights
    model.hf_quantizer = object()  # as transformers marks a model it quantized while loading
    with pytest.raises(LensbenchError, match="quantized"):
        manager.activate(State("m", (TransformSpec("mult_gauss", (("group", "attn_only"), ("level", 0.1)), 0),)))


def test_activation_norms_through_the_cli_with_a_device_map_gives_the_same_table(tmp_path, tiny_model, monkeypatch,
                                                                                 capsys):
    from lensbench.cli import main

    folder = make_workdir(tmp_path / "work", tiny_model)
    run = (folder / "run.yaml").read_text()
    mapping = ", ".join(f"{m}: {d}" for m, d in DISK_MAP.items())
    (folder / "mapped.yaml").write_text(
        run.replace("models: [tiny]", f"models:\n      - source: tiny\n        device_map: {{{mapping}}}"))
    (folder / "quant.yaml").write_text(run.replace("models: [tiny]", "models: [{source: tiny, load_in_4bit: true}]"))
    monkeypatch.chdir(folder)
    monkeypatch.setattr("sys.argv", ["lensbench"])  # the arguments are main's, not pytest's
    for name in ("run", "mapped"):
        assert main(["predict", "--config", f"{name}.yaml"]) == 0
    tables = {name: (folder / f"outputs/activation_norms/{name}/activation_norms.csv").read_text()
              for name in ("run", "mapped")}
    assert tables["mapped"] == tables["run"]
    # Placement is not part of a run's identity: the mapped run resumes without its map, and a
    # spec written as a mapping records no placement or quantization field (old folders resume).
    mapped = json.loads((folder / "outputs/activation_norms/mapped/run.json").read_text())
    assert not [k for k in mapped if "device_map" in k or "max_memory" in k or "load_in_" in k]
    (folder / "unmapped.yaml").write_text(run.replace("models: [tiny]", "models:\n      - source: tiny"))
    assert main(["predict", "--config", "unmapped.yaml", "--model.init_args.experiment",
                 "activation_norms/mapped"]) == 0
    # The float32 matmul precision: recorded by the run that made the folder, applied for the run only,
    # not matched on resume (another one warns), refused in one line when unknown.
    identity = json.loads((folder / "outputs/activation_norms/run/run.json").read_text())
    assert identity["float32_matmul_precision"] == torch.get_float32_matmul_precision() == "highest"
    assert main(["predict", "--config", "run.yaml", "--float32_matmul_precision", "medium"]) == 0
    assert torch.get_float32_matmul_precision() == "highest"
    capsys.readouterr()
    assert main(["predict", "--config", "run.yaml", "--float32_matmul_precision", "fast"]) == 1
    assert last_line(capsys.readouterr().err) == ("lensbench: error: float32_matmul_precision: 'fast' is not a float32 "
                                                  "matmul precision; use one of highest, high, medium")
    # Without bitsandbytes (hidden where it is installed): one line before loading.
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    capsys.readouterr()
    assert main(["predict", "--config", "quant.yaml"]) == 1
    err = capsys.readouterr().err
    line = last_line(err)
    assert line.startswith("lensbench: error: model.init_args.models[0].load_in_4bit: ")
    assert "pip install 'bitsandbytes" in line and "Traceback" not in err
    assert not (folder / "outputs/activation_norms/quant").exists()


def _gpu_suite():
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "bench" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_gpu_suite_dry_run_prints_the_device_and_every_command(tmp_path, capsys, monkeypatch):
    suite = _gpu_suite()
    monkeypatch.delenv("OUT", raising=False)
    assert suite.main(["--dry-run", "--write-docs", "--out", str(tmp_path / "o"), "--time-limit", "420"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("device: ") and ("no CUDA device" in out[0]) != torch.cuda.is_available()
    tests = next(line for line in out if line.startswith("[gpu_tests]"))
    assert "-m pytest -m gpu tests/gpu" in tests and f"LENSBENCH_GPU_LOG={tmp_path / 'o' / 'gpu_tests.log'}" in tests
    assert "(at most 220 s)" in tests  # the benchmarks keep 200 s of the 420
    for bench in ("perturbation", "activation_norms"):
        line = next(line for line in out if line.startswith(f"[{bench}]"))
        assert f"bench/{bench}.py --device cuda --model " in line and "--reps 3" in line
    assert "--no-docs" in next(line for line in out if line.startswith("[activation_norms]"))
    assert out[-1].startswith("then: the section '## GPU suite' of ")
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


@pytest.mark.parametrize("argv,words", [(["--time-limit", "0"], "--time-limit must be"),
                                        (["--skip-tests", "--skip-bench"], "leave nothing"),
                                        (["--reps", "0"], "--reps must be")])
def test_the_gpu_suite_refuses_bad_arguments(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        _gpu_suite().parse_args(argv)
    assert info.value.code == 2 and words in capsys.readouterr().err


def test_the_gpu_suite_plans_tests_only_or_cpu_benchmarks(tmp_path):
    suite = _gpu_suite()
    only = suite.plan(suite.parse_args(["--skip-bench", "--out", str(tmp_path), "--pytest-args", "-k oom -x"]))
    assert [s.name for s in only] == ["gpu_tests"] and only[0].limit == 480 and only[0].argv[-3:] == ["-k", "oom", "-x"]
    every = suite.plan(suite.parse_args(["--cpu-bench", "--out", str(tmp_path), "--model", "m"]))
    assert [s.name for s in every][:3] == ["gpu_tests", "perturbation", "activation_norms"]
    assert len(every) == 7 and all(s.argv[0] for s in every)
