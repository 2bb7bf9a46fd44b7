"""Weight perturbations (model-state transforms) and the grid of levels and repetitions.

Each method changes the tensors of a parameter group in place, drawing randomness only from the
generator lensbench seeds (``seed + repeat_index``); level 0 of every method changes nothing.
With ``w`` a tensor of the group (the value slice of a fused projection counts as one tensor):

- ``mult_gauss``: ``w <- w * (1 + level * e)``, ``e ~ N(0, 1)``: multiplicative noise N(1, level);
- ``add_gauss``:  ``w <- w + level * std(w) * e``: additive noise scaled to the tensor's spread;
- ``ablation``:   ``w <- w * m``, ``m ~ Bernoulli(1 - level)``: each weight zeroed with probability level;
- ``uni_quant``:  ``w <- lo + round((w - lo) / s) * s`` with ``lo, hi = min(w), max(w)`` and
  ``s = (hi - lo) / (level - 1)``: uniform quantization to ``level`` values on the tensor's own
  min-max grid (``level`` an integer >= 2; fewer levels = more damage).

Computation is in float32 and the result is cast back to the tensor's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .errors import LensbenchError
from .hookspecs import hookimpl
from .state import State, Transform, TransformSpec


class Perturbation(Transform):
    """A transform that perturbs every tensor of a parameter group at a ``level``."""

    severity_ascending: ClassVar[bool] = True  # a larger level damages more

    def __init__(self, level: float = 0.0, group: str = "attn_only") -> None:
        super().__init__(level=level, group=group)
        self.level = float(level)
        self.group = group
        check_level(self.name, self.level, "level")

    def selections(self, subject) -> list:
        return subject.anatomy.parameter_group(subject.model, self.group, field="model.init_args.perturbation.param_group")

    def validate(self, subject) -> None:
        self.selections(subject)  # at level 0 too: a group that matches nothing fails before any work

    def touched(self, subject) -> list[str]:
        if self.level == 0:
            return []
        return list(dict.fromkeys(sel.name for sel in self.selections(subject)))

    def apply(self, subject, generator: torch.Generator) -> None:
        if self.level == 0:
            return
        for sel in self.selections(subject):
            param = subject.model.get_parameter(sel.name)
            if sel.index is None:
                param.copy_(self.perturb(param.float(), generator).to(param.dtype))
            else:
                index = sel.index.to(param.device)
                part = param.index_select(sel.dim, index).float()
                param.index_copy_(sel.dim, index, self.perturb(part, generator).to(param.dtype))

    def perturb(self, w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The perturbed copy of a float32 tensor."""
        raise NotImplementedError


def _randn(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(w.shape, generator=generator, device=w.device, dtype=torch.float32)


class MultGauss(Perturbation):
    name = "mult_gauss"
    description = "w <- w * N(1, level): multiplicative Gaussian noise"

    def perturb(self, w, generator):
        return w * (1 + self.level * _randn(w, generator))


class AddGauss(Perturbation):
    name = "add_gauss"
    description = "w <- w + N(0, level * std(w)): additive Gaussian noise"

    def perturb(self, w, generator):
        return w + self.level * w.std() * _randn(w, generator)


class Ablation(Perturbation):
    name = "ablation"
    description = "each weight zeroed with probability level"

    def perturb(self, w, generator):
        keep = torch.rand(w.shape, generator=generator, device=w.device) >= self.level
        return w * keep


class UniQuant(Perturbation):
    name = "uni_quant"
    description = "uniform quantization to `level` values on the tensor's min-max grid"
    severity_ascending = False

    def perturb(self, w, generator):
        lo, hi = w.min(), w.max()
        if hi == lo:
            return w.clone()
        top = int(self.level) - 1
        step = (hi - lo) / top
        k = torch.round((w - lo) / step)
        return torch.where(k >= top, hi, k * step + lo)  # the top point is max(w) exactly


METHODS = (MultGauss, AddGauss, Ablation, UniQuant)


def check_level(method: str, level: float, field: str) -> None:
    """Refuse levels a method cannot take (0 always means: no perturbation)."""
    if not math.isfinite(level) or level < 0:
        raise LensbenchError(f"{method} level must be a finite number >= 0, got {level}", field)
    if method == "ablation" and level > 1:
        raise LensbenchError(f"ablation level is a probability in [0, 1], got {level}", field)
    if method == "uni_quant" and level != 0 and (level < 2 or level != int(level)):
        raise LensbenchError(f"uni_quant level is a number of values, an integer >= 2 (or 0 for none), got {level}", field)


@dataclass
class PerturbationGrid:
    """A perturbation method over a grid of levels and repetitions: one model state per (level, repeat)."""

    method: str = "mult_gauss"
    """A registered perturbation (lensbench plugins): mult_gauss, add_gauss, ablation, uni_quant, ..."""
    param_group: str = "attn_only"
    """attn_only (value projections), attn, mlp_only, embed_only, blocks, all; [4-8] layer ranges; or a glob."""
    levels: list[float] | None = None
    """Explicit levels; when given, min_deg/max_deg/deg_steps/spacing are not used."""
    min_deg: float = 0.0
    """Smallest level of the generated grid (> 0 for geometric spacing)."""
    max_deg: float = 1.0
    """Largest level of the generated grid."""
    deg_steps: int = 5
    """Number of generated levels."""
    spacing: str = "linear"
    """linear or geometric spacing between min_deg and max_deg."""
    include_baseline: bool = True
    """Add level 0 (no perturbation), marked is_baseline in outputs."""
    n_rep: int = 1
    """Repetitions per level; repetition r uses seed + r."""
    seed: int = 42
    """Base seed."""

    def level_values(self, field: str) -> list[float]:
        """The levels run, in order: the baseline 0 first (unless given or excluded), duplicates dropped."""
        return [value for value, _ in self._levels(field)]

    def _levels(self, field: str) -> list[tuple[float, str]]:
        """Each level run with the config field to blame for it: ``levels[i]`` with ``i`` its index in
        the list as given (not counting the baseline added in front), ``min_deg``/``max_deg`` for a
        generated grid, ``include_baseline`` for the added baseline."""
        if self.levels is not None:
            values = [float(v) for v in self.levels]
            if not values:
                raise LensbenchError("is empty; give at least one level or leave it null", f"{field}.levels")
            blamed = [f"{field}.levels[{i}]" for i in range(len(values))]
            for value, where in zip(values, blamed):
                check_level(self.method, value, where)
        else:
            if self.deg_steps < 1:
                raise LensbenchError(f"must be at least 1, got {self.deg_steps}", f"{field}.deg_steps")
            lo, hi, n = float(self.min_deg), float(self.max_deg), self.deg_steps
            if self.spacing == "linear":
                values = [lo + (hi - lo) * i / (n - 1) for i in range(n)] if n > 1 else [lo]
            elif self.spacing == "geometric":
                if lo <= 0 or hi <= 0:
                    raise LensbenchError(f"geometric spacing needs min_deg and max_deg > 0, got {lo} and {hi}",
                                         f"{field}.min_deg")
                values = [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)] if n > 1 else [lo]
            else:
                raise LensbenchError(f"must be linear or geometric, got {self.spacing!r}", f"{field}.spacing")
            if self.method == "uni_quant":
                values = [float(round(v)) for v in values]
            # generated levels lie between the two ends
            check_level(self.method, float(self.min_deg), f"{field}.min_deg")
            check_level(self.method, float(self.max_deg), f"{field}.max_deg")
            blamed = [f"{field}.min_deg" if i == 0 else f"{field}.max_deg" for i in range(len(values))]
        pairs = list(zip(values, blamed))
        if self.include_baseline and 0.0 not in values:
            pairs = [(0.0, f"{field}.include_baseline"), *pairs]
        first: dict[float, str] = {}
        for value, where in pairs:  # duplicates dropped, the first occurrence kept
            first.setdefault(value, where)
        return list(first.items())

    def states(self, checkpoint: str, registry, field: str) -> list[State]:
        """One state per (level, repeat), grouped by level; the baseline repeats too (sampling seeds differ)."""
        cls = registry.get(self.method, f"{field}.method")
        check_group_spec(self.param_group, f"{field}.param_group")
        if self.n_rep < 1:
            raise LensbenchError(f"must be at least 1, got {self.n_rep}", f"{field}.n_rep")
        states = []
        for level, where in self._levels(field):
            try:  # the method's own checks of its arguments, before any work
                cls(group=self.param_group, level=level)
            except LensbenchError as exc:  # blamed on the level's own field, not its index in the run
                raise LensbenchError(exc.message, where) from None
            except TypeError:  # a transform that is not a perturbation (loop_layers takes no group or level)
                raise LensbenchError(f"{self.method!r} does not take a group and a level; name a perturbation such as "
                                     "mult_gauss, add_gauss, ablation or uni_quant (a structural transform such as "
                                     "loop_layers goes in a model's transforms)", f"{field}.method") from None
            for rep in range(self.n_rep):
                spec = TransformSpec(self.method, (("group", self.param_group), ("level", level)), self.seed + rep)
                labels = (("degradation_method", self.method), ("param_group_name", self.param_group),
                          ("level_value", level), ("repeat_index", rep), ("seed", self.seed + rep),
                          ("is_baseline", level == 0))
                states.append(State(checkpoint, (spec,), labels))
        return states


def check_group_spec(spec: str, field: str) -> None:
    """Refuse an unknown named group before any model is loaded (globs are checked on the model)."""
    import re

    from .errors import did_you_mean
    from .models.anatomy import GROUPS

    match = re.fullmatch(r"(\w+)\s*(?:\[[^\]]*\])?", spec.strip())
    if match and not any(c in spec for c in "*?{.") and match.group(1) not in GROUPS:
        raise LensbenchError(f"unknown parameter group {match.group(1)!r}; {did_you_mean(match.group(1), GROUPS)} "
                             "(or use a glob over parameter names)", field)


@hookimpl
def lensbench_register_perturbations() -> list[type]:
    return list(METHODS)


#: The grid settings (under an analysis's ``perturbation:``) that only add or drop states: a run
#: folder is extended when they change. Method, parameter group and seed change what a state means.
GRID_EXTENDABLE = tuple(f"perturbation.{f}" for f in ("levels", "min_deg", "max_deg", "deg_steps", "spacing",
                                                       "include_baseline", "n_rep"))
