"""``lensbench.training.layer_loading``: copying blocks and components of a checkpoint into a model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lensbench.errors import LensbenchError
from lensbench.testing import save_tiny_llama
from lensbench.training.layer_loading import PretrainedLayers, block_list, load_pretrained_layers

FIELD = "model.init_args.pretrained_layers"


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("layers") / "src", seed=0, layers=4)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def target(folder: Path, seed: int = 1, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig.from_pretrained(folder)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norms start at ones in every model: make them tell source from target
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_()
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def changed(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}


def test_layer_range_copies_exactly_and_leaves_the_rest(src):
    source, model = weights(src), target(src)
    before = snapshot(model)
    report = load_pretrained_layers(model, PretrainedLayers(str(src), layer_mappings={"0-1": "2-3"}))
    state = model.state_dict()
    for i, j in ((0, 2), (1, 3)):
        block = [n for n in source if n.startswith(f"model.layers.{i}.")]
        assert len(block) == 9
        for name in block:
            assert torch.equal(state[name.replace(f"layers.{i}.", f"layers.{j}.")], source[name])
    assert changed(model, before) == {n for n in state if n.startswith(("model.layers.2.", "model.layers.3."))}
    assert len(report.loaded) == 18
    assert ("model.layers.2.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight") in report.loaded
    assert report.parameters == sum(state[t].numel() for t, _ in report.loaded)
    assert report.summary().startswith(f"loaded 18 tensors ({report.parameters / 1e3:.1f}K parameters) from {src}")


def test_single_layer_mapping(src):
    source, model = weights(src), target(src)
    before = snapshot(model)
    load_pretrained_layers(model, {"source": str(src), "layer_mappings": {"2": "0"}})
    state = model.state_dict()
    assert torch.equal(state["model.layers.0.self_attn.q_proj.weight"], source["model.layers.2.self_attn.q_proj.weight"])
    assert changed(model, before) == {n for n in state if n.startswith("model.layers.0.")}


def test_component_mapping_with_wildcards(src):
    source, model = weights(src), target(src)
    before = snapshot(model)
    report = load_pretrained_layers(model, PretrainedLayers(str(src), component_mappings={
        "model.layers.0.mlp.*": "model.layers.1.mlp.*",
        "model.layers.*.self_attn.k_proj.weight": "model.layers.*.self_attn.k_proj.weight",
        "model.norm": "model.norm",
    }))
    state = model.state_dict()
    expected = {f"model.layers.1.mlp.{p}_proj.weight": f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    expected |= {f"model.layers.{i}.self_attn.k_proj.weight": f"model.layers.{i}.self_attn.k_proj.weight" for i in range(4)}
    expected["model.norm.weight"] = "model.norm.weight"
    for tgt, s in expected.items():
        assert torch.equal(state[tgt], source[s])
    assert changed(model, before) == set(expected)
    assert dict(report.loaded) == expected


def test_component_mapping_overrides_layer_mapping(src):
    source, model = weights(src), target(src)
    load_pretrained_layers(model, PretrainedLayers(str(src), layer_mappings={"0": "0"}, component_mappings={
        "model.layers.3.mlp.down_proj.weight": "model.layers.0.mlp.down_proj.weight"}))
    state = model.state_dict()
    assert torch.equal(state["model.layers.0.mlp.down_proj.weight"], source["model.layers.3.mlp.down_proj.weight"])
    assert torch.equal(state["model.layers.0.mlp.up_proj.weight"], source["model.layers.0.mlp.up_proj.weight"])


class Memory(nn.Module):
    """Stands in for a memory layer: parameters named unlike an MLP's."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.randn(8, width))
        self.values = nn.Parameter(torch.randn(8, width))


def test_load_all_into_a_model_with_one_mlp_replaced(src):
    source, model = weights(src), target(src)
    model.model.layers[1].mlp = Memory(32)
    memory = snapshot(model.model.layers[1].mlp)
    report = load_pretrained_layers(model, PretrainedLayers(str(src), load_all=True))
    state = model.state_dict()
    for name, tensor in state.items():
        if ".mlp." in name and name.startswith("model.layers.1."):
            continue
        if name in source:
            assert torch.equal(tensor, source[name]), name
    assert all(torch.equal(model.model.layers[1].mlp.state_dict()[k], v) for k, v in memory.items())
    mlp1 = {n for n in source if n.startswith("model.layers.1.mlp.")}
    assert len(mlp1) == 3 and set(report.skipped) == mlp1
    assert len(report.loaded) == len(source) - 3
    assert "skipped 3 source tensors" in report.summary()


def test_load_all_into_tied_embeddings_loads_the_embedding_once(src):
    source, model = weights(src), target(src, tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight and "lm_head.weight" in source
    report = load_pretrained_layers(model, PretrainedLayers(str(src), load_all=True))
    assert torch.equal(model.model.embed_tokens.weight, source["model.embed_tokens.weight"])
    assert list(report.skipped) == ["lm_head.weight"] and "tied to model.embed_tokens.weight" in report.skipped["lm_head.weight"]
    assert report.parameters == sum(p.numel() for p in model.parameters())


def test_step_reads_the_checkpoint_folder(tmp_path):
    run = tmp_path / "run"
    save_tiny_llama(run / "checkpoint-5", seed=5)
    save_tiny_llama(run / "checkpoint-10", seed=10)
    model = target(run / "checkpoint-5", seed=1)
    report = load_pretrained_layers(model, PretrainedLayers(str(run), step=10, load_all=True))
    source = weights(run / "checkpoint-10")
    assert all(torch.equal(model.state_dict()[n], t) for n, t in source.items())
    assert report.source == f"{run}/checkpoint-10" and report.summary().endswith(f"from {run}/checkpoint-10")


def test_missing_step_lists_existing_steps(tmp_path):
    run = tmp_path / "run"
    save_tiny_llama(run / "checkpoint-5", seed=5)
    save_tiny_llama(run / "checkpoint-10", seed=10)
    (run / "checkpoint-notes").mkdir()
    with pytest.raises(LensbenchError) as err:
        load_pretrained_layers(target(run / "checkpoint-5"), PretrainedLayers(str(run), step=7, load_all=True))
    assert err.value.field == f"{FIELD}.step"
    assert "checkpoint-7" in err.value.message and "checkpoint-5, checkpoint-10" in err.value.message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LensbenchError, match="holds no checkpoint-<N> folders"):
        load_pretrained_layers(target(run / "checkpoint-5"), PretrainedLayers(str(empty), step=1, load_all=True))


def test_shape_mismatch_raises_before_any_copy(src):
    narrow = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                          num_attention_heads=2, num_key_value_heads=1))
    before = snapshot(narrow)
    with pytest.raises(LensbenchError) as err:
        load_pretrained_layers(narrow, PretrainedLayers(str(src), layer_mappings={"0-1": "0-1"}))
    assert err.value.field == f"{FIELD}.layer_mappings"
    assert "cannot load into" in err.value.message and "map layers of the same shape" in err.value.message
    assert changed(narrow, before) == set()
    # Same width, wider MLP: the attention pairs fit, the MLP pairs do not; nothing is copied.
    wide = target(src, intermediate_size=128)
    before = snapshot(wide)
    with pytest.raises(LensbenchError) as err:
        load_pretrained_layers(wide, PretrainedLayers(str(src), layer_mappings={"0-1": "0-1"}))
    message = err.value.message
    assert "source model.layers.0.mlp" in message and "[64, 32]" in message and "[128, 32]" in message
    assert changed(wide, before) == set()


def test_explicit_mapping_into_wrong_shape_raises(src):
    model = target(src)
    model.model.layers[1].mlp = Memory(32)
    before = snapshot(model)
    with pytest.raises(LensbenchError, match=r"up_proj.weight \[64, 32\] cannot load into model.layers.1.mlp.keys \[8, 32\]"):
        load_pretrained_layers(model, PretrainedLayers(str(src), load_all=True, component_mappings={
            "model.layers.1.mlp.up_proj.weight": "model.layers.1.mlp.keys"}))
    assert changed(model, before) == set()


@pytest.mark.parametrize("mapping, pattern", [
    ({"3-1": "0-2"}, r"layer range 3-1 is reversed; write 1-3"),
    ({"0-1": "0-2"}, r"maps 2 source layers \(0-1\) to 3 target layers \(0-2\); give ranges of equal length"),
    ({"0": "4"}, r"target layer 4 is out of range; the target has blocks 0-3"),
    ({"4": "0"}, r"source layer 4 is out of range; .* has blocks 0-3"),
    ({"0": "1", "2": "1"}, r"target layer 1 is mapped from both source layers 0 and 2"),
    ({"a-b": "0"}, r"bad layer range"),
])
def test_bad_layer_mappings(src, mapping, pattern):
    model = target(src)
    before = snapshot(model)
    with pytest.raises(LensbenchError, match=pattern) as err:
        load_pretrained_layers(model, PretrainedLayers(str(src), layer_mappings=mapping))
    assert err.value.field == f"{FIELD}.layer_mappings"
    assert changed(model, before) == set()


def test_strict_and_non_strict_component_mappings(src):
    model = target(src)
    with pytest.raises(LensbenchError, match=r"source 'model.layers.0.mlp.upproj.weight' matches no tensor.*up_proj") as err:
        load_pretrained_layers(model, PretrainedLayers(str(src), component_mappings={
            "model.layers.0.mlp.upproj.weight": "model.layers.0.mlp.up_proj.weight"}))
    assert err.value.field == f"{FIELD}.component_mappings"
    with pytest.raises(LensbenchError, match=r"maps to model.layers.0.memory.keys, which the target does not have"):
        load_pretrained_layers(model, PretrainedLayers(str(src), component_mappings={
            "model.layers.0.mlp.up_proj.weight": "model.layers.0.memory.keys"}))
    report = load_pretrained_layers(model, PretrainedLayers(str(src), strict=False, component_mappings={
        "*.nothing": "*.nothing", "model.layers.0.mlp.up_proj.weight": "model.layers.0.memory.keys",
        "model.norm.weight": "model.norm.weight"}))
    assert report.unmatched == ["*.nothing"]
    assert "model.layers.0.mlp.up_proj.weight" in report.skipped
    assert report.loaded == [("model.norm.weight", "model.norm.weight")]


def test_wildcard_count_and_collisions_are_checked(src):
    model = target(src)
    with pytest.raises(LensbenchError, match="sends both"):
        load_pretrained_layers(model, PretrainedLayers(str(src), component_mappings={
            "model.layers.*.mlp.up_proj.weight": "model.layers.0.mlp.up_proj.weight"}))
    with pytest.raises(LensbenchError, match="must carry the 1"):
        load_pretrained_layers(model, PretrainedLayers(str(src), component_mappings={
            "model.layers.*.mlp.up_proj.weight": "model.layers.*.mlp.*"}))


def test_braces_map_in_step(src):
    source, model = weights(src), target(src)
    load_pretrained_layers(model, PretrainedLayers(str(src), component_mappings={
        "model.layers.{0,1}.self_attn": "model.layers.{3,2}.self_attn"}))
    state = model.state_dict()
    assert torch.equal(state["model.layers.3.self_attn.v_proj.weight"], source["model.layers.0.self_attn.v_proj.weight"])
    assert torch.equal(state["model.layers.2.self_attn.v_proj.weight"], source["model.layers.1.self_attn.v_proj.weight"])


def test_nothing_selected_raises(src):
    with pytest.raises(LensbenchError, match="selects nothing"):
        load_pretrained_layers(target(src), PretrainedLayers(str(src)))


def test_dtype_is_cast_to_target(src):
    source, model = weights(src), target(src).to(torch.bfloat16)
    load_pretrained_layers(model, PretrainedLayers(str(src), layer_mappings={"1": "1"}))
    assert model.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, source["model.layers.1.mlp.up_proj.weight"].bfloat16())


def test_block_list_finds_the_longest_numbered_list():
    names = [f"model.layers.{i}.mlp.experts.{e}.w" for i in range(3) for e in range(8)] + ["model.norm.weight"]
    assert block_list(names) == ("model.layers.", [0, 1, 2])
    assert block_list(["transformer.h.0.attn.w", "transformer.h.1.attn.w", "wte.weight"]) == ("transformer.h.", [0, 1])
    assert block_list(["embed.weight"]) is None
