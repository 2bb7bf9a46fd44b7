"""Restores on CUDA are bit-exact for every built-in transform that changes a Llama's weights,
in float32 and bfloat16, with the clean copies kept on the GPU or (memory short) in pinned host memory."""

from __future__ import annotations

import pytest
import torch
from .gpu_models import GPU, all_weights, differing, needs_smollm2

from lensbench.models.loading import ModelSpec
from lensbench.plugins import active_registries
from lensbench.state import State, SubjectManager, TransformSpec

pytestmark = GPU

#: Every built-in weight transform that applies to a plain Llama (the memory ones need a memory layer).
CASES = {
    "mult_gauss": {"level": 0.5, "group": "all"},
    "add_gauss": {"level": 0.5, "group": "all"},
    "ablation": {"level": 0.5, "group": "all"},
    "uni_quant": {"level": 4, "group": "all"},
    "ablate_attention_head": {"layer": 1, "head": 2},
    "ablate_mlp_neurons": {"layer": 2, "neurons": [0, 5, 17, 300]},
}


def _state(name: str, seed: int = 11) -> State:
    return State("m", (TransformSpec(name, tuple(sorted(CASES[name].items())), seed),))


def test_the_cases_cover_every_builtin_weight_transform():
    registry = active_registries().perturbations
    builtin = {e.name for e in registry if e.plugin.startswith("lensbench (built-in)")}
    memory_only = {n for n in builtin if "memory" in n}
    assert builtin - memory_only - {"loop_layers"} == set(CASES)


@pytest.mark.parametrize("copies", ["gpu", "pinned"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_restore_is_bit_exact_on_cuda_for_every_builtin_transform(llama, cuda, dtype, copies, monkeypatch):
    if copies == "pinned":  # no room on the GPU: clean copies go to pinned host memory
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 1 << 40))
    manager = SubjectManager({"m": ModelSpec(str(llama), dtype=dtype)}, cuda, active_registries().perturbations)
    base = manager.activate(State("m"))
    assert {p.device.type for p in base.model.parameters()} == {"cuda"}
    assert {p.dtype for p in base.model.parameters()} == {getattr(torch, dtype)}
    before = all_weights(base.model)
    perturbed = {}
    for name in CASES:
        changed = all_weights(manager.activate(_state(name)).model)
        touched = set(manager.touched_names())
        assert touched and set(differing(changed, before)) and set(differing(changed, before)) <= touched, name
        if copies == "pinned" and name in ("mult_gauss", "ablation"):
            assert all(c.is_pinned() for c in manager._originals.values())
        perturbed[name] = changed
        restored = all_weights(manager.activate(State("m")).model)
        assert not differing(restored, before), f"{name}: restore is not bit-exact"
    names = list(CASES)
    for a, b in zip(names, names[1:] + names[:1]):  # from one perturbed state straight to another
        manager.activate(_state(a))
        assert not differing(all_weights(manager.activate(_state(b)).model), perturbed[b]), f"{a} -> {b}"
    assert not differing(all_weights(manager.activate(State("m")).model), before)
    assert manager.loads == 1


@needs_smollm2
def test_the_embedded_smollm2_in_bfloat16_restores_bit_exactly(cuda):
    manager = SubjectManager({"m": ModelSpec("smollm2", dtype="bfloat16")}, cuda, active_registries().perturbations)
    before = all_weights(manager.activate(State("m")).model)
    for name in ("mult_gauss", "uni_quant"):
        manager.activate(_state(name))
        assert not differing(all_weights(manager.activate(State("m")).model), before), name
