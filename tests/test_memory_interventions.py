"""Memory interventions as registered transforms: what each changes, bit-exact restore through the
state manager (rows only where it can), one-line errors, and the same neuron and head ablations on
an ordinary model."""

from __future__ import annotations

import pytest
import torch

from lensbench.errors import LensbenchError
from lensbench.memory import MemoryLlamaConfig, MemoryLlamaForCausalLM
from lensbench.models.loading import ModelSpec
from lensbench.plugins import build_registries, get_plugin_manager
from lensbench.state import State, SubjectManager, TransformSpec

LAYER = "model.layers.1.memory"


@pytest.fixture(scope="module")
def memory_model(tmp_path_factory):
    from lensbench.testing import save_char_tokenizer

    folder = tmp_path_factory.mktemp("models") / "memory"
    torch.manual_seed(0)
    config = MemoryLlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, memory_layers=[1], memory_n_keys=8,
                               memory_heads=2, memory_topk=3, memory_k_dim=16, memory_gated=True)
    MemoryLlamaForCausalLM(config).save_pretrained(folder)
    save_char_tokenizer(folder)
    return folder


@pytest.fixture
def manager(memory_model):
    registry = build_registries(get_plugin_manager(load_installed=False)).perturbations
    return SubjectManager({"m": ModelSpec(str(memory_model))}, torch.device("cpu"), registry)


def spec(name: str, seed: int = 0, **params) -> TransformSpec:
    return TransformSpec(name, tuple(sorted((k, tuple(map(tuple, v)) if k == "keys" else
                                             (tuple(v) if isinstance(v, list) else v)) for k, v in params.items())), seed)


def snapshot(loaded) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    mem = loaded.model.get_submodule(LAYER)
    out["blocked_rows"], out["blocked_slots"] = mem.blocked_rows.clone(), mem.blocked_slots.clone()
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


TOKENS = torch.tensor([[5, 9, 14, 30, 81, 7, 6, 11]])


def logits(loaded) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(TOKENS).logits


def test_every_intervention_changes_the_model_and_restores_bit_exactly(manager):
    clean = snapshot(manager.activate(State("m")))
    base = logits(manager.loaded)
    states = [
        (spec("mask_memory_keys", layer=1, keys=[[0, 0, 3], [1, 1, 5]]),),
        (spec("mask_memory_keys", layer=1, slots=[1, 9, 63]),),
        (spec("ablate_memory_values", layer=1, slots=[0, 5, 17]),),
        (spec("ablate_memory_values", layer=1, slots=[2], mode="random", seed=3),),
        (spec("ablate_memory", layer=1, part="keys"),),
        (spec("ablate_memory", layer=1, part="values"),),
        (spec("ablate_memory", layer=1, part="layer"),),
        (spec("swap_memory_keys", layer=1, a=0, b=7),),
        (spec("swap_memory_values", layer=1, a=3, b=40),),
        (spec("ablate_attention_head", layer=0, head=2),),
        (spec("ablate_mlp_neurons", layer=0, neurons=[1, 2, 60]),),
        (spec("mask_memory_keys", layer=1, slots=[4]), spec("swap_memory_values", layer=1, a=4, b=5),
         spec("ablate_memory_values", layer=1, slots=[5]), spec("ablate_attention_head", layer=1, head=0)),
    ]
    for transforms in states:
        loaded = manager.activate(State("m", transforms))
        assert not same(snapshot(loaded), clean) or transforms[0].name == "mask_memory_keys"
        manager.activate(State("m"))
        assert same(snapshot(manager.loaded), clean), transforms
        assert torch.equal(logits(manager.loaded), base)


def test_value_interventions_touch_rows_not_the_table(manager):
    manager.activate(State("m"))
    manager.activate(State("m", (spec("swap_memory_values", layer=1, a=3, b=40),)))
    assert manager._originals == {} and [(n, i.tolist()) for _, n, _, i, _ in manager._slices] == [(f"{LAYER}.values", [3, 40])]
    mem = manager.loaded.model.get_submodule(LAYER)
    manager.activate(State("m", (spec("swap_memory_values", layer=1, a=3, b=40),
                                 spec("swap_memory_values", layer=1, a=40, b=3))))
    clean = snapshot(manager.activate(State("m")))
    manager.activate(State("m", (spec("swap_memory_values", layer=1, a=3, b=40),
                                 spec("swap_memory_values", layer=1, a=40, b=3))))
    assert same(snapshot(manager.loaded), clean)  # swapping twice is the identity
    manager.activate(State("m", (spec("swap_memory_values", layer=1, a=3, b=40),)))
    assert torch.equal(mem.values[3], clean[f"{LAYER}.values"][40]) and torch.equal(mem.values[40], clean[f"{LAYER}.values"][3])


@torch.no_grad()
def test_masked_keys_and_slots_are_never_read(manager):
    loaded = manager.activate(State("m"))
    mem = loaded.model.get_submodule(LAYER)
    x = torch.randn(50, 32)
    slots, _ = mem.select(x)
    top = int(slots[0, 0, 0])
    loaded = manager.activate(State("m", (spec("mask_memory_keys", layer=1, keys=[[0, 0, top // 8]], slots=[top]),)))
    after, _ = mem.select(x)
    assert not (after == top).any() and not (after[:, 0] // 8 == top // 8).any()
    assert torch.allclose(mem(x), mem.reference_forward(x), atol=1e-6)


@torch.no_grad()
def test_head_and_neuron_ablations_remove_exactly_their_part(manager):
    loaded = manager.activate(State("m"))
    model = loaded.model
    seen = {}
    hooks = [model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("attn", a[0])),
             model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp", a[0]))]
    model(TOKENS)
    attn_in, mlp_in = seen["attn"].clone(), seen["mlp"].clone()
    head_dim = 32 // 4
    manager.activate(State("m", (spec("ablate_attention_head", layer=0, head=2),)))
    expected = model.model.layers[0].self_attn.o_proj(attn_in.index_fill(-1, torch.arange(2 * head_dim, 3 * head_dim), 0))
    clean = manager.activate(State("m")).model.model.layers[0].self_attn.o_proj(attn_in.index_fill(-1, torch.arange(2 * head_dim, 3 * head_dim), 0))
    assert torch.equal(expected, clean)
    manager.activate(State("m", (spec("ablate_mlp_neurons", layer=0, neurons=[1, 60]),)))
    got = model.model.layers[0].mlp.down_proj(mlp_in)
    manager.activate(State("m"))
    assert torch.allclose(got, model.model.layers[0].mlp.down_proj(mlp_in.index_fill(-1, torch.tensor([1, 60]), 0)))
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("transform,params,fragment", [
    ("mask_memory_keys", {"layer": 0, "slots": [1]}, "block 0 has no memory layer; the model's memory layers are in blocks [1]"),
    ("mask_memory_keys", {"layer": 1, "slots": [64]}, "slot 64 is out of range; use 0..63"),
    ("mask_memory_keys", {"layer": 1, "keys": [[0, 2, 1]]}, "half 2 is out of range; use 0..1"),
    ("mask_memory_keys", {"layer": 1, "keys": [[0, 0, r] for r in range(6)]}, "too many keys masked"),
    ("ablate_memory_values", {"layer": 1, "slots": [-1]}, "slot -1 is out of range"),
    ("ablate_memory", {"layer": 1, "part": "queries"}, "part must be one of keys, values, layer"),
    ("swap_memory_values", {"layer": 1, "a": 0, "b": 99}, "slot 99 is out of range"),
    ("ablate_attention_head", {"layer": 0, "head": 4}, "head 4 is out of range; use 0..3"),
    ("ablate_mlp_neurons", {"layer": 1, "neurons": [0]}, "cannot find the MLP down projection"),
    ("ablate_mlp_neurons", {"layer": 2, "neurons": [0]}, "layer 2 is out of range; the model has blocks 0..1"),
])
def test_bad_parameters_fail_before_anything_changes(manager, transform, params, fragment):
    clean = snapshot(manager.activate(State("m")))
    with pytest.raises(LensbenchError) as err:
        manager.activate(State("m", (spec(transform, **params),)))
    assert fragment in str(err.value)
    assert same(snapshot(manager.loaded), clean)


def test_ordinary_models_have_neuron_and_head_ablations(tiny_model):
    registry = build_registries(get_plugin_manager(load_installed=False)).perturbations
    manager = SubjectManager({"t": ModelSpec(str(tiny_model))}, torch.device("cpu"), registry)
    clean = {n: p.detach().clone() for n, p in manager.activate(State("t")).model.named_parameters()}
    loaded = manager.activate(State("t", (spec("ablate_mlp_neurons", layer=1, neurons=[0, 3]),)))
    down = loaded.model.model.layers[1].mlp.down_proj.weight
    assert (down[:, [0, 3]] == 0).all() and torch.equal(down[:, 1], clean["model.layers.1.mlp.down_proj.weight"][:, 1])
    with pytest.raises(LensbenchError, match="no memory layer"):
        manager.activate(State("t", (spec("ablate_memory", layer=0),)))
