"""Weights that do not fit their model are refused in one line naming the tensors, unless the model
entry allows missing ones; tied weights, a base model leaving out its checkpoint's head, and real
checkpoints of other architectures load as before (lensbench.models.integrity)."""

from __future__ import annotations

import contextlib
import json
import logging
import os

import pytest
import torch
from reliability.cases_weights import UP, copy_with, relabel, with_remote_code
from safetensors.torch import load_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaModel,
)

from lensbench.errors import LensbenchError
from lensbench.models.fingerprint import weight_settings
from lensbench.models.integrity import allowed_missing
from lensbench.models.loading import ModelSpec, load_model, takes_images

FIELD = "model.init_args.models[0]"


@contextlib.contextmanager
def logged(name: str):
    """The messages logger ``name`` handles while open."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger, handler = logging.getLogger(name), Keep()
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def refusal(source, **options) -> LensbenchError:
    with pytest.raises(LensbenchError) as excinfo:
        load_model(ModelSpec(source=str(source), **options), field=FIELD)
    assert "\n" not in str(excinfo.value)
    return excinfo.value


def test_a_missing_tensor_is_refused_naming_it(tmp_path, tiny_model):
    error = refusal(copy_with(tiny_model, tmp_path / "m", drop=(UP,)))
    assert error.field == f"{FIELD}.source"
    assert f"missing {UP} (transformers would start it random)" in error.message
    assert "set allow_missing_weights: true on the model entry" in error.message


def test_allow_missing_weights_loads_and_says_which_start_random(tmp_path, tiny_model):
    folder = copy_with(tiny_model, tmp_path / "m", drop=(UP,))
    saved = load_file(tiny_model / "model.safetensors")
    with logged("lightning.pytorch.lensbench") as seen:
        loaded = load_model(ModelSpec(source=str(folder), allow_missing_weights=True), field=FIELD)
    params = loaded.params_by_name()
    assert torch.equal(params["model.layers.0.mlp.down_proj.weight"], saved["model.layers.0.mlp.down_proj.weight"])
    assert params[UP].shape == saved[UP].shape and not torch.equal(params[UP], saved[UP])
    assert [m for m in seen if f"lacks {UP}, which starts random (allow_missing_weights is set on {FIELD})" in m]
    # globs: those named may be missing, others not
    load_model(ModelSpec(source=str(folder), allow_missing_weights=["model.layers.*.mlp.*"]), field=FIELD)
    assert UP in refusal(folder, allow_missing_weights=["lm_head.*"]).message


def test_a_head_to_train_loads_when_allowed(tmp_path, tiny_model):
    """A base checkpoint (no lm_head) loaded as a causal LM: its untied head is missing, refused
    unless the entry allows it."""
    base = tmp_path / "base"
    LlamaModel.from_pretrained(tiny_model).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny_model / name).exists():
            (base / name).write_bytes((tiny_model / name).read_bytes())
    assert "missing lm_head.weight" in refusal(base, head="causal_lm").message
    loaded = load_model(ModelSpec(source=str(base), head="causal_lm", allow_missing_weights=["lm_head.*"]), field=FIELD)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"


def test_tied_weights_and_a_dropped_head_load(tmp_path, tiny_model):
    """Tied embeddings (no lm_head saved) and a base model leaving out its checkpoint's lm_head
    are not refused."""
    tied = copy_with(tiny_model, tmp_path / "tied", config={"tie_word_embeddings": True})
    from safetensors.torch import save_file

    state = load_file(tied / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, tied / "model.safetensors", metadata={"format": "pt"})
    model = load_model(ModelSpec(source=str(tied)), field=FIELD).model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    base = load_model(ModelSpec(source=str(tiny_model), head="base"), field=FIELD).model
    assert type(base).__name__ == "LlamaModel"
    # but not a tensor inside the base model, whether saved with its prefix or without
    extra = copy_with(tiny_model, tmp_path / "extra", add={"model.layers.0.extra.weight": torch.zeros(2)})
    assert "holds model.layers.0.extra.weight, which LlamaModel" in refusal(extra, head="base").message
    bare = tmp_path / "bare"
    LlamaModel.from_pretrained(tiny_model).save_pretrained(bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).write_bytes((tiny_model / name).read_bytes())
    state = load_file(bare / "model.safetensors")
    save_file({**state, "layers.0.extra.weight": torch.zeros(2)}, bare / "model.safetensors", metadata={"format": "pt"})
    assert "holds layers.0.extra.weight, which LlamaModel" in refusal(bare, head="base").message


@pytest.mark.parametrize("build", ["gpt2", "neox"])
def test_other_architectures_with_legacy_buffers_load(tmp_path, tiny_model, build):
    """GPT-2 and GPT-NeoX checkpoints holding the causal-mask buffers older versions saved: those
    transformers ignores itself are not refused."""
    from safetensors.torch import save_file

    folder = tmp_path / build
    if build == "gpt2":
        GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)).save_pretrained(folder)
        extra = {"transformer.h.0.attn.bias": torch.ones(1, 1, 32, 32),  # ignored by transformers itself
                 "transformer.h.0.attn.masked_bias": torch.tensor(-1e4)}  # saved by transformers 3-4, not ignored
    else:
        GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32)).save_pretrained(folder)
        extra = {"gpt_neox.layers.0.attention.bias": torch.ones(1, 1, 32, 32, dtype=torch.bool),
                 "gpt_neox.layers.0.attention.masked_bias": torch.tensor(-1e4)}
    state = load_file(folder / "model.safetensors")
    save_file({**state, **extra}, folder / "model.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_model / name).read_bytes())
    assert load_model(ModelSpec(source=str(folder)), field=FIELD).model is not None


def test_an_unexpected_tensor_is_refused_naming_it(tmp_path, tiny_model):
    folder = copy_with(tiny_model, tmp_path / "u", add={"model.layers.1.extra.weight": torch.zeros(2)})
    error = refusal(folder)
    assert "holds model.layers.1.extra.weight, which LlamaForCausalLM has no place for" in error.message
    assert "allow_missing_weights" not in error.message


def test_shapes_that_do_not_match_config_json_are_refused(tmp_path, tiny_model):
    error = refusal(copy_with(tiny_model, tmp_path / "t", transpose=(UP,)))
    assert f"do not match its config.json: {UP} (32x64 in the checkpoint, 64x32 by config.json);" in error.message
    error = refusal(copy_with(tiny_model, tmp_path / "w", config={"intermediate_size": 48}))
    assert "model.layers.0.mlp.down_proj.weight (32x64 in the checkpoint, 32x48 by config.json)" in error.message
    assert "and 3 more" in error.message  # 6 tensors: 3 named


def test_a_header_calling_float_data_int32_is_refused(tmp_path, tiny_model):
    folder = copy_with(tiny_model, tmp_path / "i")
    relabel(folder / "model.safetensors", UP, "I32")
    error = refusal(folder)
    assert f"declares integer data for floating-point weights: {UP} (I32, a float32 weight)" in error.message
    # the same file named on its own (the state-dict path)
    assert UP in refusal(folder / "model.safetensors").message


def test_a_config_transformers_rejects_is_one_line(tmp_path, tiny_model):
    from lensbench.analyses.loop_identity import model_shape

    folder = copy_with(tiny_model, tmp_path / "h", config={"hidden_size": 640, "num_attention_heads": 9})
    error = refusal(folder)
    assert error.message.startswith(f"the config.json of '{folder}' is invalid: The hidden size (640) is not a "
                                    "multiple of the number of attention heads (9); fix")
    with pytest.raises(LensbenchError) as excinfo:
        model_shape(ModelSpec(source=str(folder)), "model.init_args.baseline")
    assert excinfo.value.field == "model.init_args.baseline.source" and "(640)" in excinfo.value.message
    with pytest.raises(LensbenchError) as excinfo:
        takes_images(ModelSpec(source=str(folder)), "model.init_args.model")
    assert excinfo.value.field == "model.init_args.model.source" and "(640)" in excinfo.value.message


def test_model_code_is_refused_naming_trust_remote_code(tmp_path, tiny_model):
    error = refusal(with_remote_code(tiny_model, tmp_path / "r"))
    assert error.field == f"{FIELD}.trust_remote_code"
    assert "set trust_remote_code: true on the model entry, if you trust that code" in error.message


def test_a_symlink_loop_and_a_dangling_link_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.symlink("loop", "loop")
    os.symlink("nowhere", "dangling")
    assert refusal("loop").message.startswith("'loop' is a symlink loop")
    assert refusal("dangling").message.startswith("'dangling' is a symlink to 'nowhere', which does not exist")


def test_the_load_report_is_held_back(tmp_path, tiny_model):
    """transformers' table of missing tensors is not printed beside the one line."""
    with logged("transformers.modeling_utils") as seen:
        refusal(copy_with(tiny_model, tmp_path / "m", drop=(UP,)))
    assert not [m for m in seen if "LOAD REPORT" in m]


def test_allow_missing_weights_is_left_out_of_identity_at_its_default(tiny_model):
    assert "allow_missing_weights" not in weight_settings(ModelSpec(source=str(tiny_model)))
    assert weight_settings(ModelSpec(source=str(tiny_model), allow_missing_weights=True))["allow_missing_weights"]
    assert allowed_missing(["lm_head.*"], "lm_head.weight") and not allowed_missing(["lm_head.*"], UP)
    assert not allowed_missing(False, UP) and allowed_missing(True, UP)


def test_the_config_json_is_untouched(tmp_path, tiny_model):
    """Refusing reads the checkpoint only."""
    folder = copy_with(tiny_model, tmp_path / "m", drop=(UP,))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    refusal(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 32


def test_the_dtypes_are_read_from_every_shard_and_from_the_hub_cache(tmp_path, tiny_model, monkeypatch):
    """A sharded folder (its index names the shards) and a hub id in the Hugging Face cache are
    checked like a folder holding model.safetensors."""
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(sharded, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((tiny_model / name).read_bytes())
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2
    load_model(ModelSpec(source=str(sharded)), field=FIELD)  # whole: loads
    relabel(sharded / index[UP], UP, "I32")
    assert f"{UP} (I32, a float32 weight)" in refusal(sharded).message
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someorg--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = copy_with(tiny_model, repo / "snapshots" / commit)
    relabel(snapshot / "model.safetensors", UP, "I32")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert f"header of 'someorg/tiny' declares integer data for floating-point weights: {UP}" in \
        refusal("someorg/tiny").message
