"""CheckpointPairs: the weight matrices of a base checkpoint and of each other checkpoint.

Units are keyed ``(other, matrix name)``: ``("<base>", name)`` for the statistics of the base
matrix itself, ``(other, name)`` for the difference ``W_other - W_base``; a matrix present on one
side only, or with different shapes, becomes a *mismatch* unit, stored and listed like any result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import LensbenchError
from ..models.checkpoint import CheckpointReader, open_checkpoint, pin_mmap_threshold
from ..models.loading import ModelSpec, resolve_source
from ..models.matrices import MatrixInfo, linear_matrices
from ..work import Unit
from .modules import WorkDataModule


@dataclass(frozen=True)
class MatrixUnit:
    kind: str  # "base" | "diff" | "mismatch"
    other: str  # label of the other checkpoint ("" for base units)
    info: MatrixInfo
    shape: tuple[int, ...] = ()
    other_shape: tuple[int, ...] = ()
    reason: str = ""


class CheckpointPairs(WorkDataModule):
    """A base checkpoint compared with one or more others, matrix by matrix, streamed from disk."""

    def __init__(
        self,
        base: str | ModelSpec = "smollm2",
        others: list[str | ModelSpec] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
    ) -> None:
        """
        Args:
            base: The reference checkpoint: an alias, hub id, folder (safetensors shards with or
                without index, or pytorch_model*.bin shards), .safetensors or .gguf file.
            others: The checkpoints compared with ``base`` (same forms).
            include: Globs of tensor names to compare instead of the default (the weights of
                every linear layer; embeddings, norms and biases left out). ``{4-8}`` ranges work.
            exclude: Globs of tensor names to leave out.
        """
        super().__init__()
        if not others:
            raise LensbenchError("is empty; name at least one checkpoint to compare with the base",
                                 "data.init_args.others")
        self.base = ModelSpec(base) if isinstance(base, str) else base
        self.others = [ModelSpec(o) if isinstance(o, str) else o for o in others]
        resolve_source(self.base, "data.init_args.base")
        labels = [self.base.label()]
        for i, spec in enumerate(self.others):
            resolve_source(spec, f"data.init_args.others[{i}]")
            if spec.label() in labels:
                raise LensbenchError(f"label {spec.label()!r} is used twice; give one a `name`",
                                     f"data.init_args.others[{i}]")
            labels.append(spec.label())
        self.include, self.exclude = include, exclude
        self._readers: dict[str, CheckpointReader] = {}
        pin_mmap_threshold()  # freed matrices go back to the OS: memory stays near one matrix

    @property
    def base_label(self) -> str:
        return self.base.label()

    def reader(self, label: str) -> CheckpointReader:
        if label not in self._readers:
            specs = {s.label(): (s, f"data.init_args.others[{i}]") for i, s in enumerate(self.others)}
            specs[self.base_label] = (self.base, "data.init_args.base")
            spec, field = specs[label]
            self._readers[label] = open_checkpoint(spec, field)
        return self._readers[label]

    def units(self) -> list[Unit]:
        base = self.reader(self.base_label)
        matrices = linear_matrices(base.names(), base.shapes(), base.config, self.include, self.exclude)
        if not matrices:
            raise LensbenchError(f"no tensor of {base.location} matches; check include/exclude",
                                 "data.init_args.include")
        units = [Unit((self.base_label, m.name), MatrixUnit("base", "", m, base.shape(m.name)))
                 for m in matrices]
        for i, spec in enumerate(self.others):
            other = self.reader(spec.label())
            _check_architecture(base, other, f"data.init_args.others[{i}]")
            theirs = {m.name: m for m in linear_matrices(other.names(), other.shapes(), other.config,
                                                         self.include, self.exclude)}
            for m in matrices:
                if m.name not in other.shapes():
                    unit = MatrixUnit("mismatch", other.label, m, base.shape(m.name), (), "missing in other")
                elif other.shape(m.name) != base.shape(m.name):
                    unit = MatrixUnit("mismatch", other.label, m, base.shape(m.name), other.shape(m.name),
                                      "shape differs")
                else:
                    unit = MatrixUnit("diff", other.label, m, base.shape(m.name), other.shape(m.name))
                units.append(Unit((other.label, m.name), unit))
            for name, m in theirs.items():
                if name not in base.shapes():
                    units.append(Unit((other.label, name),
                                      MatrixUnit("mismatch", other.label, m, (), other.shape(name), "missing in base")))
        return units

    def fingerprint(self) -> dict[str, Any]:
        from ..models.fingerprint import model_fingerprint

        fields = ["data.init_args.base", *(f"data.init_args.others[{i}]" for i in range(len(self.others)))]
        return {spec.label(): model_fingerprint(spec, field) for spec, field in zip([self.base, *self.others], fields)}


def _check_architecture(base: CheckpointReader, other: CheckpointReader, field: str) -> None:
    a = (base.config or {}).get("model_type")
    b = (other.config or {}).get("model_type")
    if a and b and a != b:
        raise LensbenchError(f"{other.location} is a {b!r} checkpoint and the base is {a!r}; "
                             "compare checkpoints of one architecture", field)
    shared = set(base.names()) & set(other.names())
    if len(shared) < 0.5 * min(len(base.names()), len(other.names())):
        raise LensbenchError(f"{other.location} shares only {len(shared)} tensor names with the base "
                             f"({len(base.names())}); compare checkpoints of one architecture", field)
