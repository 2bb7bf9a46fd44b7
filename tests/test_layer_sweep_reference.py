"""layer_sweep's embedding of a layer is information_flow's: the model cut to ``L`` blocks
(``config.num_hidden_layers = L``), its ``hidden_states[L]`` mean-pooled over the last ``length``
tokens of a left-padded batch, for every ``L`` of tiny Llama, GPT-NeoX and BERT models. The
reference forward here is written from transformers alone (no lensbench code); lensbench's side is
one forward pass of the whole model with the final norm applied to every layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from lensbench.errors import LensbenchError
from lensbench.layer_sweep.embeddings import LayerEmbeddings, final_norm, reference_dtype
from lensbench.models.loading import ModelSpec, load_model

# Distinct texts of different lengths: the batch is padded (on the left) to the longest.
TEXTS = ["the cat", "paris is the capital of france and the sun is on the sea", "water",
         "a moss cell in the moon", "it was the train from paris to the sea by the moon"]
BLOCKS = 3


def _rough_norms(model: torch.nn.Module) -> None:
    """Norm weights (and biases) away from their 1 (0) initial values: a norm applied twice, or the
    wrong one, then changes the numbers."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.lower():
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)


def _save(kind: str, folder: Path) -> Path:
    from transformers import BertConfig, BertModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    from lensbench.testing import tiny_tokenizer

    torch.manual_seed(0)
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    tokenizer = tiny_tokenizer()
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=BLOCKS, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=128, **ids))
    elif kind == "gpt_neox":  # as Pythia: a tokenizer without a pad token
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=BLOCKS, num_attention_heads=4, rotary_pct=0.25,
                                                 max_position_embeddings=128, **ids))
        tokenizer.pad_token = None
    else:
        model = BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=BLOCKS,
                                     num_attention_heads=4, max_position_embeddings=128, pad_token_id=0))
    _rough_norms(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["llama", "gpt_neox", "bert"])
def saved(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, _save(request.param, tmp_path_factory.mktemp("reference") / request.param)


def _reference(folder: Path, layer: int) -> np.ndarray:
    """information_flow's embedding of ``TEXTS`` at ``layer``, written from its text_automodel_wrapper:
    AutoModelForCausalLM with ``num_hidden_layers = layer``, left padding (pad = eos when missing),
    the mean of ``hidden_states[layer]`` over the last ``length`` tokens."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    config = AutoConfig.from_pretrained(folder, output_hidden_states=True)
    config.num_hidden_layers = layer
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the blocks past `layer` are unexpected weights; BERT has no LM head
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, config=config).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        if layer == 0:  # transformers 5 collects no hidden state from a model without blocks; older
            hidden = model.base_model(**batch).last_hidden_state  # versions gave this output, normed
        else:
            hidden = model(**batch).hidden_states[layer]
    lengths = batch["attention_mask"].sum(dim=-1)
    return torch.stack([hidden[i, -int(n):, :].mean(dim=0) for i, n in enumerate(lengths)]).float().numpy()


def _lensbench(folder: Path, layers: list[int], norm: str = "final") -> LayerEmbeddings:
    loaded = load_model(ModelSpec(str(folder)), padding_side="left")  # as LayerSweep loads its models
    module = final_norm(loaded)[1] if norm == "final" else None
    backbone = getattr(loaded.model, "base_model", loaded.model)
    return LayerEmbeddings(backbone, loaded.tokenizer, layers, "mean", batch_size=len(TEXTS), final_norm=module)


def test_every_layer_equals_the_truncated_model(saved):
    kind, folder = saved
    layers = list(range(BLOCKS + 1))
    store = _lensbench(folder, layers)
    for layer in layers:
        np.testing.assert_allclose(store.get(layer, TEXTS), _reference(folder, layer), rtol=1e-5, atol=1e-5,
                                   err_msg=f"{kind} layer {layer}")
    assert store.forward_passes == 1  # one forward pass gave every layer


def test_the_last_hidden_state_is_normed_by_transformers_once(saved):
    """transformers' ``hidden_states[n]`` is the last block's output passed through the final norm
    (lensbench then never norms it again); BERT has no final norm."""
    kind, folder = saved
    loaded = load_model(ModelSpec(str(folder)), padding_side="left")
    name, norm = final_norm(loaded)
    assert name == {"llama": "model.norm", "gpt_neox": "gpt_neox.final_layer_norm", "bert": None}[kind]
    caught = []
    block = loaded.model.get_submodule(loaded.anatomy.block_names[-1])
    hook = block.register_forward_hook(lambda mod, args, out: caught.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            batch = loaded.tokenizer(TEXTS, return_tensors="pt", padding=True)
            hidden = loaded.model(**batch, output_hidden_states=True).hidden_states
    finally:
        hook.remove()
    assert len(hidden) == BLOCKS + 1
    if norm is None:
        torch.testing.assert_close(hidden[BLOCKS], caught[0])
    else:
        torch.testing.assert_close(hidden[BLOCKS], norm(caught[0]))
        assert not torch.allclose(hidden[BLOCKS], caught[0], atol=1e-3)


def test_none_keeps_the_raw_states_and_differs_from_final(saved):
    kind, folder = saved
    layers = list(range(BLOCKS + 1))
    raw, normed = _lensbench(folder, layers, "none"), _lensbench(folder, layers, "final")
    loaded = load_model(ModelSpec(str(folder)), padding_side="left")
    batch = loaded.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = loaded.model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"]
    for layer in layers:
        want = torch.stack([hidden[layer][i, -int(n):].mean(dim=0) for i, n in enumerate(mask.sum(-1))])
        np.testing.assert_allclose(raw.get(layer, TEXTS), want.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(raw.get(BLOCKS, TEXTS), normed.get(BLOCKS, TEXTS), rtol=1e-6, atol=1e-6)
    differs = [not np.allclose(raw.get(layer, TEXTS), normed.get(layer, TEXTS), atol=1e-3) for layer in layers[:-1]]
    assert all(differs) if kind != "bert" else not any(differs)  # BERT: no final norm, the same under both


def test_pad_token_is_eos_when_the_tokenizer_has_none(saved):
    kind, folder = saved
    loaded = load_model(ModelSpec(str(folder)), padding_side="left")
    assert loaded.tokenizer.padding_side == "left"
    if kind == "gpt_neox":
        assert AutoTokenizer.from_pretrained(folder).pad_token is None
        assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "</s>"


def test_the_sweep_loads_its_models_padded_left_in_the_reference_dtype(saved, tmp_path):
    from lensbench.analyses.layer_sweep import LayerSweep
    from lensbench.plugins import active_registries
    from lensbench.state import SubjectManager

    kind, folder = saved
    sweep = LayerSweep(models=[str(folder), ModelSpec(str(folder), name="half", dtype="bfloat16")],
                       output_dir=str(tmp_path))
    specs = sweep.subject_specs()  # what Analysis.setup hands its SubjectManager (self.device: the CPU here)
    assert [s.dtype for s in specs.values()] == ["float32", "bfloat16"]
    assert [s.dtype for s in sweep.specs.values()] == ["auto", "bfloat16"]  # the config (and its identity) kept
    manager = SubjectManager(specs, torch.device("cpu"), active_registries().perturbations, sweep.padding_side)
    loaded = manager.activate(sweep.states()[0])
    assert loaded.tokenizer.padding_side == "left" and loaded.model.dtype == torch.float32


def test_reference_dtype():
    assert reference_dtype("auto", "cuda:0") == "float16"  # information_flow: torch_dtype=torch.float16
    assert reference_dtype("auto", torch.device("cuda", 1)) == "float16"
    assert reference_dtype("auto", "cpu") == "float32"
    assert reference_dtype("bfloat16", "cuda:0") == "bfloat16"  # the spec's own dtype wins
    assert reference_dtype("float16", "cpu") == "float16"


def test_unknown_layer_norm_is_one_line():
    from lensbench.analyses.layer_sweep import LayerSweep

    for key in ("layer_norm", "metrics_layer_norm"):
        with pytest.raises(LensbenchError) as err:
            LayerSweep(**{key: "rms"})
        assert err.value.field == f"model.init_args.{key}" and "unknown" in str(err.value)
        assert "final" in str(err.value) and "none" in str(err.value) and "\n" not in str(err.value)


def test_the_last_layer_is_always_scored(tiny_model, tmp_path):
    """``layers`` that leave out the model's last layer get it added (best_layers.csv compares with it)."""
    from lensbench.analyses.layer_sweep import LayerSweep
    from lensbench.plugins import active_registries
    from lensbench.state import SubjectManager

    for layers, want in (([0], [0, 2]), ([1, 0], [1, 0, 2]), ([-1], [2]), ([2, 0], [2, 0]), (None, [0, 1, 2])):
        sweep = LayerSweep(models=[str(tiny_model)], layers=layers, output_dir=str(tmp_path))
        sweep.subjects = SubjectManager(sweep.subject_specs(), torch.device("cpu"), active_registries().perturbations,
                                        sweep.padding_side)
        state = sweep.states()[0]
        sweep._activate(state)
        assert sweep._layers[state.checkpoint] == want, layers
        assert sweep._last[state.checkpoint] == 2


def test_right_padding_keeps_an_encoder_embedding_independent_of_its_batch(saved):
    """``padding_side: right``: a text's embedding is the one it has alone, for every architecture;
    left padding (the reference's) moves a BERT text's absolute positions with its batch's longest."""
    from lensbench.analyses.layer_sweep import LayerSweep

    kind, folder = saved
    alone = {}
    for side in ("right", "left"):
        loaded = load_model(ModelSpec(str(folder)), padding_side=side)
        backbone = getattr(loaded.model, "base_model", loaded.model)
        store = LayerEmbeddings(backbone, loaded.tokenizer, [BLOCKS], "mean", batch_size=len(TEXTS))
        single = LayerEmbeddings(backbone, loaded.tokenizer, [BLOCKS], "mean", batch_size=1)
        together, apart = store.get(BLOCKS, TEXTS), single.get(BLOCKS, TEXTS)
        alone[side] = float(np.abs(together - apart).max())
    assert alone["right"] < 1e-5, alone
    if kind == "bert":
        assert alone["left"] > 1e-3, alone
    assert LayerSweep(padding_side="right").padding_side == "right"
    with pytest.raises(LensbenchError) as err:
        LayerSweep(padding_side="middle")
    assert err.value.field == "model.init_args.padding_side" and "left" in str(err.value)
