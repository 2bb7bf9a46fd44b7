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


# -- ablate_memory_keys: the seed's per-key ablation ---------------------------------------------

def plain_memory(x: torch.Tensor, params: dict[str, torch.Tensor], topk: int) -> torch.Tensor:
    """A product-key memory as Lample et al. 2019 describe it, with plain tensors: per head, each
    half-query scored against its half-key table (q·k), the topk of each half, the topk of their
    topk x topk sums (slot i1 * n_keys + i2), softmax weights over those, the weighted values summed
    over heads; then the memory+ gate and output projection."""
    keys, values = params["keys"], params["values"]
    heads, _, n_keys, half = keys.shape
    q = (x @ params["query"].T).view(len(x), heads, 2, half)
    read = torch.zeros(len(x), values.shape[1])
    for h in range(heads):
        s1, i1 = (q[:, h, 0] @ keys[h, 0].T).topk(topk, dim=-1)
        s2, i2 = (q[:, h, 1] @ keys[h, 1].T).topk(topk, dim=-1)
        best, pos = (s1[:, :, None] + s2[:, None, :]).flatten(1).topk(topk, dim=-1)
        slots = i1.gather(1, pos // topk) * n_keys + i2.gather(1, pos % topk)
        read += (values[slots] * torch.softmax(best, dim=-1)[..., None]).sum(1)
    return (read * torch.nn.functional.silu(x @ params["gate"].T)) @ params["out"].T


def memory_params(mem) -> dict[str, torch.Tensor]:
    return {"query": mem.query.weight.detach().clone(), "keys": mem.keys.detach().clone(),
            "values": mem.values.detach().clone(), "gate": mem.gate.weight.detach().clone(),
            "out": mem.out.weight.detach().clone()}


@torch.no_grad()
def test_a_zeroed_half_key_scores_zero_and_the_memory_reads_as_the_plain_one_with_that_row_zeroed(manager):
    torch.manual_seed(1)
    x = torch.randn(200, 32)
    mem = manager.activate(State("m")).model.get_submodule(LAYER)
    clean = memory_params(mem)
    assert torch.allclose(mem(x), plain_memory(x, clean, mem.topk), atol=1e-6)  # the two implementations agree
    before = mem(x)
    scores = mem.half_scores(x)
    r0 = int(scores[:, 0, 0].argmax(-1).mode().values)  # the rows most often best: zeroing them changes reads
    r1 = int(scores[:, 1, 1].argmax(-1).mode().values)
    manager.activate(State("m", (spec("ablate_memory_keys", layer=1, keys=[[0, 0, r0], [1, 1, r1], [0, 0, r0]]),)))
    after = mem.half_scores(x)
    assert (after[:, 0, 0, r0] == 0).all() and (after[:, 1, 1, r1] == 0).all()
    others = torch.ones_like(after, dtype=torch.bool)
    others[:, 0, 0, r0] = others[:, 1, 1, r1] = False
    assert torch.equal(after[others], scores[others])  # every other score as it was
    zeroed = {**clean, "keys": clean["keys"].clone()}
    zeroed["keys"][0, 0, r0] = zeroed["keys"][1, 1, r1] = 0
    out = mem(x)
    assert torch.allclose(out, plain_memory(x, zeroed, mem.topk), atol=1e-6)
    assert not torch.allclose(out, before, atol=1e-4)
    # unlike mask_memory_keys, a zeroed row still competes: here its score 0 beats the other rows somewhere
    assert (after[:, 0, 0].argmax(-1) == r0).any() or (after[:, 1, 1].argmax(-1) == r1).any()


def test_random_keys_are_reproducible_drawn_from_their_table_and_restored_bit_for_bit(manager):
    clean = snapshot(manager.activate(State("m")))
    table = clean[f"{LAYER}.keys"]
    keys = [[1, 0, 6], [0, 1, 2], [0, 1, 2], [1, 0, 3]]  # a duplicate: harmless
    drawn = {}
    for name, seed, mode in (("a", 7, "random"), ("b", 7, "random"), ("c", 8, "random"), ("zero", 7, "zero")):
        loaded = manager.activate(State("m", (spec("ablate_memory_keys", seed, layer=1, keys=keys, mode=mode),)))
        drawn[name] = loaded.model.get_parameter(f"{LAYER}.keys").detach().clone()
        # only the keys' rows 2, 3 and 6 (every head and half) are saved, not the whole table
        assert manager._originals == {} and [(n, d, i.tolist()) for _, n, d, i, _ in manager._slices] == \
            [(f"{LAYER}.keys", 2, [2, 3, 6])]
        manager.activate(State("m"))
        assert same(snapshot(manager.loaded), clean), name
    assert torch.equal(drawn["a"], drawn["b"]) and not torch.equal(drawn["a"], drawn["c"])
    unique = [(0, 1, 2), (1, 0, 3), (1, 0, 6)]  # drawn in sorted order, one row each
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn((len(unique), table.shape[-1]), generator=generator)
    changed = torch.zeros(table.shape[:3], dtype=torch.bool)
    for (h, s, r), z in zip(unique, noise):
        changed[h, s, r] = True
        expected = z * table[h, s].std() + table[h, s].mean()
        assert torch.allclose(drawn["a"][h, s, r], expected, atol=1e-7)
        assert (drawn["zero"][h, s, r] == 0).all() and not (drawn["a"][h, s, r] == 0).any()
    assert torch.equal(drawn["a"][~changed], table[~changed]) and torch.equal(drawn["zero"][~changed], table[~changed])


@pytest.mark.parametrize("params,fragment", [
    ({"layer": 1, "keys": [[0, 0, 8]]}, "ablate_memory_keys: row 8 is out of range; use 0..7"),
    ({"layer": 1, "keys": [[2, 0, 1]]}, "ablate_memory_keys: head 2 is out of range; use 0..1"),
    ({"layer": 1, "keys": [[0, 1]]}, "ablate_memory_keys: each key is [head, half, row], got (0, 1)"),
    ({"layer": 1, "keys": []}, "ablate_memory_keys: give keys as [[head, half, row], ...]"),
    ({"layer": 1, "keys": [[0, 0, 1]], "mode": "noise"}, "ablate_memory_keys: mode must be zero or random"),
])
def test_bad_keys_are_one_line_naming_the_parameter(manager, params, fragment):
    clean = snapshot(manager.activate(State("m")))
    with pytest.raises(LensbenchError) as err:
        manager.activate(State("m", (spec("ablate_memory_keys", **params),)))
    line = str(err.value)
    assert "\n" not in line and fragment in line
    assert err.value.field == ("transforms.params.mode" if "mode" in params else "transforms.params.keys")
    assert same(snapshot(manager.loaded), clean)


def run_analysis(folder, model, name: str, interventions: list):
    """memory_ablation on ``model`` (synthetic_qa, 8 pairs) into ``folder/outputs/<name>``."""
    import yaml

    from lensbench.cli import main

    config = {"model": {"class_path": "memory_ablation",
                        "init_args": {"model": str(model), "interventions": interventions, "experiment": name,
                                      "output_dir": str(folder / "outputs")}},
              "data": {"class_path": "lensbench.data.answers.AnswerDataModule",
                       "init_args": {"dataset": "synthetic_qa", "seed": 0, "splits": ["test"], "batch_size": 8,
                                     "options": {"num_pairs": 8, "buckets": [1, 4], "heldout_fraction": 0.0}}},
              "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["predict", "--config", str(path)]) == 0
    return folder / "outputs" / name


def test_every_key_is_one_state_and_one_impact_row(memory_model, tmp_path):
    import json

    import pandas as pd

    iv = {"name": "each_key", "transform": "ablate_memory_keys", "params": {"layer": 1}, "vary": "keys",
          "every": True, "limit": 10}
    out = run_analysis(tmp_path, memory_model, "each", [iv])
    # heads x halves x rows in that order, the first 10: head 0's half 0 (rows 0..7), then its half 1
    expected = [[[0, s, r]] for s in (0, 1) for r in range(8)][:10]
    acc = pd.read_csv(out / "accuracy.csv", keep_default_na=False, dtype={"target": str})
    mine = acc[acc.intervention == "each_key"]
    assert set(mine["transform"]) == {"ablate_memory_keys"}
    assert [json.loads(t) for t in dict.fromkeys(mine.target)] == expected
    matrix = pd.read_csv(out / "impact_matrix.csv", keep_default_na=False, dtype={"target": str})
    assert [json.loads(t) for t in matrix.target] == expected and set(matrix.intervention) == {"each_key"}
    # each row holds its state's exact-match drop against the unablated model, per group
    for _, row in matrix.iterrows():
        for group in matrix.columns.drop(["intervention", "target"]):
            drop = mine[(mine.target == row.target) & (mine.group == group)].exact_drop
            assert len(drop) == 1 and float(row[group]) == pytest.approx(float(drop.iloc[0]))


def test_top_slots_map_to_the_half_key_rows_that_address_them(memory_model, tmp_path):
    """``top`` with ``vary: keys`` (ablate_memory_keys' default): slot s = i1 * n_keys + i2 is
    addressed by row i1 of half 0 and row i2 of half 1 in every head; one state per slot with
    ``each``, one with all rows of the ``n`` slots without."""
    import json

    import pandas as pd

    from lensbench.analyses.memory_ablation import (
        Intervention,
        MemoryAblation,
        TopSlots,
    )

    top = {"n": 3, "each": True}
    out = run_analysis(tmp_path, memory_model, "top", [
        {"name": "slot_keys", "transform": "ablate_memory_keys", "params": {"layer": 1}, "top": top},
        {"name": "masked", "transform": "mask_memory_keys", "params": {"layer": 1}, "vary": "keys", "top": top}])
    reads: dict[int, int] = {}
    for a in map(json.loads, (out / "key_activations.jsonl").open()):  # the unablated reads at answer positions
        for row in a["slots"]["1"]:
            for s in row:
                reads[s] = reads.get(s, 0) + 1
    ranked = sorted(reads, key=lambda s: (-reads[s], s))[:3]
    labels = [f"slot {s} keys [*,0,{s // 8}] [*,1,{s % 8}]" for s in ranked]
    matrix = pd.read_csv(out / "impact_matrix.csv", keep_default_na=False, dtype={"target": str})
    for name in ("slot_keys", "masked"):
        assert list(matrix[matrix.intervention == name].target) == labels

    # the states' parameters: exactly the rows that address each slot
    analysis = MemoryAblation(model=str(memory_model))
    analysis._top_slots = lambda iv, where: [13, 62, 5]
    rows = {13: [[0, 0, 1], [1, 0, 1], [0, 1, 5], [1, 1, 5]], 62: [[0, 0, 7], [1, 0, 7], [0, 1, 6], [1, 1, 6]],
            5: [[0, 0, 0], [1, 0, 0], [0, 1, 5], [1, 1, 5]]}
    for each, expected in ((True, [rows[13], rows[62], rows[5]]),
                           (False, [rows[13] + rows[62] + [[0, 0, 0], [1, 0, 0]]])):  # [*,1,5] once
        states = analysis._family(Intervention("ablate_memory_keys", {"layer": 1}, top=TopSlots(n=3, each=each)), "iv")
        got = [[list(k) for k in dict(s.transforms[0].params)["keys"]] for s in states]
        assert got == expected
        assert [dict(s.labels)["target"] for s in states] == (
            ["slot 13 keys [*,0,1] [*,1,5]", "slot 62 keys [*,0,7] [*,1,6]", "slot 5 keys [*,0,0] [*,1,5]"]
            if each else ["keys of slots [13,62,5]"])
    masked = analysis._family(Intervention("mask_memory_keys", {"layer": 1}, top=TopSlots(n=3)), "iv")
    assert dict(masked[0].transforms[0].params)["slots"] == (13, 62, 5)  # without vary: the slots, as before


def test_an_out_of_range_key_in_a_sweep_is_one_line_before_any_work(memory_model, tmp_path, capsys):
    import yaml

    from lensbench.cli import main

    config = {"model": {"class_path": "memory_ablation",
                        "init_args": {"model": str(memory_model), "experiment": "bad", "output_dir": str(tmp_path),
                                      "interventions": [{"transform": "ablate_memory_keys", "params": {"layer": 1},
                                                         "vary": "keys", "values": [[[0, 0, 1]], [[1, 1, 8]]]}]}},
              "data": {"class_path": "lensbench.data.answers.AnswerDataModule",
                       "init_args": {"dataset": "synthetic_qa", "seed": 0, "splits": ["test"],
                                     "options": {"num_pairs": 8, "buckets": [1]}}},
              "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    assert main(["predict", "--config", str(tmp_path / "bad.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lensbench: error: model.init_args.interventions[0].values: row 8 is out of range; this memory "
                   "has rows 0..7"], err
    assert not (tmp_path / "bad" / "shards").exists() or not any((tmp_path / "bad" / "shards").iterdir())
