"""``lensbench.training.freezing.freeze``: patterns, order, forms, errors and counts."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lensbench.errors import LensbenchError
from lensbench.training.freezing import FreezeReport, freeze


def llama(layers: int = 12, tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie)
    return LlamaForCausalLM(config)


def frozen_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def check_counts(model, report: FreezeReport) -> None:
    params = list(model.parameters())  # tied parameters once
    assert report.total == sum(p.numel() for p in params)
    assert report.frozen == sum(p.numel() for p in params if not p.requires_grad)
    assert report.trainable == sum(p.numel() for p in params if p.requires_grad)
    assert set(report.frozen_names) == frozen_names(model)


def test_exact_name_freezes_one_tensor():
    model = llama()
    name = "model.layers.0.self_attn.k_proj.weight"
    report = freeze(model, {name: "freeze"})
    assert frozen_names(model) == {name}
    assert report.matches == {name: 1}
    assert report.frozen == model.get_parameter(name).numel()
    check_counts(model, report)


def test_wildcard_matches_qualified_names():
    model = llama()
    report = freeze(model, ["*.self_attn.k_proj*"])
    assert frozen_names(model) == {f"model.layers.{i}.self_attn.k_proj.weight" for i in range(12)}
    assert report.matches == {"*.self_attn.k_proj*": 12}
    check_counts(model, report)


def test_braces_and_module_wildcard():
    model = llama()
    freeze(model, ["model.layers.{4-5}.mlp.*", "*.layers.0.mlp"])
    expected = {f"model.layers.{i}.mlp.{p}_proj.weight" for i in (0, 4, 5) for p in ("gate", "up", "down")}
    assert frozen_names(model) == expected


def test_prefix_layer_1_is_not_layer_10():
    model = llama()
    report = freeze(model, ["model.layers.1"])
    frozen = frozen_names(model)
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")}
    assert len(frozen) == 9
    assert not any(n.startswith(("model.layers.10.", "model.layers.11.")) for n in frozen)
    check_counts(model, report)
    model2 = llama()
    freeze(model2, ["model.layers.0."])
    assert frozen_names(model2) == {n for n, _ in model2.named_parameters() if n.startswith("model.layers.0.")}


def test_module_prefix_without_dot():
    model = llama()
    freeze(model, ["model.layers.0.self_attn"])
    assert frozen_names(model) == {f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"}


def test_later_entries_win_and_train_unfreezes():
    model = llama()
    report = freeze(model, {"*": "freeze", "*.mlp.*": "train", "model.layers.3.mlp.up_proj.weight": "freeze"})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    mlp = {n for n, _ in model.named_parameters() if ".mlp." in n}
    assert trainable == mlp - {"model.layers.3.mlp.up_proj.weight"}
    assert report.matches["*.mlp.*"] == 36
    check_counts(model, report)
    assert report.trainable == sum(model.get_parameter(n).numel() for n in trainable)


def test_json_string_forms_equal_python_forms():
    a, b = llama(), llama()
    freeze(a, {"*": "freeze", "*.mlp.*": "train"})
    freeze(b, '{"*": "freeze", "*.mlp.*": "train"}')
    assert frozen_names(a) == frozen_names(b) and frozen_names(a)
    c, d = llama(), llama()
    freeze(c, ["model.embed_tokens", "lm_head.weight"])
    freeze(d, '["model.embed_tokens", "lm_head.weight"]')
    assert frozen_names(c) == frozen_names(d) == {"model.embed_tokens.weight", "lm_head.weight"}


def test_strict_error_names_pattern_field_and_close_names():
    model = llama()
    with pytest.raises(LensbenchError) as err:
        freeze(model, {"model.layers.0.self_attn.kproj": "freeze"}, field="model.init_args.freeze")
    assert err.value.field == "model.init_args.freeze"
    assert "model.layers.0.self_attn.kproj" in err.value.message
    assert "model.layers.0.self_attn.k_proj" in err.value.message
    assert "\n" not in str(err.value)
    assert frozen_names(model) == set()  # nothing changed


def test_strict_error_before_any_change():
    model = llama()
    with pytest.raises(LensbenchError):
        freeze(model, {"*": "freeze", "*.nothing.*": "train"})
    assert frozen_names(model) == set()


def test_non_strict_records_unmatched():
    model = llama()
    report = freeze(model, ["*.memory.*", "model.norm"], strict=False)
    assert report.unmatched == ["*.memory.*"]
    assert report.matches == {"*.memory.*": 0, "model.norm": 1}
    assert frozen_names(model) == {"model.norm.weight"}
    assert "*.memory.*" in report.summary()


def test_unknown_action_and_bad_json_raise():
    with pytest.raises(LensbenchError, match="unknown action 'froze'.*'freeze'"):
        freeze(llama(layers=1), {"*": "froze"})
    with pytest.raises(LensbenchError, match="not valid JSON") as err:
        freeze(llama(layers=1), '{"*": freeze}', field="f")
    assert err.value.field == "f"


def test_tied_embeddings_count_once():
    model = llama(layers=2, tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    report = freeze(model, ["lm_head.weight"])  # the alias name still matches
    emb = model.model.embed_tokens.weight
    assert not emb.requires_grad
    assert report.frozen == emb.numel()
    assert report.frozen_names == ["model.embed_tokens.weight"]
    assert report.matches == {"lm_head.weight": 1}
    assert report.total == sum(p.numel() for p in model.parameters())
    report = freeze(model, ["*embed*", "lm_head*"])
    assert report.frozen == emb.numel() and report.matches == {"*embed*": 1, "lm_head*": 1}


def test_summary_line():
    model = llama(layers=2)
    report = freeze(model, ["model.embed_tokens"])
    share = 100 * 64 * 16 / report.total
    assert report.summary() == f"froze 1,024 of {report.total:,} parameters ({share:.1f}%) in 1 tensors"


def test_optimizer_over_trainable_params_leaves_frozen_bit_identical():
    model = llama(layers=4)
    freeze(model, {"*": "freeze", "model.layers.{2,3}.mlp": "train"})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"model.layers.{i}.mlp.{p}_proj.weight" for i in (2, 3) for p in ("gate", "up", "down")}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 6
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), name
        else:
            assert p.grad is None and torch.equal(p, before[name]), name
