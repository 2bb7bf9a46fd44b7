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

Computation is in float32 and the result is cast back to the tensor's dtype. The elementwise
methods (``mult_gauss``, ``add_gauss``, ``ablation``) change the tensor in place: the noise is drawn
in float32 into one reusable buffer of at most ``NOISE_CHUNK`` elements, several tensors to a draw
(``_Packs``), and each pack of tensors is multiplied (or added to) in place by one fused call, so a
state change costs about one pass over the weights besides drawing the noise, with no float32 copy
of a tensor and a few calls per pack rather than several per tensor.
"""

from __future__ import annotations

import math
import weakref
from functools import partial
from dataclasses import dataclass
from typing import ClassVar

import torch

from .errors import LensbenchError
from .hookspecs import hookimpl
from .state import State, Transform, TransformSpec
from .transforms import check_seed


class Perturbation(Transform):
    """A transform that perturbs every tensor of a parameter group at a ``level``."""

    severity_ascending: ClassVar[bool] = True  # a larger level damages more

    def __init__(self, level: float = 0.0, group: str = "attn_only") -> None:
        super().__init__(level=level, group=group)
        self.level = float(level)
        self.group = group
        check_level(self.name, self.level, "level")

    def selections(self, subject) -> list:
        # validate, touched and apply ask in turn, state after state: looked up once per model
        cached = self.__dict__.get("_selected")
        if cached is None or cached[0] is not subject.model:
            cached = self._selected = (subject.model, parameter_group(subject, self.group))
        return cached[1]

    def validate(self, subject) -> None:
        # at level 0 too: a group that matches nothing, or quantized weights, fail before any work
        from .models.quantized import check_not_quantized

        check_not_quantized(subject.model, [sel.name for sel in self.selections(subject)],
                            "model.init_args.perturbation.param_group")

    def touched(self, subject) -> list[str]:
        if self.level == 0:
            return []
        return list(dict.fromkeys(sel.name for sel in self.selections(subject)))

    def apply(self, subject, generator: torch.Generator) -> None:
        if self.level == 0:
            return
        params = _params_by_name(subject)  # not one module walk per tensor
        if not self.elementwise:
            for sel in self.selections(subject):
                param = params[sel.name]
                if sel.index is None:
                    param.copy_(self.perturb(param.float(), generator).to(param.dtype))
                else:
                    index = sel.index.to(param.device)
                    part = param.index_select(sel.dim, index).float()
                    param.index_copy_(sel.dim, index, self.perturb(part, generator).to(param.dtype))
            return
        packs = _Packs(self, generator)
        for sel in self.selections(subject):
            packs.add(params[sel.name], sel)
        packs.flush()

    def perturb(self, w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The perturbed copy of a float32 tensor (for elementwise methods, the values ``apply``
        writes into a tensor that is perturbed alone)."""
        if not self.elementwise:
            raise NotImplementedError
        out = w.contiguous().clone()
        if self.level != 0:
            packs = _Packs(self, generator)
            packs.add(out)
            packs.flush()
        return out

    #: True for methods that perturb each element from its own value and its own draw (they
    #: implement ``perturb_chunk``): ``apply`` then changes the tensor in place, a chunk at a time.
    elementwise: ClassVar[bool] = False

    def prepare(self, w: torch.Tensor):
        """What ``perturb_chunk`` needs of the whole (flattened) tensor, computed once per tensor."""
        return None

    def perturb_chunk(self, w: torch.Tensor, noise: torch.Tensor, generator: torch.Generator, stat) -> None:
        """Perturb ``w`` (a contiguous 1-d piece of the tensor, in its dtype) in place; ``noise`` is a
        float32 buffer of the same length to draw into, ``stat`` what ``prepare`` returned."""
        raise NotImplementedError

    def perturb_pack(self, ws: list[torch.Tensor], noise: torch.Tensor, noises: list[torch.Tensor],
                     generator: torch.Generator, stats: list) -> None:
        """Perturb several pieces at once, in place: ``ws[i]`` (a whole tensor or a contiguous 1-d
        piece of one) with ``noises[i]``, a float32 view of the same shape into ``noise``, the one
        buffer span that holds them all, in order (so one draw into ``noise`` draws every piece's
        numbers, as drawing them piece by piece would on the CPU); ``stats[i]`` is what ``prepare``
        returned for the piece's tensor. The built-in methods draw once and apply with one
        ``torch._foreach_*`` call; by default each piece goes through ``perturb_chunk``."""
        for w, piece, stat in zip(ws, noises, stats):
            self.perturb_chunk(w.view(-1), piece.view(-1), generator, stat)


class _Packs:
    """The pieces of a method's tensors, gathered in order into packs that share one float32 noise
    buffer of at most ``NOISE_CHUNK`` (+15) elements per device: each pack's noise is one draw and it is
    applied by one call (``perturb_pack``), so a state change costs a few calls per pack, not
    several per tensor (what limits it on a GPU, where a launch costs more than a small tensor's
    work). A pack ends where the CPU generator would draw other numbers for the concatenation than
    for the pieces one by one (after a piece whose size is not a multiple of 16, before one under
    16 elements), at a device change, and before a tensor it already holds is read again. A slice
    (or a strided tensor) is perturbed as a contiguous copy and written back when the pack holding
    its last piece has been applied."""

    def __init__(self, method: Perturbation, generator: torch.Generator) -> None:
        self.method, self.generator = method, generator
        self.buffers: dict[torch.device, torch.Tensor] = {}  # reused by every pack on the device
        self.pieces: list[tuple[torch.Tensor, int, object]] = []  # (piece, size, stat), in buffer order
        self.write_back: list[tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]] = []
        self.holds: set[int] = set()  # ids of the tensors the pack writes
        self.used, self.aligned, self.device = 0, True, None
        cls = type(method)
        self.prepares = cls.prepare is not Perturbation.prepare  # a statistic of each tensor
        # A subclass that overrides perturb_chunk below the class giving perturb_pack (a plugin
        # deriving from MultGauss, say) is called chunk by chunk, as it expects.
        packs_itself = _defined_at(cls, "perturb_chunk") in _defined_at(cls, "perturb_pack").__mro__
        self.apply_pack = method.perturb_pack if packs_itself else partial(Perturbation.perturb_pack, method)

    def add(self, param: torch.Tensor, sel=None) -> None:
        """Queue ``param`` (or its selected slice: the value rows of a fused projection) for perturbation."""
        if id(param) in self.holds or param.device != self.device:
            self.flush()
            self.device = param.device
        index = None if sel is None or sel.index is None else sel.index.to(param.device)
        if index is None and param.is_contiguous():
            target, back = param, None
        else:  # a slice or a strided tensor: perturbed as a contiguous copy, written back afterwards
            target = param.contiguous() if index is None else param.index_select(sel.dim, index)
            back = (target, param, None if index is None else sel.dim, index)
        n = target.numel()
        pieces = n > NOISE_CHUNK + 15  # several pieces (else the whole tensor: no view to make)
        flat = target.view(-1) if pieces or (self.prepares and n) else target
        stat = self.method.prepare(flat) if self.prepares and n else None
        for start, end in _spans(n) if pieces else ((0, n),) if n else ():
            size = end - start
            if self.pieces and (self.used + size > NOISE_CHUNK + 15 or not self.aligned or size < 16):
                self.flush()  # the pieces of this tensor queued so far are applied, not yet written back
            self.pieces.append((flat[start:end] if pieces else target, size, stat))
            self.used += size
            self.aligned = size % 16 == 0
        self.holds.add(id(param))
        if back is not None:  # every piece queued: written back by the flush that applies the last
            self.write_back.append(back)

    def flush(self) -> None:
        if self.pieces:
            buf = self.buffers.get(self.device)
            if buf is None or buf.numel() < self.used:  # as large as the largest pack so far
                size = min(max(self.used, 0 if buf is None else 2 * buf.numel()), NOISE_CHUNK + 15)
                buf = self.buffers[self.device] = torch.empty(size, dtype=torch.float32, device=self.device)
            ws = [piece for piece, _, _ in self.pieces]
            noises = buf[:self.used].split_with_sizes([size for _, size, _ in self.pieces])
            noises = [noise if w.dim() == 1 else noise.view(w.shape) for noise, w in zip(noises, ws)]
            self.apply_pack(ws, buf[:self.used], noises, self.generator, [p[2] for p in self.pieces])
            self.pieces, self.used, self.aligned = [], 0, True
        for target, param, dim, index in self.write_back:
            if index is None:
                param.copy_(target)
            else:
                param.index_copy_(dim, index, target)
        self.write_back, self.holds = [], set()


def _defined_at(cls: type, name: str) -> type:
    """The class of ``cls``'s method resolution order that defines ``name``."""
    return next(k for k in cls.__mro__ if name in k.__dict__)


#: Elements of noise drawn at a time into the reusable float32 buffer: 4 Mi (16 MiB), a multiple
#: of 16 (the CPU generator's block: chunked draws on the CPU give the numbers of one whole draw),
#: small enough to stay in a GPU's L2 cache between the draw and its use.
NOISE_CHUNK = 1 << 22


def _spans(n: int):
    """``(start, end)`` pieces of ``range(n)``, NOISE_CHUNK elements each; a last piece under 16
    elements joins the one before (the CPU generator draws pieces under 16 another way)."""
    start = 0
    while start < n:
        end = min(start + NOISE_CHUNK, n)
        if 0 < n - end < 16:
            end = n
        yield start, end
        start = end


def _params_by_name(subject) -> dict[str, torch.nn.Parameter]:
    """The subject's parameters by name (kept by a ``LoadedModel``; walked for any other subject)."""
    if hasattr(subject, "params_by_name"):
        return subject.params_by_name()
    return dict(subject.model.named_parameters())


_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(group, names): (anatomy, selections)}


def parameter_group(subject, group: str) -> list:
    """``subject.anatomy.parameter_group(model, group)``, kept per model while its parameter names
    (its structure: a looped model lists more) and its anatomy stay the same: the lookup matches
    every name against every prefix of the group, several milliseconds for each state otherwise."""
    model = subject.model
    names = (subject.parameter_names() if hasattr(subject, "parameter_names")
             else tuple(name for name, _ in model.named_parameters(remove_duplicate=False)))
    known = _GROUPS.setdefault(model, {})
    hit = known.get((group, names))
    if hit is not None and hit[0] is subject.anatomy:
        return hit[1]
    selections = subject.anatomy.parameter_group(model, group, field="model.init_args.perturbation.param_group")
    known[(group, names)] = (subject.anatomy, selections)
    return selections


class MultGauss(Perturbation):
    name = "mult_gauss"
    description = "w <- w * N(1, level): multiplicative Gaussian noise"
    elementwise = True

    def perturb_chunk(self, w, noise, generator, stat):
        noise.normal_(1.0, self.level, generator=generator)  # 1 + level * e, drawn in one pass
        w.mul_(noise)  # computed in float32, rounded once to w's dtype

    def perturb_pack(self, ws, noise, noises, generator, stats):
        noise.normal_(1.0, self.level, generator=generator)
        torch._foreach_mul_(ws, noises)


class AddGauss(Perturbation):
    name = "add_gauss"
    description = "w <- w + N(0, level * std(w)): additive Gaussian noise"
    elementwise = True

    def prepare(self, w):
        return self.level * (w if w.dtype == torch.float32 else w.float()).std()

    def perturb_chunk(self, w, noise, generator, stat):
        noise.normal_(generator=generator).mul_(stat)
        w.add_(noise)

    def perturb_pack(self, ws, noise, noises, generator, stats):
        noise.normal_(generator=generator)
        torch._foreach_mul_(noises, stats)
        torch._foreach_add_(ws, noises)


class Ablation(Perturbation):
    name = "ablation"
    description = "each weight zeroed with probability level"
    elementwise = True

    def perturb_chunk(self, w, noise, generator, stat):
        noise.uniform_(generator=generator)
        w.mul_(noise >= self.level)

    def perturb_pack(self, ws, noise, noises, generator, stats):
        noise.uniform_(generator=generator).ge_(self.level)  # the mask as 1.0/0.0: w * 1 is w exactly
        torch._foreach_mul_(ws, noises)


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
        check_seed(self.seed, f"{field}.seed", self.n_rep)
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
                labels = tuple(zip(GRID_COLUMNS, (self.method, self.param_group, level, rep, self.seed + rep, level == 0)))
                states.append(State(checkpoint, (spec,), labels))
        return states


#: The columns a grid state adds to each row of an analysis's tables (its ``State.labels``), and
#: those that tell its lines apart in a figure (seed follows repeat_index, is_baseline level_value).
GRID_COLUMNS = ("degradation_method", "param_group_name", "level_value", "repeat_index", "seed", "is_baseline")
LINE_COLUMNS = GRID_COLUMNS[:4]


def grid_states(checkpoints, grid: PerturbationGrid | None, registry,
                field: str = "model.init_args.perturbation") -> list[State]:
    """The states of a run over ``checkpoints``: each checkpoint's grid states, or the checkpoint as it
    is when the run has no perturbation grid."""
    return [state for checkpoint in checkpoints
            for state in (grid.states(checkpoint, registry, field) if grid else [State(checkpoint)])]


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
