"""The product-key memory layer against a brute-force reference; the memory_llama model: save/load,
Auto classes, anatomy groups, bad shapes."""

from __future__ import annotations

import pytest
import torch

from lensbench.errors import LensbenchError
from lensbench.memory import MemoryLlamaConfig, MemoryLlamaForCausalLM, ProductKeyMemory
from lensbench.models.anatomy import find_anatomy

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2)


def config(**memory) -> MemoryLlamaConfig:
    values = dict(memory_layers=[1], memory_n_keys=8, memory_topk=4, memory_heads=2, memory_k_dim=16)
    values.update(memory)
    return MemoryLlamaConfig(**SMALL, **values)


def brute_force(mem: ProductKeyMemory, x: torch.Tensor) -> torch.Tensor:
    """Independent of the layer's code: score every (i1, i2) slot as q1·k1[i1] + q2·k2[i2]."""
    q = mem.query(x).view(x.shape[0], mem.heads, 2, mem.k_dim // 2)
    if mem.query_norm:
        q = q / q.pow(2).mean(-1, keepdim=True).sqrt()
    out = torch.zeros(x.shape[0], mem.v_dim)
    for n in range(x.shape[0]):
        for h in range(mem.heads):
            scores = {}
            for i1 in range(mem.n_keys):
                for i2 in range(mem.n_keys):
                    scores[i1 * mem.n_keys + i2] = float(q[n, h, 0] @ mem.keys[h, 0, i1] + q[n, h, 1] @ mem.keys[h, 1, i2])
            best = sorted(scores, key=scores.get, reverse=True)[: mem.topk]
            w = torch.softmax(torch.tensor([scores[s] for s in best]), 0)
            out[n] += sum(wi * mem.values[s] for wi, s in zip(w, best))
    if mem.gate is not None:
        out = out * torch.nn.functional.silu(mem.gate(x))
    if mem.out is not None:
        out = mem.out(out)
    return out


@pytest.mark.parametrize("gated,v_dim,query_norm", [(False, None, False), (True, None, False), (False, 24, False),
                                                    (False, None, True)])
@torch.no_grad()
def test_product_key_search_equals_scoring_every_slot(gated, v_dim, query_norm):
    torch.manual_seed(0)
    mem = ProductKeyMemory(32, n_keys=6, heads=2, topk=3, k_dim=8, v_dim=v_dim, gated=gated, query_norm=query_norm)
    x = torch.randn(5, 32)
    expected = brute_force(mem, x)
    assert torch.allclose(mem(x), expected, atol=1e-5)
    assert torch.allclose(mem.reference_forward(x), expected, atol=1e-5)
    assert (mem.out is not None) == (gated or v_dim is not None)


def select_all_ids_first(mem: ProductKeyMemory, x: torch.Tensor):
    """The search as written before: slot ids of all kk x kk candidates built, then the top k taken."""
    k = mem.topk
    kk = min(mem.n_keys, k + int(mem.blocked_slots.numel()))
    s1, i1 = mem.half_scores(x).topk(kk, dim=-1)
    sums = s1[:, :, 0, :, None] + s1[:, :, 1, None, :]
    slots = i1[:, :, 0, :, None] * mem.n_keys + i1[:, :, 1, None, :]
    if mem.blocked_slots.numel():
        sums = sums.masked_fill(torch.isin(slots, mem.blocked_slots), float("-inf"))
    best, pos = sums.flatten(2).topk(k, dim=-1)
    return slots.flatten(2).gather(-1, pos), torch.softmax(best.float(), dim=-1).to(x.dtype)


@pytest.mark.parametrize("n_keys,heads,topk,k_dim,rows,ties,blocked", [
    (6, 2, 3, 8, 5, False, 0), (16, 4, 16, 8, 7, False, 0), (32, 1, 5, 16, 64, False, 0),
    (8, 3, 4, 4, 9, True, 0), (8, 2, 4, 8, 6, False, 5), (8, 2, 3, 4, 6, True, 3)])
def test_choosing_before_building_slot_ids_changes_nothing(n_keys, heads, topk, k_dim, rows, ties, blocked):
    torch.manual_seed(n_keys + topk)
    mem = ProductKeyMemory(24, n_keys=n_keys, heads=heads, topk=topk, k_dim=k_dim, gated=bool(blocked))
    if ties:  # keys and queries on a coarse grid: many candidate sums are exactly equal
        with torch.no_grad():
            mem.keys.copy_(torch.randint(-1, 2, mem.keys.shape).float())
            mem.query.weight.copy_(torch.randint(-1, 2, mem.query.weight.shape).float())
    if blocked:
        mem.blocked_slots = torch.randperm(n_keys * n_keys)[:blocked]
    x = torch.randint(-2, 3, (rows, 24)).float() if ties else torch.randn(rows, 24)
    results = []
    for select in (mem.select, lambda flat: select_all_ids_first(mem, flat)):
        mem.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with torch.no_grad():
            slots, weights = select(x)
        mem.select = select  # forward through the layer with this search
        out = mem(xi)
        del mem.select
        out.square().sum().backward()
        results.append((slots, weights, out, xi.grad, *(p.grad for p in mem.parameters())))
    if ties:
        sums = mem.half_scores(x)
        assert any(len(torch.unique(row)) < row.numel() for row in sums.reshape(-1, n_keys))  # ties exist
    for new, old in zip(*results):
        assert torch.equal(new, old)


@torch.no_grad()
def test_slots_are_the_top_k_of_all_sums_and_weights_sum_to_one():
    torch.manual_seed(1)
    mem = ProductKeyMemory(16, n_keys=5, heads=3, topk=4, k_dim=6)
    x = torch.randn(7, 16)
    slots, weights = mem.select(x)
    assert slots.shape == weights.shape == (7, 3, 4)
    s = mem.half_scores(x)
    full = (s[:, :, 0, :, None] + s[:, :, 1, None, :]).flatten(2)
    assert torch.equal(slots.sort(-1).values, full.topk(4, dim=-1).indices.sort(-1).values)
    assert torch.allclose(weights.sum(-1), torch.ones(7, 3))
    assert int(slots.max()) < 25


@torch.no_grad()
def test_blocked_rows_and_slots_are_never_chosen():
    torch.manual_seed(2)
    mem = ProductKeyMemory(16, n_keys=6, heads=1, topk=3, k_dim=8)
    x = torch.randn(20, 16)
    slots, _ = mem.select(x)
    used_row = int(slots[0, 0, 0]) // 6  # first half-key row of the best slot of token 0
    mem.blocked_rows[0, 0, used_row] = True
    after, _ = mem.select(x)
    assert not (after // 6 == used_row).any()
    mem.clear_interventions()
    victim = int(slots[0, 0, 0])
    mem.blocked_slots = torch.tensor([victim])
    after, _ = mem.select(x)
    assert not (after == victim).any()
    assert torch.allclose(mem(x), mem.reference_forward(x), atol=1e-6)


def test_memory_layer_trains_keys_values_and_query():
    torch.manual_seed(3)
    mem = ProductKeyMemory(16, n_keys=4, heads=2, topk=2, k_dim=8)
    mem(torch.randn(3, 16)).pow(2).sum().backward()
    for p in (mem.keys, mem.values, mem.query.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert (mem.values.grad.abs().sum(-1) > 0).sum() <= 3 * 2 * 2  # only the read slots get gradient


def test_model_replaces_the_mlp_of_the_chosen_layers_only():
    model = MemoryLlamaForCausalLM(config(memory_layers=[0, 2]))
    names = [n for n, _ in model.named_parameters()]
    assert "model.layers.1.mlp.up_proj.weight" in names
    assert not any(n.startswith(("model.layers.0.mlp", "model.layers.2.mlp")) for n in names)
    assert {"model.layers.0.memory.keys", "model.layers.2.memory.values", "model.layers.2.memory.query.weight"} <= set(names)
    assert set(model.memory_layers()) == {0, 2}
    out = model(torch.randint(0, 64, (2, 5)), output_hidden_states=True)
    assert len(out.hidden_states) == 4 and out.logits.shape == (2, 5, 64)


def test_save_and_load_round_trip_through_the_auto_classes(tmp_path):
    import lensbench  # noqa: F401  registers memory_llama
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(4)
    model = MemoryLlamaForCausalLM(config(memory_gated=True)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "memory_llama"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MemoryLlamaForCausalLM
    x = torch.randint(0, 64, (2, 6))
    assert torch.equal(loaded(x).logits, model(x).logits)  # the intervention buffers start clear
    for name, p in model.state_dict().items():
        assert torch.equal(p, loaded.state_dict()[name]), name


def test_values_and_keys_get_the_product_key_initialisation():
    torch.manual_seed(5)
    mem = MemoryLlamaForCausalLM(config(memory_n_keys=16, memory_k_dim=32)).model.layers[1].memory
    assert mem.keys.abs().max() <= 1 / 4 + 1e-6  # uniform in ±1/sqrt(16)
    assert abs(float(mem.values.std()) - 32 ** -0.5) < 0.02  # N(0, 1/v_dim), v_dim = hidden = 32
    assert not mem.blocked_rows.any()


def test_anatomy_finds_memory_layers_and_groups():
    model = MemoryLlamaForCausalLM(config(memory_layers=[1, 2], memory_gated=True))
    anatomy = find_anatomy(model)
    assert anatomy.memory_names == {1: ["model.layers.1.memory"], 2: ["model.layers.2.memory"]}
    assert anatomy.mlp_names == ["model.layers.0.mlp", "model.layers.1.memory", "model.layers.2.memory"]
    group = lambda spec: [s.name for s in anatomy.parameter_group(model, spec)]  # noqa: E731
    assert group("memory_keys") == ["model.layers.1.memory.keys", "model.layers.2.memory.keys"]
    assert group("memory_values[2]") == ["model.layers.2.memory.values"]
    assert set(group("memory[1]")) == {f"model.layers.1.memory.{p}" for p in
                                       ("keys", "values", "query.weight", "gate.weight", "out.weight")}
    with pytest.raises(LensbenchError, match="matches no parameter"):
        group("memory_keys[0]")
    plain = MemoryLlamaForCausalLM(config(memory_layers=[]))
    with pytest.raises(LensbenchError, match="no memory layer"):
        find_anatomy(plain).parameter_group(plain, "memory")


@pytest.mark.parametrize("bad,fragment", [
    (dict(memory_layers=[3]), "outside the model; it has layers 0..2"),
    (dict(memory_topk=9), "memory_topk=9 is out of range; use 1..memory_n_keys (8)"),
    (dict(memory_n_keys=0), "memory_n_keys=0 is out of range"),
    (dict(memory_k_dim=15), "memory_k_dim=15 must be an even number"),
    (dict(memory_heads=0), "memory_heads=0 is out of range"),
    (dict(memory_layers=[1, 1]), "lists a layer twice"),
])
def test_impossible_memory_shapes_are_refused(bad, fragment):
    with pytest.raises(ValueError) as err:
        config(**bad)
    assert fragment in str(err.value)


@torch.no_grad()
def test_search_stays_exact_with_many_blocked_slots():
    torch.manual_seed(6)
    mem = ProductKeyMemory(16, n_keys=6, heads=2, topk=3, k_dim=8)
    x = torch.randn(30, 16)
    slots, _ = mem.select(x)
    mem.blocked_slots = slots[:4, :, :2].reshape(-1).unique()  # the two best slots of four tokens
    assert 4 <= mem.blocked_slots.numel() <= 16
    after, _ = mem.select(x)
    assert not torch.isin(after, mem.blocked_slots).any()
    assert torch.allclose(mem(x), mem.reference_forward(x), atol=1e-6)


def test_import_lensbench_is_enough_to_load_a_saved_memory_model(tmp_path):
    """In a fresh interpreter, ``import lensbench`` (which imports neither torch nor transformers)
    makes ``memory_llama`` known to the Auto classes once transformers is imported."""
    import subprocess
    import sys

    MemoryLlamaForCausalLM(config()).save_pretrained(tmp_path)
    code = ("import sys, lensbench; heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}); print(heavy, type(m).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[] MemoryLlamaForCausalLM"
