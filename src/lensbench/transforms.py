"""The transform interface: what a model's ``transforms:`` entries and a state's transforms are
(``TransformEntry``, ``TransformSpec``), the base class of registered transforms (``Transform``,
``Rows``) and the checks of a config's entries against a registry (``check_transforms``,
``check_seed``).

A leaf module: it imports nothing of lensbench but ``errors``, so that models/ (structural
transforms such as ``loop_layers``) and state.py (which applies transforms) can both build on it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .errors import LensbenchError

#: The seeds torch's generators take (``torch.Generator.manual_seed``): a 64-bit integer, signed or not.
SEED_RANGE = (-(2**63), 2**64 - 1)


def check_seed(seed: Any, field: str, repeats: int = 1) -> None:
    """Refuse a seed torch's generator cannot take (repetition r of a grid uses ``seed + r``, so the
    last, ``seed + repeats - 1``, must fit too), before any model is loaded."""
    lo, hi = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise LensbenchError(f"must be an integer, got {seed!r}", field)
    last = seed + max(repeats, 1) - 1
    if seed < lo or last > hi:
        got = f"{seed}" if last == seed else f"{seed} (its last repetition uses {last})"
        raise LensbenchError(f"a seed must lie in {lo}..{hi} (torch's generator takes 64-bit seeds), got {got}; "
                             "use a smaller seed", field)


@dataclass(frozen=True)
class TransformSpec:
    """One transform in a state: a registered name, its parameters and its seed."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params), "seed": self.seed}


@dataclass
class TransformEntry:
    """A transform named in a config (a model's ``transforms:``): ``{name, params, seed}``."""

    name: str
    """A registered transform (``lensbench plugins``), e.g. loop_layers."""
    params: dict[str, Any] = field(default_factory=dict)
    """Its parameters, e.g. {start: 4, end: 8, passes: 3} for loop_layers."""
    seed: int = 0
    """Seed of the generator the transform draws from (unused by deterministic transforms)."""

    def spec(self) -> TransformSpec:
        return TransformSpec(self.name, tuple(sorted((self.params or {}).items())), self.seed)


def check_transforms(entries: list[TransformEntry] | None, registry, field: str) -> None:
    """Refuse, before any model is loaded, an unknown transform name or parameters its class rejects
    (each transform is constructed once); ``field`` is the config path of the list."""
    for i, entry in enumerate(entries or []):
        where = f"{field}[{i}]"
        cls = registry.get(entry.name, f"{where}.name")
        check_seed(entry.seed, f"{where}.seed")
        params = entry.params or {}
        try:
            cls(**params)
        except LensbenchError as exc:
            key = exc.field if exc.field in params or exc.field in _init_names(cls) else None
            raise LensbenchError(exc.message, f"{where}.params.{key}" if key else f"{where}.params") from None
        except TypeError as exc:
            raise LensbenchError(f"{entry.name} does not take these parameters ({exc}); it takes "
                                 f"{', '.join(_init_names(cls)) or 'none'}", f"{where}.params") from None


def _init_names(cls: type) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


@dataclass(frozen=True)
class Rows:
    """Part of a parameter a transform touches: the slices ``index`` along ``dim`` (rows of a
    value table, columns of an output projection). The manager saves and restores only those."""

    name: str
    index: tuple[int, ...]
    dim: int = 0


class Transform:
    """A change to a loaded model's weights (a perturbation, an ablation, ...) or its structure.

    Subclasses set ``name`` and implement ``touched`` (the parameter names it will modify, or
    ``Rows(name, index, dim)`` for slices of one: then only those are saved and restored) and
    ``apply`` (modify them in place, drawing randomness only from ``generator``). Both receive the
    ``LoadedModel`` (``.model``, ``.anatomy``, ``.tokenizer``). The manager saves and restores the
    touched tensors, so a transform never has to undo itself.

    ``SubjectManager`` constructs it as ``cls(**params)`` (the state's parameters, kept in
    ``self.params``) each time a model enters a state, calls ``validate``, then ``touched``, then
    ``apply`` under ``torch.no_grad()`` with a new ``torch.Generator`` on the device of the first
    touched parameter (the CPU when none, and when the touched parameters of a model placed by a
    ``device_map`` lie on several devices: they are then host copies during ``apply``), seeded
    with the state's seed. Raise
    ``lensbench.errors.LensbenchError(message, field)`` for what a user can fix. The full contract
    is in docs/plugins.md, "Contracts".

    A *structural* transform (``structural = True``, e.g. ``loop_layers``) changes modules or the
    config rather than (or besides) weights, and implements ``undo(subject)``: the manager calls it
    on the same instance, in the reverse order of application, before the model moves to another
    state (also after an ``apply`` that raised), then restores the touched weights as usual.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    structural: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        self.params = params

    def touched(self, subject) -> list[str | Rows]:
        raise NotImplementedError

    def apply(self, subject, generator: torch.Generator) -> None:
        raise NotImplementedError

    def validate(self, subject) -> None:
        """Raise ``LensbenchError`` if this transform cannot apply to ``subject`` (checked for every
        state, the unperturbed ones included, before any result of the state is computed)."""

    def undo(self, subject) -> None:
        """Structural transforms: put back exactly what ``apply`` changed (it may have raised part way)."""
        if self.structural:
            raise NotImplementedError(f"structural transform {self.name!r} must implement undo")
