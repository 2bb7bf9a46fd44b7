"""SubjectManager: moving one loaded tiny model between states, restoring touched tensors exactly."""

from __future__ import annotations

import pytest
import torch
from tiny import save_tiny_llama

from lensbench.errors import LensbenchError
from lensbench.models.loading import ModelSpec
from lensbench.registry import Registry
from lensbench.state import Rows, State, SubjectManager, Transform, TransformSpec

DOWN = "model.layers.0.mlp.down_proj.weight"
Q = "model.layers.1.self_attn.q_proj.weight"


class ScaleNoise(Transform):
    """Scales one weight by ``scale`` and adds ``sigma`` times seeded Gaussian noise."""

    name = "scale_noise"

    def touched(self, subject):
        return [self.params.get("target", DOWN)]

    def apply(self, subject, generator):
        model = subject.model
        weight = model.get_parameter(self.params.get("target", DOWN))
        noise = torch.randn(weight.shape, generator=generator, device=weight.device, dtype=weight.dtype)
        weight.mul_(self.params.get("scale", 1.0)).add_(noise * self.params.get("sigma", 0.0))


class AddRows(Transform):
    """Adds ``delta`` to the slices ``index`` of ``target`` along ``dim``; touches only those."""

    name = "add_rows"

    def touched(self, subject):
        return [Rows(self.params.get("target", DOWN), tuple(self.params["index"]), self.params.get("dim", 0))]

    def apply(self, subject, generator):
        weight = subject.model.get_parameter(self.params.get("target", DOWN))
        index = torch.tensor(self.params["index"])
        weight.index_add_(self.params.get("dim", 0), index,
                          torch.full_like(weight.index_select(self.params.get("dim", 0), index), self.params["delta"]))


class Broken(Transform):
    """Names a parameter the model does not have."""

    name = "broken"

    def touched(self, subject):
        return ["model.layers.99.nothing"]

    def apply(self, subject, generator):
        raise AssertionError("must not be applied")


class AddGate(Transform):
    """Structural: gives layer 0's MLP a new parameter ``gate`` (removed again by ``undo``)."""

    name = "add_gate"
    structural = True

    def touched(self, subject):
        return []

    def apply(self, subject, generator):
        subject.model.get_submodule("model.layers.0.mlp").gate = torch.nn.Parameter(torch.ones(3))

    def undo(self, subject):
        del subject.model.get_submodule("model.layers.0.mlp").gate


def expected(original: torch.Tensor, scale: float, sigma: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(original.shape, generator=gen, dtype=original.dtype)
    return original.clone().mul_(scale).add_(noise * sigma)


def noisy(checkpoint: str, seed: int, scale: float = 2.0, sigma: float = 0.1, target: str = DOWN) -> State:
    params = (("scale", scale), ("sigma", sigma), ("target", target))
    return State(checkpoint, (TransformSpec("scale_noise", params, seed),))


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-other", seed=1)


@pytest.fixture
def registry():
    reg = Registry("perturbation", base=Transform)
    reg.add(ScaleNoise, "tests")
    reg.add(Broken, "tests")
    reg.add(AddRows, "tests")
    reg.add(AddGate, "tests")
    return reg


@pytest.fixture
def manager(tiny_model, other_model, registry):
    specs = {"a": ModelSpec(str(tiny_model)), "b": ModelSpec(str(other_model))}
    return SubjectManager(specs, torch.device("cpu"), registry)


def weights(loaded) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in loaded.model.named_parameters()}


def assert_same(current: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert current.keys() == reference.keys()
    different = [name for name in reference if not torch.equal(current[name], reference[name])]
    assert not different, f"changed: {different[:5]}"


def test_moving_between_states_of_one_checkpoint_restores_exactly_and_loads_once(manager):
    plain = weights(manager.activate(State("a")))
    original = plain[DOWN]

    loaded = manager.activate(noisy("a", seed=1))
    after_a = weights(loaded)
    assert torch.equal(after_a[DOWN], expected(original, 2.0, 0.1, 1))
    assert_same({k: v for k, v in after_a.items() if k != DOWN}, {k: v for k, v in plain.items() if k != DOWN})

    # State B starts from the original weights, not from state A's.
    after_b = weights(manager.activate(noisy("a", seed=2, scale=0.5, sigma=0.3)))
    assert torch.equal(after_b[DOWN], expected(original, 0.5, 0.3, 2))

    # A state touching another tensor: the previous state's tensor is put back bit-exactly.
    after_c = weights(manager.activate(noisy("a", seed=3, target=Q)))
    assert torch.equal(after_c[DOWN], original)
    assert torch.equal(after_c[Q], expected(plain[Q], 2.0, 0.1, 3))

    assert_same(weights(manager.activate(State("a"))), plain)
    assert manager.loads == 1
    assert manager.restores == 4


def test_same_seed_same_weights_other_seed_other_weights(manager):
    first = weights(manager.activate(noisy("a", seed=7)))[DOWN]
    manager.activate(noisy("a", seed=8))
    other = weights(manager.loaded)[DOWN]
    again = weights(manager.activate(noisy("a", seed=7)))[DOWN]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert manager.loads == 1


def test_activating_the_current_state_again_does_nothing(manager):
    state = noisy("a", seed=1)
    loaded = manager.activate(state)
    before = weights(loaded)
    assert manager.activate(noisy("a", seed=1)) is loaded  # an equal state, not the same object
    assert_same(weights(loaded), before)
    assert manager.restores == 0 and manager.loads == 1


def test_two_transforms_on_one_tensor_compose_and_undo(manager):
    original = weights(manager.activate(State("a")))[DOWN]
    params1 = (("scale", 3.0), ("sigma", 0.0))
    params2 = (("scale", 1.0), ("sigma", 0.2))
    both = State("a", (TransformSpec("scale_noise", params1, 0), TransformSpec("scale_noise", params2, 5)))
    got = weights(manager.activate(both))[DOWN]
    assert torch.equal(got, expected(expected(original, 3.0, 0.0, 0), 1.0, 0.2, 5))
    assert torch.equal(weights(manager.activate(State("a")))[DOWN], original)


def test_switching_checkpoint_reloads(manager, tiny_model, other_model):
    a_plain = weights(manager.activate(State("a")))
    manager.activate(noisy("a", seed=1))
    b_plain = weights(manager.activate(State("b")))
    assert manager.loads == 2
    assert not torch.equal(a_plain[DOWN], b_plain[DOWN])  # really the other model
    b_noisy = weights(manager.activate(noisy("b", seed=1)))
    assert torch.equal(b_noisy[DOWN], expected(b_plain[DOWN], 2.0, 0.1, 1))
    assert manager.loads == 2
    # Back to the first checkpoint: a fresh load, no stale saved tensors of the other model.
    assert_same(weights(manager.activate(State("a"))), a_plain)
    assert manager.loads == 3
    assert torch.equal(weights(manager.activate(noisy("a", seed=1)))[DOWN], expected(a_plain[DOWN], 2.0, 0.1, 1))
    assert_same(weights(manager.activate(State("a"))), a_plain)
    assert manager.loads == 3


def test_release_forgets_the_model(manager):
    manager.activate(State("a"))
    manager.release()
    assert manager.loaded is None and manager.state is None
    manager.activate(State("a"))
    assert manager.loads == 2


def test_unknown_transform_is_an_error_naming_the_field(manager):
    with pytest.raises(LensbenchError) as err:
        manager.activate(State("a", (TransformSpec("scale_nosie"),)))
    assert err.value.field == "transforms" and "did you mean 'scale_noise'" in str(err.value)


def test_transform_naming_unknown_parameters_is_an_error(manager):
    with pytest.raises(LensbenchError, match=r"transform 'broken' names unknown parameters \['model.layers.99.nothing'\]"):
        manager.activate(State("a", (TransformSpec("broken"),)))


def test_a_failed_activation_does_not_leave_a_half_transformed_model(manager):
    plain = weights(manager.activate(State("a")))
    half = State("a", (TransformSpec("scale_noise", (("scale", 3.0),), 0), TransformSpec("nope")))
    with pytest.raises(LensbenchError):
        manager.activate(half)
    assert_same(weights(manager.activate(State("a"))), plain)


def rows(index, delta=1.0, dim=0, target=DOWN, seed=0) -> TransformSpec:
    return TransformSpec("add_rows", (("delta", delta), ("dim", dim), ("index", tuple(index)), ("target", target)), seed)


def test_row_transforms_save_and_restore_only_their_rows(manager):
    clean = weights(manager.activate(State("a")))
    loaded = manager.activate(State("a", (rows([1, 3]),)))
    changed = weights(loaded)
    assert torch.equal(changed[DOWN][[1, 3]], clean[DOWN][[1, 3]] + 1) and torch.equal(changed[DOWN][0], clean[DOWN][0])
    assert manager._originals == {}  # no whole copy of the tensor was kept
    assert [(n, d, i.tolist(), c.shape) for _, n, d, i, c in manager._slices] == [(DOWN, 0, [1, 3], (2, clean[DOWN].shape[1]))]
    manager.activate(State("a", (rows([2], delta=-2.0, dim=1),)))  # columns now
    after = weights(manager.loaded)
    assert torch.equal(after[DOWN][:, 2], clean[DOWN][:, 2] - 2) and torch.equal(after[DOWN][:, 1], clean[DOWN][:, 1])
    manager.activate(State("a"))
    assert_same(weights(manager.loaded), clean)


def test_any_mix_of_row_and_whole_tensor_transforms_restores_bit_exactly(manager):
    clean = weights(manager.activate(State("a")))
    sequence = [
        (rows([0, 1]), TransformSpec("scale_noise", (("scale", 3.0), ("sigma", 0.5), ("target", DOWN)), 4)),
        (TransformSpec("scale_noise", (("scale", 0.5), ("sigma", 0.1), ("target", DOWN)), 2), rows([1, 2], delta=5.0)),
        (rows([0]), rows([0], delta=7.0), rows([1, 0], dim=1)),
        (rows([3], target=Q), TransformSpec("scale_noise", (("scale", 2.0), ("sigma", 0.0), ("target", Q)), 0), rows([3], target=Q)),
    ]
    for transforms in sequence:
        manager.activate(State("a", transforms))
        manager.activate(State("a"))
        assert_same(weights(manager.loaded), clean)
    # composed in one state, rows then whole: the whole copy is the clean tensor, not the rows' result
    manager.activate(State("a", sequence[0]))
    expect = clean[DOWN].clone()
    expect[[0, 1]] += 1
    assert torch.equal(manager.loaded.model.get_parameter(DOWN).detach(), expected(expect, 3.0, 0.5, 4))


def test_a_row_index_out_of_range_is_an_error(manager):
    manager.activate(State("a"))
    clean = weights(manager.loaded)
    with pytest.raises(LensbenchError, match="out of range"):
        manager.activate(State("a", (rows([10_000]),)))
    assert_same(weights(manager.loaded), clean)


def test_parameters_are_walked_once_per_structure_and_every_time_for_a_placed_model(tiny_model):
    from lensbench.models.loading import load_model

    loaded = load_model(ModelSpec(str(tiny_model)))
    first = loaded.params_by_name()
    assert loaded.params_by_name() is first  # kept: the structure is the same
    assert first == dict(loaded.model.named_parameters())
    assert loaded.parameter_names() == tuple(n for n, _ in loaded.model.named_parameters(remove_duplicate=False))
    loaded.structure_changed()
    assert loaded.params_by_name() is not first
    loaded.model.hf_device_map = {"": "cpu"}  # placed: offloaded weights are swapped in and out
    assert loaded.params_by_name() is not loaded.params_by_name()


def test_the_parameters_kept_by_name_follow_structural_transforms(manager):
    gate = "model.layers.0.mlp.gate"
    plain = manager.activate(State("a"))
    assert gate not in plain.params_by_name()
    gated = manager.activate(State("a", (TransformSpec("add_gate", (), 0),)))
    assert gate in gated.params_by_name() and gate in gated.parameter_names()
    # a transform after the structural one sees the new structure
    both = State("a", (TransformSpec("add_gate", (), 0), TransformSpec("scale_noise", (("sigma", 0.1),), 1)))
    assert gate in manager.activate(both).params_by_name()
    assert gate not in manager.activate(State("a")).params_by_name()  # undone: walked again



def test_a_parameter_a_structural_transform_made_is_restored_before_the_structure_is_undone(manager):
    """A transform may change a parameter that a structural transform before it created: the copy is
    put back while that structure still stands, then the structure is undone."""
    gate = "model.layers.0.mlp.gate"
    plain = weights(manager.activate(State("a")))
    scaled = State("a", (TransformSpec("add_gate", (), 0),
                         TransformSpec("scale_noise", (("scale", 3.0), ("sigma", 0.5), ("target", gate)), 4)))
    first = weights(manager.activate(scaled))
    assert torch.equal(first[gate], expected(torch.ones(3), 3.0, 0.5, 4))
    assert_same({n: first[n] for n in plain}, plain)
    with_down = State("a", (TransformSpec("add_gate", (), 0), TransformSpec("scale_noise", (("sigma", 0.1),), 5),
                            TransformSpec("add_rows", (("delta", 1.0), ("index", (0, 2)), ("target", gate)), 6)))
    after = weights(manager.activate(with_down))  # gate made afresh, its rows changed; down_proj noised
    assert torch.equal(after[gate], torch.tensor([2.0, 1.0, 2.0]))
    assert_same(weights(manager.activate(State("a"))), plain)  # no KeyError: every level restored
    assert torch.equal(weights(manager.activate(scaled))[gate], first[gate])
    assert_same(weights(manager.activate(State("a"))), plain)
