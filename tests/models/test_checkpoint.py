"""Streaming checkpoint readers: every format reads the same tensors, one at a time."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from lensbench.errors import LensbenchError
from lensbench.models.checkpoint import open_checkpoint
from lensbench.models.loading import ModelSpec
from lensbench.models.matrices import linear_matrices, select_matrices

from .test_loading import tiny_gguf, write_tiny_gguf  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """The same tiny Llama saved as one safetensors file, safetensors shards and .bin shards."""
    from tiny import save_tiny_llama
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("ckpt")
    single = save_tiny_llama(root / "single", layers=3)
    model = AutoModelForCausalLM.from_pretrained(single)
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    # pytorch_model-*.bin shards with their index, as older transformers wrote them
    bins = root / "bins"
    shutil.copytree(single, bins, ignore=shutil.ignore_patterns("*.safetensors"))
    names = list(model.state_dict())
    parts = [names[i::3] for i in range(3)]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        fname = f"pytorch_model-0000{i}-of-00003.bin"
        torch.save({n: model.state_dict()[n].clone() for n in part}, bins / fname)
        weight_map.update({n: fname for n in part})
    (bins / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root, model


def test_single_sharded_and_bin_folders_read_the_same_numbers(formats):
    root, model = formats
    assert len(list((root / "sharded").glob("*.safetensors"))) > 1
    assert (root / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((root / "bins").glob("*.bin"))) > 1
    readers = [open_checkpoint(ModelSpec(str(root / name))) for name in ("single", "sharded", "bins")]
    readers.append(open_checkpoint(ModelSpec(str(root / "single" / "model.safetensors"))))
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" or not model.config.tie_word_embeddings}
    for reader in readers:
        assert set(reader.names()) == set(readers[0].names())
        for name in readers[0].names():
            tensor = reader.get(name)
            assert tuple(tensor.shape) == reader.shape(name)
            assert torch.equal(tensor, expected[name]), (reader.location, name)


def test_linear_matrices_come_from_the_architecture(formats):
    root, _ = formats
    reader = open_checkpoint(ModelSpec(str(root / "sharded")))
    matrices = linear_matrices(reader.names(), reader.shapes(), reader.config)
    names = [m.name for m in matrices]
    assert len([n for n in names if ".layers." in n]) == 3 * 7  # q k v o gate up down per layer
    assert not any("norm" in n or "embed" in n for n in names)
    by_name = {m.name: m for m in matrices}
    assert by_name["model.layers.2.self_attn.q_proj.weight"].layer == 2
    assert by_name["model.layers.2.self_attn.q_proj.weight"].module == "self_attn.q_proj"
    assert by_name["model.layers.0.mlp.down_proj.weight"].module == "mlp.down_proj"
    picked = linear_matrices(reader.names(), reader.shapes(), reader.config, include=["model.layers.{1-2}.mlp.*"],
                             exclude=["*.up_proj.*"])
    assert [m.name for m in picked] == sorted(
        f"model.layers.{i}.mlp.{p}.weight" for i in (1, 2) for p in ("down_proj", "gate_proj"))
    # Without a config: 2-D weights whose names are not embeddings or norms.
    fallback = linear_matrices(reader.names(), reader.shapes(), None)
    assert {m.name for m in fallback} == set(names)


def _save(cls, config, folder):
    cls(config).save_pretrained(folder)
    return open_checkpoint(ModelSpec(str(folder)))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "gpt_neox", "llama_tied", "llama_untied"])
def test_every_two_dimensional_weight_is_compared_or_skipped_with_a_reason(tmp_path, arch):
    import transformers as tf

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    cls, config = {
        "mixtral": (tf.MixtralForCausalLM, tf.MixtralConfig(**small, num_key_value_heads=1, num_local_experts=4,
                                                          num_experts_per_tok=2)),
        "qwen2_moe": (tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig(**small, num_key_value_heads=1, num_experts=4,
                                                              num_experts_per_tok=2, moe_intermediate_size=8,
                                                              shared_expert_intermediate_size=8)),
        "gpt_neox": (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(**small, tie_word_embeddings=False)),
        "llama_tied": (tf.LlamaForCausalLM, tf.LlamaConfig(**small, num_key_value_heads=1, tie_word_embeddings=True)),
        "llama_untied": (tf.LlamaForCausalLM, tf.LlamaConfig(**small, num_key_value_heads=1, tie_word_embeddings=False)),
    }[arch]
    reader = _save(cls, config, tmp_path / arch)
    two_d = [n for n in reader.names() if len(reader.shape(n)) == 2]
    chosen, skipped = select_matrices(reader.names(), reader.shapes(), reader.config)
    assert sorted([m.name for m in chosen] + [s.name for s in skipped]) == sorted(two_d)  # nothing vanishes
    reasons = {s.name: s.reason for s in skipped}
    assert set(reasons.values()) <= {"embedding", "norm"} or arch == "llama_tied"
    assert all(r == "embedding" for n, r in reasons.items() if "embed" in n and "embed_out" not in n)
    names = {m.name for m in chosen}
    if arch == "mixtral":
        assert len(chosen) == 35 and sum(m.expert is not None for m in chosen) == 2 * 4 * 3
        assert "model.layers.0.block_sparse_moe.gate.weight" in names  # the router
    if arch == "qwen2_moe":
        experts = [m for m in chosen if m.expert is not None]
        assert {m.expert for m in experts} == {0, 1, 2, 3} and all(m.layer in (0, 1) for m in experts)
        assert any(m.module.endswith("shared_expert.down_proj") for m in chosen)
        assert any(m.module == "mlp.gate" for m in chosen)  # the router
    if arch == "gpt_neox":
        assert "embed_out.weight" in names and next(m for m in chosen if m.name == "embed_out.weight").layer == -1
    if arch == "llama_untied":
        assert "lm_head.weight" in names
    if arch == "llama_tied":
        assert "lm_head.weight" not in two_d or reasons.get("lm_head.weight", "").startswith("tied to")


def test_gguf_reads_transformers_names_and_layout(tiny_gguf):  # noqa: F811
    path, model = tiny_gguf
    reader = open_checkpoint(ModelSpec(str(path)))
    state = model.state_dict()
    for name in reader.names():
        assert torch.allclose(reader.get(name).float(), state[name].float(), atol=1e-6), name


def test_an_index_naming_a_missing_shard_is_one_clear_error(formats, tmp_path):
    root, _ = formats
    broken = tmp_path / "broken"
    shutil.copytree(root / "sharded", broken)
    next(iter(sorted(broken.glob("model-*.safetensors")))).unlink()
    with pytest.raises(LensbenchError, match="lacks shards named by its index"):
        open_checkpoint(ModelSpec(str(broken)), "data.init_args.base")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(LensbenchError, match="no \\*.safetensors or pytorch_model\\*.bin"):
        open_checkpoint(ModelSpec(str(empty)))


def test_a_bare_safetensors_file_without_config_is_refused_by_name(tmp_path):
    save_file({"w": torch.zeros(2, 2)}, tmp_path / "w.safetensors")
    with pytest.raises(LensbenchError, match="config.json"):
        open_checkpoint(ModelSpec(str(tmp_path / "w.safetensors")))
