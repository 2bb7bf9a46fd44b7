"""find_anatomy / parameter_group on tiny random models of seven architectures."""

from __future__ import annotations

import pytest
import torch
from torch import nn
import transformers as T

from lensbench.errors import LensbenchError
from lensbench.models.anatomy import Anatomy, AnatomyOverrides, ParamSelection, expand_braces, find_anatomy

torch.manual_seed(0)
_GQA = dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)


def _build(kind: str) -> nn.Module:
    if kind == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**_GQA))
    if kind == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**_GQA))
    if kind == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**_GQA))
    if kind == "gemma3":
        return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**_GQA, head_dim=8))
    if kind == "neox":
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64,
                                                    num_attention_heads=4, vocab_size=128))
    if kind == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=128, n_positions=64,
                                              bos_token_id=0, eos_token_id=0))
    if kind == "bert":
        return T.BertModel(T.BertConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=4, vocab_size=128))
    raise AssertionError(kind)


KINDS = ["llama", "mistral", "qwen2", "gemma3", "neox", "gpt2", "bert"]
_CACHE: dict[str, nn.Module] = {}


@pytest.fixture(params=KINDS)
def built(request) -> tuple[str, nn.Module, Anatomy]:
    kind = request.param
    if kind not in _CACHE:
        _CACHE[kind] = _build(kind).eval()
    model = _CACHE[kind]
    return kind, model, find_anatomy(model)


def _names(sel: list[ParamSelection]) -> list[str]:
    return [s.name for s in sel]


def test_structure(built):
    kind, model, a = built
    assert a.num_layers() == model.config.num_hidden_layers == 3
    blocks = a.blocks(model)
    expected = {"gpt2": lambda: model.transformer.h, "bert": lambda: model.encoder.layer}.get(
        kind, lambda: model.get_decoder().layers)()
    assert len(blocks) == len(expected) and all(b is e for b, e in zip(blocks, expected))
    assert model.get_submodule(a.embedding_name) is model.get_input_embeddings()
    for i, block in enumerate(blocks):
        inside = {id(m) for m in block.modules()} - {id(block)}
        assert id(model.get_submodule(a.attention_names[i])) in inside
        assert id(model.get_submodule(a.mlp_names[i])) in inside
        assert a.attention_names[i].startswith(a.block_names[i] + ".")
    want_norm = {"gpt2": "transformer.ln_f", "neox": "gpt_neox.final_layer_norm", "bert": None}.get(kind, "model.norm")
    assert a.final_norm_name == want_norm
    d = a.describe()
    assert d["num_layers"] == 3 and d["embedding"] == a.embedding_name
    import json
    json.dumps(d)


def test_attn_only_one_weight_per_layer(built):
    kind, model, a = built
    sel = a.parameter_group(model, "attn_only")
    params = dict(model.named_parameters())
    for i, bn in enumerate(a.block_names):
        mine = [s for s in sel if s.name.startswith(bn + ".")]
        weights = [s for s in mine if s.name.endswith(".weight")]
        biases = [s for s in mine if s.name.endswith(".bias")]
        assert len(weights) == 1
        wmod = weights[0].name.rsplit(".", 1)[0]
        has_bias = wmod + ".bias" in params
        assert len(biases) == (1 if has_bias else 0) and len(mine) == len(weights) + len(biases)
        assert weights[0].name.startswith(a.attention_names[i] + ".")
    assert len(sel) == a.num_layers() * (2 if kind in ("qwen2", "neox", "gpt2", "bert") else 1)
    one = a.parameter_group(model, "attn_only[2]")
    assert all(s.name.startswith(a.block_names[2] + ".") for s in one) and one
    if kind in ("llama", "mistral", "gemma3", "qwen2"):
        assert all(".self_attn.v_proj." in s.name and s.index is None for s in sel)
        assert params[sel[0].name].shape[0] == 16  # 2 kv heads * head_dim 8


def test_gpt2_value_slice_is_the_value():
    model = _CACHE.get("gpt2") or _build("gpt2").eval()
    a = find_anatomy(model)
    sel = a.parameter_group(model, "attn_only[1]")
    w, b = sel
    assert (w.name, w.dim, b.dim) == ("transformer.h.1.attn.c_attn.weight", 1, 0)
    x = torch.randn(2, 5, 32)
    attn = model.transformer.h[1].attn
    _, _, v_model = attn.c_attn(x).split(attn.split_size, dim=2)
    v_hand = x @ w.get(model) + b.get(model)  # Conv1D: x @ W + b
    torch.testing.assert_close(v_hand, v_model)
    # a hook on the real forward sees the same values
    seen = {}

    def hook(mod, inp, out):
        seen["v"] = out.split(attn.split_size, dim=2)[2]

    h = attn.c_attn.register_forward_hook(hook)
    with torch.no_grad():
        out = model(torch.randint(0, 128, (1, 6)), output_hidden_states=True)
    h.remove()
    hid = model.transformer.h[1].ln_1(out.hidden_states[1])
    torch.testing.assert_close(seen["v"], hid @ w.get(model) + b.get(model))


def test_neox_value_slice_is_the_value():
    model = _CACHE.get("neox") or _build("neox").eval()
    a = find_anatomy(model)
    w, b = a.parameter_group(model, "attn_only[0]")
    assert (w.name, w.dim) == ("gpt_neox.layers.0.attention.query_key_value.weight", 0)
    attn = model.gpt_neox.layers[0].attention
    hd, heads = attn.head_size, 4
    x = torch.randn(2, 5, 32)
    qkv = attn.query_key_value(x).view(2, 5, heads, 3 * hd)
    v_model = qkv.chunk(3, dim=-1)[2].reshape(2, 5, heads * hd)  # the model's own split
    v_hand = x @ w.get(model).T + b.get(model)
    torch.testing.assert_close(v_hand, v_model)
    assert w.index.numel() == 32 and len(set(w.index.tolist())) == 32


def test_groups(built):
    kind, model, a = built
    all_names = [n for n, _ in model.named_parameters()]
    assert _names(a.parameter_group(model, "all")) == all_names
    blocks = _names(a.parameter_group(model, "blocks"))
    assert blocks and all(n.startswith(tuple(b + "." for b in a.block_names)) for n in blocks)
    mlp1 = _names(a.parameter_group(model, "mlp_only[1]"))
    assert mlp1 and all(n.startswith(a.block_names[1] + ".") for n in mlp1)
    assert not any(n.startswith(a.attention_names[1] + ".") for n in mlp1)
    assert set(mlp1) < set(_names(a.parameter_group(model, "mlp_only")))
    attn = _names(a.parameter_group(model, "attn[0,2]"))
    assert attn and all(n.startswith((a.attention_names[0] + ".", a.attention_names[2] + ".")) for n in attn)
    emb = _names(a.parameter_group(model, "embed_only"))
    assert emb == [a.embedding_name + ".weight"]
    assert model.get_parameter(emb[0]) is model.get_input_embeddings().weight
    if kind == "bert":
        want = {f"encoder.layer.1.{m}.{p}" for m in ("intermediate.dense", "output.dense") for p in ("weight", "bias")}
        assert want <= set(mlp1)
        assert not any("attention" in n for n in mlp1)


def test_tied_embedding_listed_once():
    model = _CACHE.get("gpt2") or _build("gpt2").eval()
    a = find_anatomy(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert _names(a.parameter_group(model, "embed_only")) == ["transformer.wte.weight"]
    assert _names(a.parameter_group(model, "lm_head.weight")) == ["transformer.wte.weight"]  # alias glob
    assert _names(a.parameter_group(model, "all")).count("transformer.wte.weight") == 1


def test_glob_with_braces():
    model = _CACHE.get("llama") or _build("llama").eval()
    a = find_anatomy(model)
    got = _names(a.parameter_group(model, "model.layers.{1-2}.mlp.*"))
    assert got == [f"model.layers.{i}.mlp.{p}_proj.weight" for i in (1, 2) for p in ("gate", "up", "down")]
    got = _names(a.parameter_group(model, "model.layers.{0,2}.self_attn.{q,v}_proj.weight"))
    assert got == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                   "model.layers.2.self_attn.q_proj.weight", "model.layers.2.self_attn.v_proj.weight"]
    assert expand_braces("a{0-2}.{x,y{1,2}}") == ["a0.x", "a0.y1", "a0.y2", "a1.x", "a1.y1", "a1.y2",
                                                  "a2.x", "a2.y1", "a2.y2"]


def test_errors():
    model = _CACHE.get("llama") or _build("llama").eval()
    a = find_anatomy(model)
    with pytest.raises(LensbenchError, match=r"did you mean 'mlp_only'") as e:
        a.parameter_group(model, "mlp_onyl")
    assert "\n" not in str(e.value) and e.value.field == "parameter_group"
    with pytest.raises(LensbenchError, match=r"did you mean 'attn_only'"):
        a.parameter_group(model, "attn_onl[1]")
    with pytest.raises(LensbenchError, match=r"matches no parameter"):
        a.parameter_group(model, "model.layers.*.nonexistent.*")
    with pytest.raises(LensbenchError, match=r"out of range.*0-2"):
        a.parameter_group(model, "mlp_only[1-5]")
    with pytest.raises(LensbenchError, match=r"reversed"):
        a.parameter_group(model, "attn[2-1]")
    with pytest.raises(LensbenchError, match=r"bad layer range"):
        a.parameter_group(model, "attn[x]")
    with pytest.raises(LensbenchError, match=r"takes no layer range"):
        a.parameter_group(model, "embed_only[0]")


class _Mix(nn.Module):
    def __init__(self):
        super().__init__()
        self.qk = nn.Linear(8, 16)
        self.v = nn.Linear(8, 8)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = _Mix()
        self.dense = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))


class _Flat(nn.Module):
    """Blocks as plain attributes: no ModuleList, no get_decoder."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(50, 8)
        self.stage0, self.stage1, self.stage2 = _Block(), _Block(), _Block()
        self.stage10 = _Block()
        self.head = nn.Linear(8, 50)


class _Listed(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(50, 8)
        self.stack = nn.ModuleList([_Block() for _ in range(2)])


def test_unmappable_custom_module_message():
    with pytest.raises(LensbenchError) as e:
        find_anatomy(_Flat())
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("anatomy:")
    assert "top-level modules: tok, stage0, stage1, stage2, stage10, head" in msg
    assert 'anatomy: {blocks: "<glob>"' in msg
    # blocks found, but nothing looks like attention
    with pytest.raises(LensbenchError, match=r"cannot find the attention in block 'stack.0'.*children: mix, dense"):
        find_anatomy(_Listed())


def test_overrides_make_custom_mappable():
    model = _Flat()
    ov = AnatomyOverrides(blocks="stage*", attention="mix", mlp="dense", embedding="tok")
    a = find_anatomy(model, ov)
    assert a.block_names == ["stage0", "stage1", "stage2", "stage10"]  # numeric order, outermost only
    assert a.attention_names[3] == "stage10.mix" and a.mlp_names[0] == "stage0.dense"
    assert a.embedding_name == "tok" and a.final_norm_name is None
    assert _names(a.parameter_group(model, "attn_only[3]")) == ["stage10.mix.v.weight", "stage10.mix.v.bias"]
    assert _names(a.parameter_group(model, "mlp_only[0]")) == [f"stage0.dense.{i}.{p}" for i in (0, 1)
                                                               for p in ("weight", "bias")]
    b = find_anatomy(_Listed(), AnatomyOverrides(attention="mix", mlp="dense"))
    assert b.block_names == ["stack.0", "stack.1"] and b.embedding_name == "tok"
    with pytest.raises(LensbenchError, match=r"blocks glob 'layer\*' matches no module.*top-level modules"):
        find_anatomy(model, AnatomyOverrides(blocks="layer*"))
    with pytest.raises(LensbenchError, match=r"embedding 'tokk'.*did you mean 'tok'"):
        find_anatomy(model, AnatomyOverrides(blocks="stage*", attention="mix", mlp="dense", embedding="tokk"))
    with pytest.raises(LensbenchError, match=r"attention glob 'attn' matches no module of block 'stage0'"):
        find_anatomy(model, AnatomyOverrides(blocks="stage*", attention="attn", mlp="dense"))
