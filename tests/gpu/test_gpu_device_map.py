"""A model split between the GPU and the CPU (accelerate's CPU offload: weights in host memory,
computed on the GPU), by an explicit map and by ``auto`` with ``max_memory``: the plain GPU load's
outputs, perturbations drawn as on the CPU (one random stream whatever the map), bit-exact
restores, the same fingerprint; and a map over two GPUs when there are two."""

from __future__ import annotations

import pytest
import torch
from .gpu_models import GPU, all_weights, differing

from lensbench.models.fingerprint import model_fingerprint
from lensbench.models.loading import ModelSpec
from lensbench.plugins import active_registries
from lensbench.state import State, SubjectManager, TransformSpec

pytestmark = GPU

#: Layers 1 and 3 and the LM head offloaded to the CPU; the rest on GPU 0.
SPLIT = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.layers.2": 0,
         "model.layers.3": "cpu", "model.norm": 0, "model.rotary_emb": 0, "lm_head": "cpu"}


def _manager(spec: ModelSpec, device) -> SubjectManager:
    return SubjectManager({"m": spec}, torch.device(device), active_registries().perturbations)


def _logits(loaded, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=ids.to(loaded.input_device)).logits.float().cpu()


def _ids(loaded) -> torch.Tensor:
    return loaded.tokenizer(["the capital of france is paris and the sea is water"] * 2, return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("kind", ["explicit", "auto"])
def test_a_model_split_between_gpu_and_cpu(llama, cuda, kind):
    plain = _manager(ModelSpec(str(llama)), cuda).activate(State("m"))
    # auto: GPU 0 gets room for the embedding, about two blocks, and one more of the largest module
    # (accelerate keeps that much free on the main device to bring offloaded modules in): the rest
    # (the last blocks and the LM head) goes to the CPU, whatever the vocabulary's size
    embedding = plain.model.get_input_embeddings().weight
    block = sum(p.numel() * p.element_size() for p in plain.model.model.layers[0].parameters())
    room = 2 * embedding.numel() * embedding.element_size() + int(2.5 * block)
    spec = (ModelSpec(str(llama), device_map=SPLIT) if kind == "explicit" else
            ModelSpec(str(llama), device_map="auto", max_memory={0: room, "cpu": "4GiB"}))
    split = _manager(spec, cuda)
    loaded = split.activate(State("m"))
    devices = {p.device.type for p in loaded.model.parameters()}
    assert devices == {"cuda", "meta"}, devices  # meta: offloaded, the values in host memory
    assert loaded.input_device == cuda
    ids = _ids(plain)
    torch.testing.assert_close(_logits(loaded, ids), _logits(plain, ids), rtol=1e-5, atol=1e-5)
    assert model_fingerprint(spec) == model_fingerprint(ModelSpec(str(llama)))

    before = all_weights(loaded.model)
    on_cpu = _manager(ModelSpec(str(llama)), "cpu")
    for name, level in (("mult_gauss", 0.3), ("ablation", 0.4), ("uni_quant", 16)):
        state = State("m", (TransformSpec(name, (("group", "all"), ("level", level)), 5),))
        got = all_weights(split.activate(state).model)
        assert not differing(got, all_weights(on_cpu.activate(state).model)), \
            f"{name}: a model over several devices is perturbed as on the CPU"
        assert split.weights_finite()
        perturbed_logits = _logits(split.loaded, ids)
        assert not torch.equal(perturbed_logits, _logits(plain, ids))
        assert not differing(all_weights(split.activate(State("m")).model), before), f"{name}: restore"
    torch.testing.assert_close(_logits(split.loaded, ids), _logits(plain, ids), rtol=1e-5, atol=1e-5)
    if kind != "explicit":
        return
    # a group wholly on the GPU (blocks 0 and 2) draws on the GPU, as the plain GPU load does
    state = State("m", (TransformSpec("mult_gauss", (("group", "blocks[0,2]"), ("level", 0.3)), 5),))
    gpu_only = all_weights(split.activate(state).model)
    plain_manager = _manager(ModelSpec(str(llama)), cuda)
    assert not differing(gpu_only, all_weights(plain_manager.activate(state).model))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_over_two_gpus(llama):
    spec = ModelSpec(str(llama), device_map={**{k: 0 for k in SPLIT}, "model.layers.2": 1, "model.layers.3": 1,
                                             "lm_head": 1})
    manager = _manager(spec, "cuda:0")
    loaded = manager.activate(State("m"))
    assert {p.device for p in loaded.model.parameters()} == {torch.device("cuda:0"), torch.device("cuda:1")}
    before = all_weights(loaded.model)
    state = State("m", (TransformSpec("mult_gauss", (("group", "all"), ("level", 0.3)), 5),))
    got = all_weights(manager.activate(state).model)
    assert not differing(got, all_weights(_manager(ModelSpec(str(llama)), "cpu").activate(state).model))
    assert not differing(all_weights(manager.activate(State("m")).model), before)
