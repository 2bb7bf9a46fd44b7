"""CheckpointPairs: the weight matrices of a base checkpoint and of each other checkpoint.

Units are keyed ``(other, matrix name)``: ``("<base>", name)`` for the statistics of the base
matrix itself, ``(other, name)`` for the difference ``W_other - W_base``; a matrix present on one
side only, or with different shapes, becomes a *mismatch* unit, stored and listed like any result.

An other checkpoint may also be a ``PerturbedCheckpoint``: the base (or another model) moved in
memory to a perturbed state by a registered perturbation, exactly as the perturbation analysis
would perturb it, so no edited copy has to be written to disk.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ..errors import LensbenchError
from ..models.checkpoint import CheckpointReader, open_checkpoint, pin_mmap_threshold
from ..models.loading import ModelSpec, resolve_source
from ..models.matrices import MatrixInfo, linear_matrices, select_matrices
from ..models.quantized import quant_method
from ..state import State, SubjectManager
from ..work import Unit
from .modules import WorkDataModule


@dataclass(frozen=True)
class MatrixUnit:
    kind: str  # "base" | "diff" | "mismatch" | "skipped"
    other: str  # label of the other checkpoint ("" for base units)
    info: MatrixInfo
    shape: tuple[int, ...] = ()
    other_shape: tuple[int, ...] = ()
    reason: str = ""


@dataclass
class PerturbedCheckpoint:
    """A model moved in memory to a perturbed state: the "other" side without a copy on disk."""

    perturbation: str
    """A registered perturbation (`lensbench plugins`): mult_gauss, add_gauss, ablation, uni_quant, ..."""
    level: float | None = None
    """The perturbation's level, required (mult_gauss: the noise's standard deviation; 0 changes nothing)."""
    param_group: str = "mlp_only"
    """attn_only (value projections), attn, mlp_only, embed_only, blocks, all; [4-8] layer ranges; or a glob."""
    seed: int = 0
    """Seed of the generator the perturbation draws from (as a perturbation run's seed + repeat_index)."""
    of: str | ModelSpec | None = None
    """The model perturbed (alias, hub id, folder, file or ModelSpec); default: the base."""
    name: str | None = None
    """Label in outputs; default: <label of the model perturbed>+<perturbation>(<param_group>[,seed=<seed>])@<level>."""

    def label(self, base: str | ModelSpec | None = None) -> str:
        if self.name:
            return self.name
        of = self.of if self.of is not None else base
        of_label = (ModelSpec(of) if isinstance(of, str) else of).label() if of is not None else "base"
        seed = f",seed={self.seed}" if self.seed else ""
        return f"{of_label}+{self.perturbation}({self.param_group}{seed})@{float(self.level):g}"

    def transform(self):
        """The model-state transform: the TransformSpec a perturbation run builds for this method,
        group, level and seed."""
        from ..state import TransformSpec

        return TransformSpec(self.perturbation, (("group", self.param_group), ("level", float(self.level))), self.seed)


class CheckpointPairs(WorkDataModule):
    """A base checkpoint compared with one or more others, matrix by matrix, streamed from disk
    (a perturbed other is held in memory: one model)."""

    def __init__(
        self,
        base: str | ModelSpec = "smollm2",
        others: list[str | ModelSpec | PerturbedCheckpoint] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
    ) -> None:
        """
        Args:
            base: The reference checkpoint: an alias, hub id, folder (safetensors shards with or
                without index, or pytorch_model*.bin shards), .safetensors or .gguf file.
            others: The checkpoints compared with ``base`` (same forms), or perturbed states of
                a model (``{perturbation: mult_gauss, level: 0.05, param_group: mlp_only}``),
                held in memory (one model each) instead of read from disk.
            include: Globs of tensor names to compare instead of the default (the weights of
                every linear layer; embeddings, norms and biases left out). ``{4-8}`` ranges work.
            exclude: Globs of tensor names to leave out.
        """
        super().__init__()
        if not others:
            raise LensbenchError("is empty; name at least one checkpoint to compare with the base",
                                 "data.init_args.others")
        from ..plugins import active_registries

        self._perturbations = active_registries().perturbations  # transforms and perturbations
        self.base = ModelSpec(base) if isinstance(base, str) else base
        _not_quantized_on_load(self.base, "data.init_args.base")
        for i, o in enumerate(others):
            if isinstance(o, ModelSpec):
                _not_quantized_on_load(o, f"data.init_args.others[{i}]")
        resolve_source(self.base, "data.init_args.base", self._perturbations)
        self.others = [self._perturbed(o, f"data.init_args.others[{i}]") if isinstance(o, PerturbedCheckpoint)
                       else ModelSpec(o) if isinstance(o, str) else o for i, o in enumerate(others)]
        labels = [self.base.label()]
        for i, spec in enumerate(self.others):
            if not isinstance(spec, PerturbedCheckpoint):
                resolve_source(spec, f"data.init_args.others[{i}]", self._perturbations)
            if spec.label() in labels:
                raise LensbenchError(f"label {spec.label()!r} is used twice; give one a `name`",
                                     f"data.init_args.others[{i}]")
            labels.append(spec.label())
        self.include, self.exclude = include, exclude
        self._readers: dict[str, CheckpointReader] = {}
        pin_mmap_threshold()  # freed matrices go back to the OS: memory stays near one matrix

    def _perturbed(self, entry: PerturbedCheckpoint, field: str) -> PerturbedCheckpoint:
        """``entry`` checked before any work (method, level, group, model), with its model and label set."""
        from ..perturbations import check_group_spec, check_level, check_seed

        cls = self._perturbations.get(entry.perturbation, f"{field}.perturbation")
        check_seed(entry.seed, f"{field}.seed")
        if entry.level is None:
            raise LensbenchError(f"is missing; give the level of {entry.perturbation} (e.g. level: 0.05 with "
                                 "mult_gauss, noise N(1, 0.05))", f"{field}.level")
        try:
            level = float(entry.level)
        except (TypeError, ValueError):
            raise LensbenchError(f"must be a number, got {entry.level!r}", f"{field}.level") from None
        check_level(entry.perturbation, level, f"{field}.level")
        check_group_spec(entry.param_group, f"{field}.param_group")
        try:  # the method's own checks of its arguments, as a perturbation run does them
            cls(group=entry.param_group, level=level)
        except LensbenchError as exc:
            raise LensbenchError(exc.message, f"{field}.level") from None
        except TypeError:
            raise LensbenchError(f"{entry.perturbation!r} does not take a group and a level; name a perturbation "
                                 "such as mult_gauss, add_gauss, ablation or uni_quant",
                                 f"{field}.perturbation") from None
        of = self.base if entry.of is None else ModelSpec(entry.of) if isinstance(entry.of, str) else entry.of
        if entry.of is not None:
            _not_quantized_on_load(of, f"{field}.of")
            resolve_source(of, f"{field}.of", self._perturbations)
        return replace(entry, level=level, of=of, name=entry.label(of))

    @property
    def base_label(self) -> str:
        return self.base.label()

    def reader(self, label: str) -> CheckpointReader:
        if label not in self._readers:
            specs = {s.label(): (s, f"data.init_args.others[{i}]") for i, s in enumerate(self.others)}
            specs[self.base_label] = (self.base, "data.init_args.base")
            spec, field = specs[label]
            if isinstance(spec, PerturbedCheckpoint):
                self._readers[label] = perturbed_reader(label, spec.of, spec.transform(), self._perturbations, field,
                                                        _of_field(spec, self.base, field))
            else:
                self._readers[label] = open_checkpoint(spec, field)
        return self._readers[label]

    def units(self) -> list[Unit]:
        base = self.reader(self.base_label)
        check_float_weights(base, "data.init_args.base")
        matrices, skipped = select_matrices(base.names(), base.shapes(), base.config, self.include, self.exclude)
        if not matrices:
            raise LensbenchError(f"no tensor of {base.location} matches; check include/exclude",
                                 "data.init_args.include")
        units = [Unit((self.base_label, m.name), MatrixUnit("base", "", m, base.shape(m.name)))
                 for m in matrices]
        # Every other 2-D tensor of the base is listed with its reason (skipped.csv), never dropped unsaid.
        units += [Unit(("skipped", s.name), MatrixUnit("skipped", "", MatrixInfo(s.name, -1, ""), s.shape, (), s.reason))
                  for s in skipped]
        if skipped:
            from collections import Counter

            from lightning.pytorch.utilities import rank_zero_info

            why = ", ".join(f"{n} {reason}" for reason, n in Counter(s.reason for s in skipped).most_common())
            rank_zero_info(f"lensbench: comparing {len(matrices)} two-dimensional weights of {self.base_label}; "
                           f"skipping {len(skipped)} ({why}): listed in skipped.csv")
        for i, spec in enumerate(self.others):
            other = self.reader(spec.label())
            check_float_weights(other, f"data.init_args.others[{i}]")
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

        prints = {self.base_label: model_fingerprint(self.base, "data.init_args.base")}
        for i, spec in enumerate(self.others):
            field = f"data.init_args.others[{i}]"
            if isinstance(spec, PerturbedCheckpoint):  # the model perturbed; the perturbation is in the config
                prints[spec.label()] = model_fingerprint(spec.of, _of_field(spec, self.base, field))
            else:
                prints[spec.label()] = model_fingerprint(spec, field)
        return prints


def _of_field(entry: PerturbedCheckpoint, base: ModelSpec, field: str) -> str:
    """The config field naming the model ``entry`` perturbs."""
    return "data.init_args.base" if entry.of is base else f"{field}.of"


def perturbed_reader(label: str, spec: ModelSpec, transform, registry, field: str,
                     model_field: str | None = None) -> CheckpointReader:
    """A reader over ``spec``'s model loaded once on the CPU and moved to the state ``transform``
    (a ``lensbench.state.TransformSpec``) with ``SubjectManager.activate``: the weights are exactly
    those a perturbation run on the CPU produces for that method, group, level and seed.

    The model stays in memory while the reader lives (one model; the manager's copies of the
    original tensors are dropped once the state is reached). Names are the loaded model's
    ``state_dict`` names, a tied alias (``lm_head.weight`` tied to the embedding) left out; the
    config is the loaded model's. ``field`` names the config entry in errors (``...others[0]``),
    ``model_field`` the entry of the model perturbed (default ``field + ".of"``).
    """
    model_field = model_field or f"{field}.of"
    manager = SubjectManager({spec.label(): spec}, torch.device("cpu"), registry, fields={spec.label(): model_field})
    try:
        try:
            manager.activate(State(spec.label(), (transform,)))
        except LensbenchError as exc:
            raise _refield(exc, field) from None
        touched = manager.touched_names()
        finite = manager.weights_finite()
    finally:
        loaded_model = manager.loaded
        manager.release()  # drops the manager's copies of the original tensors; the model is ours
    if not finite:
        raise LensbenchError(f"{transform.name} at level {dict(transform.params).get('level')} makes weights of "
                             f"{spec.label()} non-finite (inf or nan), whose change cannot be measured; "
                             "choose another level", f"{field}.level")
    model = loaded_model.model
    config = model.config.to_dict()  # a quantization_config stays: param_diff refuses quantized weights
    index, shapes, seen = {}, {}, set()
    named = dict(model.named_parameters())
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen and name not in named:  # a tied alias, which checkpoints do not store either
            continue
        seen.add(key)
        index[name] = ("memory", tensor.detach())
        shapes[name] = tuple(tensor.shape)
    params = ", ".join(f"{k}={v}" for k, v in transform.params)
    location = (f"{spec.label()} perturbed in memory by {transform.name} ({params}, seed {transform.seed}; "
                f"{len(touched)} tensors changed)")
    return CheckpointReader(label, location, config, index, shapes)


def _refield(exc: LensbenchError, field: str) -> LensbenchError:
    """The error of loading or of the transform, naming the config entry it comes from (the manager
    names the model's own entry, ``model_field``, in errors of loading it)."""
    where = exc.field or ""
    if where.endswith("param_group"):  # the perturbation's own field name
        return LensbenchError(exc.message, f"{field}.param_group")
    return LensbenchError(exc.message, where or field)


def _not_quantized_on_load(spec: ModelSpec, field: str) -> None:
    """Refuse ``load_in_4bit``/``load_in_8bit`` on a model param_diff compares: its weights would be
    packed values (and a checkpoint read from its files would silently ignore the setting)."""
    for name in ("load_in_4bit", "load_in_8bit"):
        if getattr(spec, name, False):
            raise LensbenchError("param_diff compares float weights; remove it (weights quantized while loading are "
                                 "packed values, not weights)", f"{field}.{name}")


def check_float_weights(reader: CheckpointReader, field: str) -> None:
    """Refuse, in one line, a checkpoint saved quantized (its config names a ``quantization_config``:
    bitsandbytes, GPTQ, AWQ, FP8 with scales, ...): its tensors are packed values and scales, not the
    weights, so their differences and norms would mean nothing."""
    method = quant_method((reader.config or {}).get("quantization_config"))
    if method is not None and method != "gguf":  # GGUF: transformers de-quantized the weights it loaded
        raise LensbenchError(f"{reader.location} holds quantized weights ({method}): param_diff compares float "
                             "weights; give the checkpoint before quantization (or its de-quantized copy)", field)


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
