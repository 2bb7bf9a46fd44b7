"""Model states: a checkpoint plus an ordered list of transforms, and the manager that moves a
loaded model from one state to the next as cheaply as it can.

Moving between two states of one checkpoint restores only the tensors the previous transforms
touched (from copies kept on the model's device) and applies the new transforms; only a change
of checkpoint loads a model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import LensbenchError
from .transforms import Rows, Transform, TransformEntry, TransformSpec, check_transforms

#: The transform interface is defined in lensbench.transforms; plugins may import it from here.
__all__ = ["Rows", "State", "SubjectManager", "Transform", "TransformEntry", "TransformSpec", "check_transforms"]


@dataclass(frozen=True)
class State:
    """A checkpoint (the label of one of the analysis's models) and the transforms applied to it."""

    checkpoint: str
    transforms: tuple[TransformSpec, ...] = ()
    labels: tuple[tuple[str, Any], ...] = field(default=(), compare=False)  # extra output columns

    @property
    def id(self) -> str:
        if not self.transforms:
            return self.checkpoint
        parts = [json.dumps(t.as_dict(), sort_keys=True, separators=(",", ":")) for t in self.transforms]
        return self.checkpoint + "|" + "|".join(parts)


@dataclass(frozen=True)
class _Bare(State):
    """The loaded model with no transform applied, not even its model entry's: while a state is
    being entered, and after entering one failed. Its id matches no state's."""

    @property
    def id(self) -> str:
        return self.checkpoint + "|<bare>"


def _keep_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy to restore from: on the tensor's GPU while it fits with room to spare, else in
    pinned host memory (copied back asynchronously); on a CPU model, a plain copy."""
    if tensor.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(tensor.device)
        if free > 2 * tensor.numel() * tensor.element_size() + (512 << 20):
            return tensor.clone()
        return tensor.to("cpu").pin_memory()
    return tensor.clone()


class SubjectManager:
    """Holds at most one loaded model and moves it to the state each work item needs."""

    def __init__(self, specs: dict[str, Any], device: torch.device, registry, padding_side: str = "right",
                 fields: dict[str, str] | None = None) -> None:
        self.specs = specs  # checkpoint label -> lensbench.models.spec.ModelSpec
        self.fields = fields or {}  # checkpoint label -> its config field, named by errors at load ("model")
        self.device = device
        self.registry = registry  # the perturbations registry
        self.padding_side = padding_side
        self.loaded = None  # lensbench.models.loading.LoadedModel
        self.state: State | None = None
        self._originals: dict[str, torch.Tensor] = {}  # whole tensors, copied before their first change
        # Copies made while structural transforms were applied (depth: how many), restored before the
        # structure they may depend on is undone: whole tensors of this state, and slices.
        self._structured: dict[str, tuple[int, torch.Tensor]] = {}  # name -> (depth, copy), depths ascending
        self._plain: dict[str, torch.nn.Parameter] = {}  # the parameters before this state's transforms
        self._slices: list[tuple[int, str, int, torch.Tensor, torch.Tensor]] = []  # (depth, name, dim, index, copy)
        self._touched: list[str] = []
        self._structural: list[Transform] = []  # structural transforms applied, in order (undone in reverse)
        self.loads = 0
        self.restores = 0

    def activate(self, state: State):
        if self.state is not None and self.state.id == state.id:
            return self.loaded
        from .logs import run_log

        begin = time.perf_counter()
        if self.loaded is None or self.state.checkpoint != state.checkpoint:
            self._load(state.checkpoint)
        else:
            run_log.info(f"restore {len(self._originals) + len(self._structured)} tensors and {len(self._slices)} "
                         f"slices of {self.state.id}")
            self._restore()
        self.state = _Bare(state.checkpoint)  # until every transform has been applied
        try:
            self._apply(state)
        except BaseException:
            self._restore()  # never leave a half-transformed model behind
            raise
        self.state = state
        run_log.info(f"state {state.id}: {len(self._touched)} tensors changed, {time.perf_counter() - begin:.2f} s")
        return self.loaded

    def release(self) -> None:
        self.loaded, self.state, self._originals, self._structural, self._slices = None, None, {}, [], []
        self._structured, self._plain = {}, {}

    def _load(self, label: str) -> None:
        from .logs import console, memory_summary
        from .models.loading import load_model

        self.release()
        begin = time.perf_counter()
        self.loaded = load_model(self.specs[label], device=self.device, padding_side=self.padding_side,
                                 field=self.fields.get(label, "model"), registry=self.registry)
        self.loads += 1
        console.info(f"lensbench: loaded {label} on {self.device} in {time.perf_counter() - begin:.1f} s "
                     f"(memory: {memory_summary(self.device)})")

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return self.loaded.params_by_name()

    def _restore(self) -> None:
        """Every touched tensor back, level by level: what was saved under ``d`` structural transforms
        is copied back while they are applied (a parameter one of them made exists only then), then
        the last of them is undone, and so on down to the plain model."""
        gpus: set[torch.device] = set()
        while self._structural:
            self._restore_level(len(self._structural), gpus)
            self._structural.pop().undo(self.loaded)
            self.loaded.structure_changed()
        self._restore_level(0, gpus)
        for gpu in gpus | ({self.device} if self.device.type == "cuda" else set()):  # every GPU of a device map
            torch.cuda.synchronize(gpu)
        self.restores += 1

    def _restore_level(self, depth: int, gpus: set) -> None:
        from .models.placed_weights import editable_weights

        slices = []
        while self._slices and self._slices[-1][0] == depth:  # in reverse order of saving: each holds
            slices.append(self._slices.pop())  # what was there before it
        if depth == 0:
            wholes = list(self._originals.items())  # kept: the next state changes the same ones
        else:  # dropped with the structure
            wholes = [(name, self._structured.pop(name)[1]) for name, (d, _) in list(self._structured.items())
                      if d == depth]
        names = [entry[1] for entry in slices] + [name for name, _ in wholes]
        if not names:
            return
        with editable_weights(self.loaded.model, names), torch.no_grad():  # offloaded ones: their host values
            params = self._params()
            gpus.update(params[n].device for n in names if params[n].device.type == "cuda")
            for _, name, dim, index, saved in slices:
                params[name].index_copy_(dim, index, saved.to(params[name].device, non_blocking=True))
            if wholes:  # one fused copy on a GPU, not one launch per tensor
                torch._foreach_copy_([params[name] for name, _ in wholes], [copy for _, copy in wholes],
                                     non_blocking=True)

    def _kept_whole(self, name: str) -> bool:
        """Whether a clean copy of the whole tensor ``name`` is kept (restored at its level or below)."""
        return name in self._originals or name in self._structured

    def _save_slice(self, param: torch.Tensor, rows: Rows, depth: int) -> None:
        if self._kept_whole(rows.name):
            return  # a clean copy of the whole tensor is kept already
        dim = rows.dim % param.dim()
        index = torch.as_tensor(rows.index, dtype=torch.long, device=param.device).unique()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= param.shape[dim]):
            raise LensbenchError(f"{rows.name} has {param.shape[dim]} slices along dim {dim}; index "
                                 f"{int(index.max()) if int(index.max()) >= 0 else int(index.min())} is out of range")
        self._slices.append((depth, rows.name, dim, index, param.detach().index_select(dim, index)))

    def _clean_copy(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A whole copy as it was before this state: slices changed earlier in it are put back."""
        copy = _keep_copy(tensor)
        for _, sname, dim, index, saved in reversed(self._slices):
            if sname == name:
                copy.index_copy_(dim, index.to(copy.device), saved.to(copy.device))
        return copy

    def touched_names(self) -> list[str]:
        """Parameters changed by the current state's transforms (restored on the next change)."""
        return list(self._touched)

    def weights_finite(self) -> bool:
        """Whether every tensor the current transforms touched is finite."""
        from .models.placed_weights import editable_weights

        with editable_weights(self.loaded.model, self.touched_names()):
            params = self._params()
            # every check queued first, then read: one wait for a GPU, not one per tensor
            flags = [torch.isfinite(params[n]).all() for n in self.touched_names()]
            return all(bool(flag) for flag in flags)

    def _base_transforms(self, checkpoint: str) -> tuple[TransformSpec, ...]:
        """The transforms of the checkpoint's model entry (``ModelSpec.transforms``), applied first."""
        entries = getattr(self.specs.get(checkpoint), "transforms", None) or []
        return tuple(entry.spec() for entry in entries)

    def _apply(self, state: State) -> None:
        self._touched = []
        self._plain = self._params()  # kept as it is: structural transforms make a new one
        base = self._base_transforms(state.checkpoint)
        for i, spec in enumerate(base + state.transforms):
            if i >= len(base):
                self._apply_one(spec)
                continue
            try:  # a model entry's transform: errors name its place in the entry
                self._apply_one(spec)
            except LensbenchError as exc:
                key = exc.field if exc.field in dict(spec.params) else None
                entry = f"{self.fields[state.checkpoint]}." if state.checkpoint in self.fields else ""
                where = f"{entry}transforms[{i}]" + (f".params.{key}" if key else "")
                raise LensbenchError(f"{exc.message} (model {state.checkpoint!r})", where) from None

    def _apply_one(self, spec: TransformSpec) -> None:
        params = self._params()
        transform = self.registry.get(spec.name, "transforms")(**dict(spec.params))
        transform.validate(self.loaded)
        touched = transform.touched(self.loaded)
        names = [t.name if isinstance(t, Rows) else t for t in touched]
        unknown = [n for n in names if n not in params]
        if unknown:
            raise LensbenchError(f"transform {spec.name!r} names unknown parameters {unknown[:3]}")
        self._touched += [n for n in names if n not in self._touched]
        from .models.placed_weights import editable_weights, on_one_device

        # Offloaded weights are edited where accelerate keeps them; weights spread over several
        # devices are transformed on the CPU (one random stream whatever the device map).
        with editable_weights(self.loaded.model, names):
            params = self._params()
            depth = len(self._structural)
            with torch.no_grad():
                for item in touched:
                    if isinstance(item, Rows):
                        self._save_slice(params[item.name], item, depth)
                    elif not self._kept_whole(item):
                        copy = self._clean_copy(item, params[item].detach())
                        if depth == 0 or self._plain.get(item) is params[item]:
                            # a parameter of the plain model (one a loop shares, say): restored by
                            # name once the structure is undone, its copy kept for the next states
                            self._originals[item] = copy
                        else:  # made or replaced by the structure: restored before it is undone, then dropped
                            self._structured[item] = (depth, copy)
            with on_one_device(self.loaded.model, names) as where:
                generator = torch.Generator(device=where)
                generator.manual_seed(spec.seed)
                if transform.structural:
                    self._structural.append(transform)  # undone even if apply raises part way
                try:
                    with torch.no_grad():
                        transform.apply(self.loaded, generator)
                finally:
                    if transform.structural:  # the parameters are walked again (also after a failure part way)
                        self.loaded.structure_changed()
