"""layer_sweep on CUDA: its models load in float16 (information_flow's ``torch_dtype``) unless the
spec sets a dtype, padded on the left, and every layer's embedding equals the model cut to that
layer (``config.num_hidden_layers = L``, ``hidden_states[L]``) loaded in float16 as the reference
loads it, to float16 rounding."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from lensbench.layer_sweep.embeddings import LayerEmbeddings, final_norm
from lensbench.models.loading import ModelSpec
from lensbench.plugins import active_registries
from lensbench.state import SubjectManager

from .gpu_models import GPU, save_llama, texts

pytestmark = GPU


def _reference(folder, batch_texts: list[str], layer: int, device) -> np.ndarray:
    """information_flow's text_automodel_wrapper: the cut model in float16, left padding, the mean of
    the last ``length`` states of ``hidden_states[layer]``."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    config = AutoConfig.from_pretrained(folder, output_hidden_states=True)
    config.num_hidden_layers = layer
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float16).to(device).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    batch = tokenizer(batch_texts, return_tensors="pt", padding=True).to(device)
    with torch.no_grad():
        hidden = model.base_model(**batch).last_hidden_state if layer == 0 else model(**batch).hidden_states[layer]
    lengths = batch["attention_mask"].sum(dim=-1)
    return torch.stack([hidden[i, -int(n):].mean(dim=0) for i, n in enumerate(lengths)]).float().cpu().numpy()


def test_the_sweep_embeds_every_layer_as_the_reference_in_float16(tmp_path, cuda):
    from lensbench.analyses.layer_sweep import LayerSweep

    folder = save_llama(tmp_path / "llama", layers=4, hidden=256)
    sweep = LayerSweep(models=[str(folder), ModelSpec(str(folder), name="kept", dtype="float32")],
                       output_dir=str(tmp_path / "out"))
    sweep.to(cuda)  # Lightning moves the analysis to the rank's device before setup
    specs = sweep.subject_specs()
    assert [s.dtype for s in specs.values()] == ["float16", "float32"]  # a spec's own dtype wins
    manager = SubjectManager(specs, cuda, active_registries().perturbations, sweep.padding_side)
    loaded = manager.activate(sweep.states()[0])
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float16}
    assert loaded.tokenizer.padding_side == "left"
    some = texts(6, words=10) + texts(2, words=200, seed=1)  # lengths differ: left padding matters
    layers = list(range(5))
    store = LayerEmbeddings(loaded.model.base_model, loaded.tokenizer, layers, "mean", batch_size=len(some),
                            device=cuda, final_norm=final_norm(loaded)[1])
    for layer in layers:
        got, want = store.get(layer, some), _reference(folder, some, layer, cuda)
        assert np.isfinite(got).all()
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * scale, err_msg=f"layer {layer}")
