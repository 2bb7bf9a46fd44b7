"""Quantized loading on CUDA (bitsandbytes; skipped where it is not installed): the linear weights
are quantized on the GPU, hidden states follow the bfloat16 model to the quantization's precision
(on the CPU, random-weight Llamas of this shape gave a relative error of 0.023 in 8 bits and 0.28 in
4 bits at the last layer), and the float weights of a quantized model are perturbed and restored
bit-exactly while quantized ones are refused."""

from __future__ import annotations

import pytest
import torch
from .gpu_models import GPU, texts

from lensbench.errors import LensbenchError
from lensbench.models.loading import ModelSpec, load_model
from lensbench.plugins import active_registries
from lensbench.state import State, SubjectManager, TransformSpec

pytestmark = [*GPU, pytest.mark.requires("bitsandbytes")]
QUANT = {"load_in_8bit": (torch.int8, 0.05), "load_in_4bit": (torch.uint8, 0.5)}


def _hidden(model, batch):
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("quant", sorted(QUANT))
def test_quantized_hidden_states_follow_the_bfloat16_model(llama, cuda, quant):
    plain = load_model(ModelSpec(str(llama), dtype="bfloat16"), device=cuda)
    batch = plain.tokenizer(texts(4), return_tensors="pt", padding=True).to(cuda)
    reference = _hidden(plain.model, batch)
    del plain
    model = load_model(ModelSpec(str(llama), dtype="bfloat16", **{quant: True}), device=cuda).model
    dtype, tolerance = QUANT[quant]
    weight = model.get_parameter("model.layers.0.mlp.up_proj.weight")
    assert weight.dtype == dtype and weight.device.type == "cuda"
    hidden = _hidden(model, batch)
    assert torch.equal(hidden[0], reference[0])  # the embeddings stay in bfloat16
    error = ((hidden[-1].float() - reference[-1].float()).norm() / reference[-1].float().norm()).item()
    assert 0 < error < tolerance, (quant, error)


def test_float_weights_of_a_4bit_model_are_restored_bit_exactly_on_cuda(llama, cuda):
    manager = SubjectManager({"m": ModelSpec(str(llama), dtype="bfloat16", load_in_4bit=True)}, cuda,
                             active_registries().perturbations)
    model = manager.activate(State("m")).model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    noisy = State("m", (TransformSpec("mult_gauss", (("group", "embed_only"), ("level", 0.5)), 5),))
    manager.activate(noisy)
    assert [n for n, p in model.named_parameters() if not torch.equal(before[n], p)] == ["model.embed_tokens.weight"]
    with pytest.raises(LensbenchError, match="is quantized"):
        manager.activate(State("m", (TransformSpec("mult_gauss", (("group", "mlp_only"), ("level", 0.5)), 5),)))
    manager.activate(State("m"))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
