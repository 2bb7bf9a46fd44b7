"""Perturbation methods, the level/repetition grid, SubjectManager moves between perturbed states,
and group_steps: unit level, on small tensors and the tiny Llama (no subprocess)."""

from __future__ import annotations

import math

import pytest
import torch

from lensbench.data.modules import group_steps
from lensbench.errors import LensbenchError
from lensbench.models.loading import ModelSpec, load_model
from lensbench.perturbations import (METHODS, Ablation, AddGauss, MultGauss, Perturbation, PerturbationGrid, UniQuant,
                                     grid_states)
from lensbench.plugins import active_registries, use_registries
from lensbench.registry import Registry
from lensbench.state import State, SubjectManager, Transform, TransformSpec
from lensbench.work import WorkItem

CPU = torch.device("cpu")
V_PROJ = ["model.layers.0.self_attn.v_proj.weight", "model.layers.1.self_attn.v_proj.weight"]
MLP = [f"model.layers.{i}.mlp.{p}_proj.weight" for i in (0, 1) for p in ("gate", "up", "down")]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def big(seed: int = 0, n: int = 100_000) -> torch.Tensor:
    w = torch.randn(n, generator=gen(1000 + seed)) * 0.02
    assert bool((w != 0).all())
    return w


def state(method: str, level: float, group: str = "attn", seed: int = 0) -> State:
    return State("tiny", (TransformSpec(method, (("group", group), ("level", level)), seed),))


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [n for n in a if not torch.equal(a[n], b[n])]


@pytest.fixture(scope="module")
def registry():
    return active_registries().perturbations


@pytest.fixture(scope="module")
def fresh(tiny_model):
    """The tiny model's weights as loaded, untouched."""
    return weights(load_model(ModelSpec(str(tiny_model))).model)


@pytest.fixture
def manager(tiny_model, registry):
    return SubjectManager({"tiny": ModelSpec(str(tiny_model))}, CPU, registry)


# -- each method's exact semantics -----------------------------------------------------------------

def n1(shape, level: float, g: torch.Generator) -> torch.Tensor:
    """``1 + level * e``, ``e ~ N(0, 1)``, as mult_gauss draws it: ``normal_(mean=1, std=level)``."""
    return torch.empty(shape).normal_(1.0, level, generator=g)


def test_mult_gauss_is_w_times_one_plus_level_randn():
    w = big()
    got = MultGauss(level=0.3).perturb(w, gen(5))
    expected = w * n1(w.shape, 0.3, gen(5))
    assert torch.equal(got, expected)
    # the same stream as 1 + level * randn (the draw fuses the scaling: at most float32 rounding apart)
    torch.testing.assert_close(n1(w.shape, 0.3, gen(5)), 1 + 0.3 * torch.randn(w.shape, generator=gen(5)),
                               rtol=0, atol=2.5e-7)
    assert not torch.equal(got, MultGauss(level=0.3).perturb(w, gen(6)))  # the noise comes from the generator
    rel = got / w - 1
    assert abs(rel.std().item() - 0.3) < 0.01 and abs(rel.mean().item()) < 0.01


def test_add_gauss_scales_the_noise_by_the_tensors_std():
    w = big()
    got = AddGauss(level=0.5).perturb(w, gen(5))
    assert torch.equal(got, w + 0.5 * w.std() * torch.randn(w.shape, generator=gen(5)))
    noise = got - w
    assert abs(noise.std().item() / (0.5 * w.std().item()) - 1) < 0.02
    # Ten times the spread, ten times the noise (same draws).
    noise10 = AddGauss(level=0.5).perturb(10 * w, gen(5)) - 10 * w
    torch.testing.assert_close(noise10, 10 * noise, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("level", [0.3, 0.05, 0.9])
def test_ablation_zeroes_a_fraction_level_and_leaves_the_rest_exactly(level):
    w = big()
    got = Ablation(level=level).perturb(w, gen(3))
    zero = got == 0
    assert abs(zero.float().mean().item() - level) < 0.01
    assert torch.equal(got[~zero], w[~zero])
    keep = torch.rand(w.shape, generator=gen(3)) >= level  # the documented Bernoulli(1 - level) mask
    assert torch.equal(zero, ~keep)


def test_ablation_level_one_zeroes_everything():
    assert bool((Ablation(level=1.0).perturb(big(), gen(0)) == 0).all())


@pytest.mark.parametrize("level", [2, 3, 5, 16])
def test_uni_quant_leaves_exactly_level_values_on_the_min_max_grid(level):
    w = big(seed=level)
    got = UniQuant(level=level).perturb(w, gen(0))
    values = got.unique()
    assert values.numel() == level
    lo, hi = w.min(), w.max()
    assert got.min() == lo  # the minimum is kept exactly
    step = (hi - lo) / (level - 1)
    assert (got - w).abs().max() <= step / 2 * (1 + 1e-4)  # rounded to the nearest grid point
    torch.testing.assert_close(values, lo + step * torch.arange(level, dtype=torch.float32), rtol=0, atol=1e-6)


def test_uni_quant_of_a_constant_tensor_is_unchanged():
    w = torch.full((50,), 0.25)
    assert torch.equal(UniQuant(level=4).perturb(w, gen(0)), w)


def test_uni_quant_keeps_the_maximum_exactly():
    missed = []
    for seed in range(20):
        w = big(seed=seed, n=1000)
        for level in (2, 3, 7, 16):
            got = UniQuant(level=level).perturb(w, gen(0))
            if got.max() != w.max():
                missed.append((seed, level, got.max().item(), w.max().item()))
    assert not missed, missed[:3]


@pytest.mark.parametrize("method", [MultGauss, AddGauss, Ablation])
def test_level_zero_perturb_returns_the_input_values(method):
    w = big()
    assert torch.equal(method(level=0.0).perturb(w, gen(0)), w)


def test_every_registered_method_at_level_zero_leaves_the_model_bit_identical(manager, registry, fresh):
    names = {n for n in registry.names() if issubclass(registry.get(n), Perturbation)}  # not loop_layers
    assert {"mult_gauss", "add_gauss", "ablation", "uni_quant", "low_rank"} <= names  # low_rank: example plugin
    for method in sorted(names):
        loaded = manager.activate(state(method, 0.0, group="all", seed=11))
        assert manager.touched_names() == [], method
        assert changed(weights(loaded.model), fresh) == [], method
    assert manager.loads == 1


def test_low_rank_from_the_registry_truncates_the_rank(manager, registry, fresh):
    assert registry.get("low_rank").__module__.startswith("lensbench_example")
    loaded = manager.activate(state("low_rank", 0.75, group="attn_only"))
    now = weights(loaded.model)
    assert changed(now, fresh) == V_PROJ
    for name in V_PROJ:  # [16, 32]: rank 16 -> ceil(0.25 * 16) = 4
        assert torch.linalg.matrix_rank(fresh[name]).item() == 16
        assert torch.linalg.matrix_rank(now[name]).item() == 4


def test_the_model_is_perturbed_tensor_by_tensor_from_one_generator_seeded_seed(manager, fresh):
    loaded = manager.activate(state("mult_gauss", 0.3, group="mlp_only", seed=7))
    now = weights(loaded.model)
    g = gen(7)  # one generator for the whole group, drawn in the group's (model) order
    for name in MLP:
        w = fresh[name]
        assert torch.equal(now[name], w * n1(w.shape, 0.3, g)), name
    assert changed(now, fresh) == MLP


@pytest.mark.parametrize("chunk", [64, 80, 1 << 22])
def test_noise_drawn_in_chunks_in_place_is_that_of_one_whole_draw(manager, fresh, monkeypatch, chunk):
    """Chunks of NOISE_CHUNK elements (a multiple of 16) draw the CPU generator's numbers of one
    whole draw; the [64, 32] MLP tensors leave pieces of 0 (64), 48 (80) and 2048 (4 Mi) elements,
    and a last piece under 16 joins the one before."""
    import lensbench.perturbations as perturbations

    monkeypatch.setattr(perturbations, "NOISE_CHUNK", chunk)
    n = 3 * chunk + 3 if chunk < 2048 else 2051
    spans = list(perturbations._spans(n))
    assert spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert spans[-1][1] - spans[-1][0] == (chunk + 3 if chunk < 2048 else 2051)
    for method, level, expect in (
            ("mult_gauss", 0.3, lambda w, g: w * n1(w.shape, 0.3, g)),
            ("add_gauss", 0.2, lambda w, g: w + 0.2 * w.std() * torch.randn(w.shape, generator=g)),
            ("ablation", 0.5, lambda w, g: w * (torch.rand(w.shape, generator=g) >= 0.5))):
        now = weights(manager.activate(state(method, level, group="mlp_only", seed=9)).model)
        g = gen(9)
        for name in MLP:
            assert torch.equal(now[name], expect(fresh[name], g)), (method, name)
    w = big(n=100_003)  # not a multiple of the chunk: the last piece is 3 (+ 16 or more) elements
    assert torch.equal(MultGauss(level=0.3).perturb(w, gen(2)), w * n1(w.shape, 0.3, gen(2)))


class _Sel:
    def __init__(self, name, index=None, dim=0):
        self.name, self.index, self.dim = name, index, dim


def _subject(tensors: dict[str, torch.Tensor]):
    class Subject:
        model = torch.nn.Module()

    for name, w in tensors.items():
        Subject.model.register_parameter(name, torch.nn.Parameter(w.clone(), requires_grad=False))
    return Subject()


def _apply(perturbation, subject, selections, seed):
    perturbation._selected = (subject.model, selections)
    with torch.no_grad():
        perturbation.apply(subject, gen(seed))
    return {name: p.detach().clone() for name, p in subject.model.named_parameters()}


#: Sizes the CPU generator draws differently alone and after others (under 16, not a multiple of
#: 16), a strided tensor, and tensors over the chunk (64 here): each must get the numbers of its own
#: whole draw, in order, however the tensors are packed into draws.
AWKWARD = {"a": (5,), "b": (4, 8), "c": (17,), "d": (3, 16), "e": (3,), "f": (10, 13), "g": (200,),
           "h": (48,), "i": (8, 8), "j": (33,)}


@pytest.mark.parametrize("chunk", [64, 1 << 22])
def test_tensors_packed_into_one_draw_get_the_numbers_of_their_own_draws(monkeypatch, chunk):
    import lensbench.perturbations as perturbations

    monkeypatch.setattr(perturbations, "NOISE_CHUNK", chunk)
    tensors = {name: big(i, n=math.prod(shape)).reshape(shape) for i, (name, shape) in enumerate(AWKWARD.items())}
    tensors["t"] = big(20, n=96).reshape(8, 12).t()  # strided: perturbed as a contiguous copy
    draws = []  # every draw the methods make, to see that tensors share them
    real = torch.Tensor.normal_
    monkeypatch.setattr(torch.Tensor, "normal_", lambda self, *a, **k: draws.append(self.numel()) or real(self, *a, **k))
    for cls, level, expect in (
            (MultGauss, 0.3, lambda w, g: w * n1(w.shape, 0.3, g)),
            (AddGauss, 0.2, lambda w, g: w + 0.2 * w.std() * torch.randn(w.shape, generator=g)),
            (Ablation, 0.5, lambda w, g: w * (torch.rand(w.shape, generator=g) >= 0.5))):
        draws.clear()
        now = _apply(cls(level=level, group="x"), _subject(tensors), [_Sel(n) for n in tensors], seed=4)
        made, g = list(draws), gen(4)
        for name, w in tensors.items():  # in the selections' order, each from its own whole draw
            assert torch.equal(now[name], expect(w, g)), (cls.name, name)
        if cls is not Ablation:  # ablation draws uniform_
            assert sum(made) == sum(w.numel() for w in tensors.values())
            if chunk > 1000:  # packed: b + c, d, h + i + j each one draw
                assert made == [5, 32 + 17, 48, 3, 130, 200, 48 + 64 + 33, 96], cls.name


def test_a_tensor_selected_twice_is_perturbed_twice_in_order():
    """Two slices of one fused weight and a whole tensor twice: each selection reads what the one
    before it wrote, as when every selection is perturbed alone."""
    w, v = big(1, n=64 * 32).reshape(64, 32), big(2, n=256)
    rows_a, rows_b = torch.arange(0, 32), torch.arange(16, 48)  # overlapping rows
    selections = [_Sel("w", rows_a), _Sel("v"), _Sel("w", rows_b), _Sel("v")]
    now = _apply(MultGauss(level=0.25, group="x"), _subject({"w": w, "v": v}), selections, seed=6)
    g, w_, v_ = gen(6), w.clone(), v.clone()
    w_[rows_a] = w_[rows_a] * n1((32, 32), 0.25, g)
    v_ = v_ * n1(v_.shape, 0.25, g)
    w_[rows_b] = w_[rows_b] * n1((32, 32), 0.25, g)
    v_ = v_ * n1(v_.shape, 0.25, g)
    assert torch.equal(now["w"], w_) and torch.equal(now["v"], v_)


def test_slices_are_written_back_once_their_pack_is_applied_not_kept_to_the_end(monkeypatch):
    """Value slices of fused projections (one per layer) are copies: each is written back by the
    flush that applies it, so at most a pack's worth of copies is alive at once."""
    import lensbench.perturbations as perturbations

    monkeypatch.setattr(perturbations, "NOISE_CHUNK", 64)
    tensors = {f"qkv{i}": big(i, n=12 * 8).reshape(12, 8) for i in range(6)}  # value rows 8..11: 32 elements
    pending = []
    real = perturbations._Packs.flush
    monkeypatch.setattr(perturbations._Packs, "flush", lambda self: pending.append(len(self.write_back)) or real(self))
    now = _apply(MultGauss(level=0.3, group="x"), _subject(tensors),
                 [_Sel(n, torch.arange(8, 12)) for n in tensors], seed=5)
    assert max(pending) <= 2  # two 32-element slices fill a 64-element pack
    g = gen(5)
    for name, w in tensors.items():
        expect = w.clone()
        expect[8:] = w[8:] * n1((4, 8), 0.3, g)
        assert torch.equal(now[name], expect), name


def test_a_plugin_method_with_only_perturb_chunk_gets_flat_pieces_in_order(monkeypatch):
    import lensbench.perturbations as perturbations

    monkeypatch.setattr(perturbations, "NOISE_CHUNK", 64)
    seen = []

    class Shift(Perturbation):
        name = "shift"
        elementwise = True

        def perturb_chunk(self, w, noise, generator, stat):
            seen.append((w.dim(), w.numel(), noise.numel()))
            w.add_(noise.uniform_(generator=generator))

    tensors = {"a": big(1, n=40).reshape(5, 8), "b": big(2, n=150).reshape(10, 15)}
    now = _apply(Shift(level=1.0, group="x"), _subject(tensors), [_Sel("a"), _Sel("b")], seed=2)
    assert seen == [(1, 40, 40), (1, 64, 64), (1, 64, 64), (1, 22, 22)]  # b in pieces of NOISE_CHUNK
    g = gen(2)
    assert torch.equal(now["a"], tensors["a"] + torch.rand((5, 8), generator=g))
    assert torch.equal(now["b"], tensors["b"] + torch.rand((10, 15), generator=g))


def test_a_subclass_of_a_builtin_method_overriding_perturb_chunk_is_called_chunk_by_chunk():
    class Clipped(MultGauss):  # the factor clipped to [0.5, 1.5]: MultGauss's packed path would skip it
        name = "clipped"

        def perturb_chunk(self, w, noise, generator, stat):
            w.mul_(noise.normal_(1.0, self.level, generator=generator).clamp_(0.5, 1.5))

    tensors = {"a": big(1, n=64).reshape(8, 8), "b": big(2, n=48)}
    now = _apply(Clipped(level=5.0, group="x"), _subject(tensors), [_Sel("a"), _Sel("b")], seed=8)
    g = gen(8)
    for name, w in tensors.items():
        assert torch.equal(now[name], w * n1(w.shape, 5.0, g).clamp(0.5, 1.5)), name
    ratio = now["a"] / tensors["a"]
    assert float(ratio.min()) >= 0.5 - 1e-6 and float(ratio.max()) <= 1.5 + 1e-6


def test_the_group_is_looked_up_once_per_model_not_per_state(manager, monkeypatch):
    loaded = manager.activate(state("mult_gauss", 0.1, group="mlp_only[1]", seed=1))
    anatomy = type(loaded.anatomy)
    calls = []
    real = anatomy.parameter_group
    monkeypatch.setattr(anatomy, "parameter_group", lambda self, *a, **k: calls.append(a[1]) or real(self, *a, **k))
    for seed in (2, 3, 4):
        manager.activate(state("mult_gauss", 0.1, group="mlp_only[1]", seed=seed))
        manager.activate(state("ablation", 0.5, group="mlp_only[1]", seed=seed))
    assert calls == []  # known since the first state
    manager.activate(state("mult_gauss", 0.1, group="attn_only", seed=5))
    manager.activate(state("mult_gauss", 0.1, group="attn_only", seed=6))
    assert calls == ["attn_only"]
    assert manager.touched_names() == V_PROJ


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_are_perturbed_in_float32_and_rounded_once(dtype):
    """In place in the tensor's dtype, as ``(w.float() * (1 + level * e)).to(dtype)``."""

    class Subject:
        def __init__(self, w):
            self.model = torch.nn.Module()
            self.model.w = torch.nn.Parameter(w, requires_grad=False)

    for cls, expect in ((MultGauss, lambda w, g: (w.float() * n1(w.shape, 0.3, g)).to(dtype)),
                        (AddGauss, lambda w, g: (w.float() + 0.3 * w.float().std()
                                                 * torch.randn(w.shape, generator=g)).to(dtype))):
        w = big(n=4096).reshape(64, 64).to(dtype)
        subject = Subject(w.clone())
        perturbation = cls(level=0.3, group="w")
        perturbation._selected = (subject.model, [type("Sel", (), {"name": "w", "index": None})()])
        with torch.no_grad():
            perturbation.apply(subject, gen(3))
        assert subject.model.w.dtype == dtype
        assert torch.equal(subject.model.w, expect(w, gen(3))), cls.name


def test_add_gauss_and_ablation_through_the_manager_match_their_formulas(manager, fresh):
    now = weights(manager.activate(state("add_gauss", 0.2, group="attn_only", seed=3)).model)
    g = gen(3)
    for name in V_PROJ:
        w = fresh[name]
        assert torch.equal(now[name], w + 0.2 * w.std() * torch.randn(w.shape, generator=g))
    now = weights(manager.activate(state("ablation", 0.5, group="attn_only", seed=4)).model)
    g = gen(4)
    for name in V_PROJ:
        keep = torch.rand(fresh[name].shape, generator=g) >= 0.5
        assert torch.equal(now[name], fresh[name] * keep)
    now = weights(manager.activate(state("uni_quant", 3, group="attn_only")).model)
    for name in V_PROJ:
        assert now[name].unique().numel() == 3


# -- PerturbationGrid ------------------------------------------------------------------------------

def test_linear_grid_with_baseline_already_included():
    assert PerturbationGrid(min_deg=0.0, max_deg=1.0, deg_steps=5).level_values("p") == \
        pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0], abs=1e-12)


def test_linear_grid_gets_the_baseline_inserted_first():
    values = PerturbationGrid(min_deg=0.2, max_deg=0.6, deg_steps=3).level_values("p")
    assert values == pytest.approx([0.0, 0.2, 0.4, 0.6], abs=1e-12)
    assert PerturbationGrid(min_deg=0.2, max_deg=0.6, deg_steps=3, include_baseline=False).level_values("p") == \
        pytest.approx([0.2, 0.4, 0.6], abs=1e-12)
    assert PerturbationGrid(min_deg=0.3, max_deg=0.9, deg_steps=1).level_values("p") == [0.0, 0.3]


def test_grid_states_run_every_checkpoint_through_the_grid_or_leave_it_plain():
    registry = active_registries().perturbations
    grid = PerturbationGrid(levels=[0.0, 0.5], n_rep=2, seed=7)
    states = grid_states(["a", "b"], grid, registry)
    assert [s.checkpoint for s in states] == ["a"] * 4 + ["b"] * 4
    assert [(dict(s.labels)["level_value"], s.transforms[0].seed) for s in states[:4]] == \
        [(0.0, 7), (0.0, 8), (0.5, 7), (0.5, 8)]
    assert states[4:] == grid.states("b", registry, "model.init_args.perturbation")
    assert grid_states(["a", "b"], None, registry) == [State("a"), State("b")]
    with pytest.raises(LensbenchError) as info:  # the grid's own checks, blamed on its field
        grid_states(["a"], PerturbationGrid(levels=[0.5], n_rep=0), registry)
    assert info.value.field == "model.init_args.perturbation.n_rep"


def test_geometric_grid():
    values = PerturbationGrid(min_deg=0.01, max_deg=1.0, deg_steps=3, spacing="geometric").level_values("p")
    assert values == pytest.approx([0.0, 0.01, 0.1, 1.0], rel=1e-12)
    values = PerturbationGrid(min_deg=0.001, max_deg=1.0, deg_steps=4, spacing="geometric",
                              include_baseline=False).level_values("p")
    assert values == pytest.approx([0.001, 0.01, 0.1, 1.0], rel=1e-12)
    ratios = [b / a for a, b in zip(values, values[1:])]
    assert ratios == pytest.approx([10.0] * 3, rel=1e-9)


def test_uni_quant_grid_is_rounded_to_integers():
    values = PerturbationGrid(method="uni_quant", min_deg=2, max_deg=16, deg_steps=4).level_values("p")
    assert values == [0.0, 2.0, 7.0, 11.0, 16.0]
    values = PerturbationGrid(method="uni_quant", min_deg=2, max_deg=32, deg_steps=5, spacing="geometric",
                              include_baseline=False).level_values("p")
    assert values == [2.0, 4.0, 8.0, 16.0, 32.0]
    assert all(v == int(v) for v in values)


def test_explicit_levels_override_the_generated_grid():
    grid = PerturbationGrid(levels=[0.7, 0.1, 0.7], min_deg=5, max_deg=9, deg_steps=2, spacing="nonsense")
    assert grid.level_values("p") == [0.0, 0.7, 0.1]  # baseline first, duplicates dropped, order kept


def test_states_per_level_and_repeat_with_seeds_seed_plus_r(registry):
    grid = PerturbationGrid(method="add_gauss", param_group="mlp_only[1]", levels=[0.5], n_rep=3, seed=10)
    states = grid.states("tiny", registry, "p")
    assert len(states) == 6 and len({s.id for s in states}) == 6
    labels = [dict(s.labels) for s in states]
    assert [(lab["level_value"], lab["repeat_index"], lab["seed"], lab["is_baseline"]) for lab in labels] == [
        (0.0, 0, 10, True), (0.0, 1, 11, True), (0.0, 2, 12, True),
        (0.5, 0, 10, False), (0.5, 1, 11, False), (0.5, 2, 12, False)]
    assert all(lab["degradation_method"] == "add_gauss" and lab["param_group_name"] == "mlp_only[1]" for lab in labels)
    for s, lab in zip(states, labels):
        (spec,) = s.transforms
        assert s.checkpoint == "tiny" and spec.name == "add_gauss" and spec.seed == lab["seed"]
        assert dict(spec.params) == {"group": "mlp_only[1]", "level": lab["level_value"]}


def _error(fn, *args):
    with pytest.raises(LensbenchError) as err:
        fn(*args)
    return err.value


@pytest.mark.parametrize("grid, field, words", [
    (PerturbationGrid(levels=[0.1, -0.5]), "p.levels[1]", "got -0.5"),
    (PerturbationGrid(levels=[float("nan")]), "p.levels[0]", "finite"),
    (PerturbationGrid(levels=[float("inf")]), "p.levels[0]", "finite"),
    (PerturbationGrid(method="ablation", levels=[1.5]), "p.levels[0]", "probability"),
    (PerturbationGrid(method="uni_quant", levels=[2.5]), "p.levels[0]", "integer >= 2"),
    (PerturbationGrid(method="uni_quant", levels=[4, 1]), "p.levels[1]", "integer >= 2"),
    (PerturbationGrid(levels=[]), "p.levels", "is empty"),
    (PerturbationGrid(spacing="geometric", min_deg=0.0, max_deg=1.0), "p.min_deg", "> 0"),
    (PerturbationGrid(spacing="logarithmic"), "p.spacing", "linear or geometric"),
    (PerturbationGrid(deg_steps=0), "p.deg_steps", "at least 1"),
    (PerturbationGrid(min_deg=-1.0, max_deg=-1.0, deg_steps=1), "p.min_deg", "got -1.0"),
])
def test_bad_grids_are_errors_naming_the_field(grid, field, words, registry):
    err = _error(grid.states, "tiny", registry, "p")
    assert err.field == field and words in err.message, str(err)


@pytest.mark.parametrize("grid, field", [
    # The baseline 0 is put in front of the levels run; the blame still goes to the level as given.
    (PerturbationGrid(method="ablation", levels=[0.5, 1.5]), "p.levels[1]"),
    (PerturbationGrid(method="uni_quant", levels=[4, 1]), "p.levels[1]"),
    # low_rank (example plugin) checks its level in its constructor, after the grid is built.
    (PerturbationGrid(method="low_rank", levels=[0.5, 1.0]), "p.levels[1]"),
    (PerturbationGrid(method="low_rank", levels=[0.5, 0.5, 1.0]), "p.levels[2]"),  # a duplicate before it
    (PerturbationGrid(method="low_rank", levels=[0.0, 1.0]), "p.levels[1]"),  # baseline given, not added
    (PerturbationGrid(method="low_rank", levels=[1.0, 0.5], include_baseline=False), "p.levels[0]"),
    (PerturbationGrid(method="low_rank", min_deg=0.5, max_deg=1.0, deg_steps=3), "p.max_deg"),
    (PerturbationGrid(method="low_rank", min_deg=1.0, max_deg=1.0, deg_steps=1), "p.min_deg"),
])
def test_a_bad_level_is_blamed_on_its_own_index_not_shifted_by_the_baseline(grid, field, registry):
    err = _error(grid.states, "tiny", registry, "p")
    assert err.field == field, str(err)
    assert "got 1" in err.message or "got 1.5" in err.message, str(err)


def test_a_bad_max_deg_is_blamed_on_max_deg():
    err = _error(PerturbationGrid(method="ablation", min_deg=0.0, max_deg=2.0).level_values, "p")
    assert err.field == "p.max_deg", str(err)


def test_unknown_method_suggests_the_close_one(registry):
    err = _error(PerturbationGrid(method="mult_gaus").states, "tiny", registry, "p")
    assert err.field == "p.method" and "did you mean 'mult_gauss'" in err.message


# -- the analysis' perplexity settings ----------------------------------------------------------------

def _analysis(tiny_model, ppl):
    from lensbench.analyses.perturbation import PerturbationAnalysis
    from lensbench.testing import use_plugins

    with use_plugins():  # the analysis holds these registries: its grid's method is looked up there
        return PerturbationAnalysis(model=str(tiny_model), perplexity=ppl)


def test_perplexity_text_and_file_together_are_refused(tiny_model, tmp_path):
    from lensbench.generation import PerplexitySettings

    (tmp_path / "t.txt").write_text("the sun and the moon\n", encoding="utf-8")
    for file in (str(tmp_path / "t.txt"), "retain"):
        err = _error(_analysis, tiny_model, PerplexitySettings(text="a sentence", file=file))
        assert err.field == "model.init_args.perplexity.text", str(err)
        assert "not both" in err.message and "set text to null" in err.message and "file to null" in err.message


def test_perplexity_scores_the_text_the_file_or_the_default_sentence(tiny_model, tmp_path):
    from lensbench.generation import DEFAULT_PERPLEXITY_TEXT, PerplexitySettings

    (tmp_path / "t.txt").write_text("the sun and the moon\n", encoding="utf-8")
    assert _analysis(tiny_model, PerplexitySettings())._ppl_text == DEFAULT_PERPLEXITY_TEXT
    assert _analysis(tiny_model, PerplexitySettings(text="moss cell"))._ppl_text == "moss cell"
    assert _analysis(tiny_model, PerplexitySettings(file=str(tmp_path / "t.txt")))._ppl_text == "the sun and the moon\n"
    assert _analysis(tiny_model, None)._ppl_text is None  # perplexity off
    err = _error(_analysis, tiny_model, PerplexitySettings(text="  "))
    assert err.field == "model.init_args.perplexity.text" and "is empty" in err.message


def test_near_full_gpu_memory_stores_the_prompts_done_then_stops_in_one_line(tiny_model, registry):
    """The analysis stores the records of the calls made before the stop, then raises the one-line
    error (memory readings from an injected probe: 50%, then 97% of the device in use)."""
    from lensbench.analyses.perturbation import PerturbationAnalysis
    from lensbench.data.modules import Prompt
    from lensbench.generation import Batching, GenerationSettings, GenerationStopped

    settings = GenerationSettings(max_new_tokens=3, do_sample=False, max_batch_size=2)
    with use_registries(active_registries()):  # the registries `registry` comes from
        analysis = PerturbationAnalysis(model=str(tiny_model), generation=settings,
                                        perturbation=PerturbationGrid(levels=[0.1], include_baseline=False))
    (st,) = analysis.states()
    analysis.subjects = SubjectManager(analysis.subject_specs(), CPU, registry, padding_side="left")

    class Store:
        written: dict = {}

        def write(self, key, record):
            self.written[key] = record

    analysis.store = Store()
    total = 24 * 2**30
    readings = iter([0.5, 0.97])
    analysis._batching = Batching(settings, CPU, memory_probe=lambda: (int(total * (1 - next(readings))), total))
    items = [WorkItem((st.id, "p", i), st, Prompt("p", i, f"the sun and the moon {i}", "p"), f"d{i}")
             for i in range(1, 6)]
    with pytest.raises(GenerationStopped) as stop:
        analysis.process_batch(items)
    assert stop.value.field == "model.init_args.generation.max_batch_size" and "\n" not in str(stop.value)
    assert "97% of its 24.0 GiB" in stop.value.message
    assert list(Store.written) == [it.key_str for it in items[:4]]  # the two calls made: 2 + 2 prompts
    for item in items[:4]:
        record = Store.written[item.key_str]
        assert record["state"] == st.id and record["digest"] == item.digest and record["prompt_id"] == item.key[2]
        assert record["output"] is not None and record["batch_size_effective"] == 2


def test_memory_fractions_outside_zero_to_one_are_refused(tiny_model):
    from lensbench.analyses.perturbation import PerturbationAnalysis
    from lensbench.generation import GenerationSettings

    for name in ("memory_grow_below", "memory_warn_above", "memory_stop_above"):
        err = _error(PerturbationAnalysis, str(tiny_model), None, GenerationSettings(**{name: 1.5}))
        assert err.field == f"model.init_args.generation.{name}" and "[0, 1]" in err.message, str(err)


def test_utc_timestamps_have_the_seeds_form():
    import datetime as dt
    import re

    from lensbench.analyses.perturbation import utc_timestamp

    moment = dt.datetime(2025, 10, 6, 14, 34, 56, 789_999, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert utc_timestamp(moment) == "2025-10-06T12:34:56.789Z"
    now = utc_timestamp()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", now), now


def test_n_rep_zero_is_an_error(registry):
    err = _error(PerturbationGrid(n_rep=0).states, "tiny", registry, "p")
    assert err.field == "p.n_rep" and "at least 1" in err.message


def test_perturbation_constructors_check_their_level():
    for cls, level in ((MultGauss, -0.1), (AddGauss, math.inf), (Ablation, 1.01), (UniQuant, 1), (UniQuant, 3.5)):
        with pytest.raises(LensbenchError):
            cls(level=level)
    UniQuant(level=0)  # 0 always means: no perturbation


@pytest.mark.parametrize("group, words", [
    ("mlp_onyl", "did you mean 'mlp_only'"),
    ("model.layers.*.nothing_here", "matches no parameter"),
    ("attn[5]", "out of range"),
])
def test_bad_parameter_groups_fail_on_activation_and_leave_the_model_plain(manager, fresh, group, words):
    with pytest.raises(LensbenchError) as err:
        manager.activate(state("mult_gauss", 0.5, group=group))
    assert err.value.field == "model.init_args.perturbation.param_group" and words in err.value.message, str(err.value)
    assert changed(weights(manager.activate(State("tiny")).model), fresh) == []


def test_a_glob_group_perturbs_exactly_the_matching_tensors(manager, fresh):
    manager.activate(state("mult_gauss", 0.5, group="model.layers.{0-1}.self_attn.q_proj.weight"))
    assert manager.touched_names() == [f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)]
    assert changed(weights(manager.loaded.model), fresh) == manager.touched_names()


# -- SubjectManager over perturbed states ----------------------------------------------------------

def test_restore_is_bit_exact_and_loads_once(manager, fresh):
    first = weights(manager.activate(state("mult_gauss", 0.5, group="attn", seed=3)).model)
    assert sorted(changed(first, fresh)) == sorted(n for n in fresh if ".self_attn." in n)
    other = weights(manager.activate(state("mult_gauss", 1.0, group="mlp_only", seed=3)).model)
    assert changed(other, fresh) == MLP  # the attention tensors were put back exactly
    weights(manager.activate(state("mult_gauss", 0.5, group="attn", seed=4)).model)
    assert changed(weights(manager.activate(state("mult_gauss", 0.5, group="attn", seed=3)).model), first) == []
    assert changed(weights(manager.activate(state("mult_gauss", 0.0, group="attn", seed=3)).model), fresh) == []
    assert changed(weights(manager.activate(State("tiny")).model), fresh) == []
    assert manager.loads == 1


def test_touched_names_are_the_groups_parameters(manager):
    manager.activate(state("mult_gauss", 0.1, group="attn_only"))
    assert manager.touched_names() == V_PROJ  # the value projection of each layer of the tiny Llama
    loaded = manager.activate(state("ablation", 0.1, group="mlp_only"))
    assert manager.touched_names() == MLP
    assert manager.touched_names() == [s.name for s in loaded.anatomy.parameter_group(loaded.model, "mlp_only")]
    manager.activate(state("ablation", 0.1, group="attn_only[1]"))
    assert manager.touched_names() == V_PROJ[1:]
    manager.activate(State("tiny"))
    assert manager.touched_names() == []


class WriteInf(Transform):
    """Writes +inf into the first element of the last layer's down projection."""

    name = "write_inf"
    target = "model.layers.1.mlp.down_proj.weight"

    def touched(self, subject):
        return [self.target]

    def apply(self, subject, generator):
        subject.model.get_parameter(self.target).view(-1)[0] = math.inf


def test_non_finite_weights_are_reported(tiny_model, fresh):
    reg = Registry("perturbation", base=Transform)
    for cls in (*METHODS, WriteInf):
        reg.add(cls, "tests")
    manager = SubjectManager({"tiny": ModelSpec(str(tiny_model))}, CPU, reg)
    manager.activate(State("tiny", (TransformSpec("write_inf"),)))
    assert manager.weights_finite() is False
    manager.activate(state("mult_gauss", 1.0, group="attn"))
    assert manager.weights_finite() is True
    manager.activate(state("mult_gauss", 1e39, group="attn"))  # finite as a float, overflows float32
    assert manager.weights_finite() is False
    assert not torch.isfinite(manager.loaded.model.get_parameter(V_PROJ[0])).all()
    manager.activate(State("tiny"))
    assert manager.weights_finite() is True
    assert changed(weights(manager.loaded.model), fresh) == []


# -- group_steps ------------------------------------------------------------------------------------

def _items(state_names: str) -> list[WorkItem]:
    states = {c: State("m", (TransformSpec("t", (), ord(c)),)) for c in set(state_names)}
    return [WorkItem((states[c].id, i), states[c]) for i, c in enumerate(state_names)]


@pytest.mark.parametrize("size", [2, 3, 8])
def test_group_steps_are_short_runs_of_one_state(size):
    items = _items("aaaaabbacccccccd")
    steps = group_steps(items, size)
    assert [it for step in steps for it in step] == items  # order kept, nothing lost or repeated
    assert all(isinstance(step, list) and 1 <= len(step) <= size for step in steps)
    assert all(len({it.state.id for it in step}) == 1 for step in steps)  # never mixing states
    # As few steps as possible: each run of one state is cut into ceil(run / size) steps.
    runs = [5, 2, 1, 7, 1]
    assert len(steps) == sum(-(-r // size) for r in runs)


def test_group_steps_of_size_one_are_the_items_themselves():
    items = _items("aab")
    assert group_steps(items, 1) == items
    assert group_steps([], 4) == []
    assert [len(s) for s in group_steps(_items("abab"), 4)] == [1, 1, 1, 1]
