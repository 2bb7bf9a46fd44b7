"""Vision-language models (the architectures of gemma-3-4b-it and Llava, tiny) in bfloat16 on CUDA:
they load with their processor, describe a picture, and perturb and restore bit-exactly."""

from __future__ import annotations

import pytest
import torch
from .gpu_models import GPU, all_weights, differing

from lensbench.generation import GenerationSettings, generate
from lensbench.models.loading import ModelSpec
from lensbench.plugins import active_registries
from lensbench.state import State, SubjectManager, TransformSpec

pytestmark = GPU


@pytest.mark.parametrize("which", ["gemma3", "llava"])
def test_a_vision_language_model_in_bfloat16_on_cuda(which, request, cuda):
    from PIL import Image

    folder = request.getfixturevalue(which)
    manager = SubjectManager({"m": ModelSpec(str(folder), dtype="bfloat16")}, cuda,
                             active_registries().perturbations, padding_side="left")
    loaded = manager.activate(State("m"))
    assert loaded.processor is not None
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in loaded.model.parameters()} == {"cuda"}
    picture = Image.new("RGB", (28, 28), (200, 40, 40))
    settings = GenerationSettings(max_new_tokens=6, do_sample=False, max_batch_size=4)
    prompts = ["describe the picture", "tell me what you see"]
    seen = generate(loaded.model, loaded.tokenizer, prompts, settings, 0, cuda, images=[picture, picture],
                    processor=loaded.processor)
    blind = generate(loaded.model, loaded.tokenizer, prompts, settings, 0, cuda)
    assert len(seen) == len(blind) == 2 and all(g.tokens > 0 and isinstance(g.output, str) for g in seen)
    before = all_weights(loaded.model)
    for name, level in (("mult_gauss", 0.5), ("uni_quant", 8)):
        state = State("m", (TransformSpec(name, (("group", "all"), ("level", level)), 3),))
        assert differing(all_weights(manager.activate(state).model), before)
        again = generate(manager.loaded.model, manager.loaded.tokenizer, prompts, settings, 0, cuda,
                         images=[picture, picture], processor=manager.loaded.processor)
        assert len(again) == 2
        assert not differing(all_weights(manager.activate(State("m")).model), before), name
