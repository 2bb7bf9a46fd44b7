"""``loop_layers``: a structural transform that makes a model's own forward run blocks
``start..end`` (inclusive, 0-based) ``passes`` times in a row.

The blocks run in the order ``[0..start-1, (start..end) x passes, end+1..N-1]``: ``passes=1`` is
the plain model, ``passes=0`` skips the blocks (``h_out = h_in``). How it is done, for any
architecture whose blocks sit in one ``nn.ModuleList`` (``find_anatomy``'s block container:
``model.get_decoder().layers``, GPT-2 ``transformer.h``, ...):

- The container is replaced, on its owner, by a ``LoopedLayers``: a ``ModuleList`` that still
  *registers* only the model's own blocks, under their own keys (so ``named_parameters``,
  ``state_dict``, the anatomy and every parameter-group name stay as they are, and a weight
  transform touches the same tensors before or after the loop), while iteration, ``len`` and
  indexing follow the looped order. The model's ``for layer in self.layers[:n]`` then runs it.
- A block that runs at a position other than its own is a *repeat*: a shallow copy sharing the
  block's parameters, buffers and hooks (no weight is copied, a forward hook fires on every
  repeat, which is how ``output_hidden_states`` returns one state per block run), with
  ``layer_idx`` set to its position on the block and on every submodule storing one (the
  attention), so that each repeat has its own KV-cache slot. Everything else a block computed
  when it was built (a sliding window, GPT-2's ``1 / (layer_idx + 1)`` attention scaling, which
  transformers folds into ``attn.scaling`` at construction) stays that of the original block.
- The decoder's config is updated: ``num_hidden_layers`` (``n_layer``) becomes the looped count,
  and the per-layer lists (``layer_types``, ``mlp_layer_types``, ... of length N) are looped
  like the blocks, so the masks (full or sliding, chosen by ``config.layer_types[i]``) and the
  ``DynamicCache`` transformers builds from the config (``get_layer_types_and_kwargs``: one cache
  layer per entry, sliding ones holding the window) match the looped model: repeats keep their
  original layer's type.

``undo`` puts back the original container object and the original config values; the manager
calls it (``Transform.structural``) before the model moves to another state.
"""

from __future__ import annotations

import copy
import numbers
from typing import Any

from torch import nn

from ..errors import LensbenchError
from ..hookspecs import hookimpl
from ..transforms import Transform

#: Config lists holding one entry per layer, looped like the blocks (besides any ``*layer_types``).
PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "kv_sharing_modes", "no_rope_layers", "layers_block_type")


class LoopedLayers(nn.ModuleList):
    """A ``ModuleList`` that registers the model's own blocks (names and state_dict unchanged) but
    iterates, counts and indexes them in the looped order ``sequence``."""

    def __init__(self, registered: nn.ModuleList, sequence: list[nn.Module]) -> None:
        super().__init__()
        for key, module in registered._modules.items():
            self.add_module(key, module)
        self.sequence = list(sequence)

    def __len__(self) -> int:
        return len(self.sequence)

    def __iter__(self):
        return iter(self.sequence)

    def __getitem__(self, idx: int | slice):
        if isinstance(idx, slice):
            return nn.ModuleList(self.sequence[idx])
        return self.sequence[idx]

    def train(self, mode: bool = True) -> LoopedLayers:
        super().train(mode)
        for module in self.sequence:  # the repeats are not registered children
            module.train(mode)
        return self

    def __repr__(self) -> str:
        return f"LoopedLayers({len(self._modules)} blocks run as {len(self.sequence)})"


def _indices(module: nn.Module) -> set[int]:
    """The ``layer_idx`` values stored in ``module`` and its submodules."""
    return {m.__dict__["layer_idx"] for m in module.modules() if m.__dict__.get("layer_idx") is not None}


def _repeat(module: nn.Module, index: int) -> nn.Module:
    """A shallow copy of ``module`` running as layer ``index``: its own ``layer_idx`` (and its own
    copy of every submodule holding one), sharing parameters, buffers, hooks and the rest."""
    if not _indices(module):
        return module
    clone = copy.copy(module)  # the same _parameters, _buffers and hook dicts: weights and hooks are shared
    clone.__dict__["_modules"] = {name: None if child is None else _repeat(child, index)
                                  for name, child in module._modules.items()}
    if clone.__dict__.get("layer_idx") is not None:
        clone.__dict__["layer_idx"] = index
    return clone


def _check_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise LensbenchError(f"loop_layers {key} must be an integer, got {value!r}", key)
    return int(value)


class LoopLayers(Transform):
    """Run blocks ``start..end`` (inclusive, 0-based) ``passes`` times in a row; 0 skips them."""

    name = "loop_layers"
    description = "run blocks start..end (inclusive) `passes` times in a row (1: as is, 0: skipped); shares weights"
    structural = True

    def __init__(self, start: int, end: int, passes: int) -> None:
        super().__init__(start=start, end=end, passes=passes)
        self.start = _check_int(start, "start")
        self.end = _check_int(end, "end")
        self.passes = _check_int(passes, "passes")
        if self.start < 0:
            raise LensbenchError(f"loop_layers start must be a block index >= 0, got {self.start}", "start")
        if self.start > self.end:
            raise LensbenchError(f"loop_layers start ({self.start}) is after end ({self.end}); give start <= end "
                                 "(block indices, both included)", "start")
        if self.passes < 0:
            raise LensbenchError(f"loop_layers passes must be >= 0 (1: the plain model, 0: the blocks skipped), "
                                 f"got {self.passes}", "passes")
        self._undo: list[tuple[Any, str, Any]] = []  # (object, attribute, old value), in the order changed

    # -- where the blocks are ---------------------------------------------------------------------
    def _container(self, subject) -> tuple[nn.Module, str, nn.ModuleList]:
        """The owner of the block list, its attribute name and the list (looped or not) it holds now."""
        names = subject.anatomy.block_names
        parent = names[0].rpartition(".")[0]
        if any(n != f"{parent}.{i}".lstrip(".") for i, n in enumerate(names)):
            raise LensbenchError(f"loop_layers needs the blocks in one list, but {subject.label!r} has blocks "
                                 f"{names[:2]}...; loop a model whose blocks are one nn.ModuleList", "loop_layers")
        owner_name, _, attr = parent.rpartition(".")
        owner = subject.model.get_submodule(owner_name)
        container = getattr(owner, attr, None)
        if not isinstance(container, nn.ModuleList):
            raise LensbenchError(f"loop_layers needs the blocks of {subject.label!r} in an nn.ModuleList; "
                                 f"{parent!r} is a {type(container).__name__}", "loop_layers")
        return owner, attr, container

    def _configs(self, subject, owner: nn.Module, count: int) -> list[Any]:
        """The config objects that count the blocks (the decoder's, the text config), each once."""
        found: dict[int, Any] = {}
        candidates = [getattr(owner, "config", None)]
        config = getattr(subject.model, "config", None)
        if config is not None and hasattr(config, "get_text_config"):
            candidates.append(config.get_text_config(decoder=True))
        candidates.append(config)
        for cfg in candidates:
            if cfg is not None and getattr(cfg, "num_hidden_layers", None) == count:
                if getattr(cfg, "is_heterogeneous", False):
                    raise LensbenchError(f"loop_layers cannot loop {subject.label!r}: its config has per-layer "
                                         "overrides (per_layer_config), which it does not remap", "loop_layers")
                found.setdefault(id(cfg), cfg)
        return list(found.values())

    def validate(self, subject) -> None:
        owner, _, container = self._container(subject)
        count = len(container)
        config = getattr(subject.model, "config", None)
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        if not self._configs(subject, owner, count) and getattr(text, "num_hidden_layers", None) is not None:
            raise LensbenchError(f"loop_layers cannot loop {subject.label!r}: its config counts "
                                 f"{text.num_hidden_layers} layers but it has {count} blocks", "loop_layers")
        for key, value in (("start", self.start), ("end", self.end)):
            if value >= count:
                raise LensbenchError(f"loop_layers {key}={value} is outside the model's blocks (0-{count - 1})", key)
        if (self.end - self.start + 1) * self.passes + count - (self.end - self.start + 1) < 1:
            raise LensbenchError("loop_layers with passes=0 over every block would leave the model with no block; "
                                 "keep at least one", "passes")
        if any("forward" in m.__dict__ for m in container):
            raise LensbenchError(f"loop_layers cannot loop {subject.label!r}: its blocks have a patched forward "
                                 "(accelerate device map or offloading); load it on one device", "loop_layers")

    # -- the transform ----------------------------------------------------------------------------
    def touched(self, subject) -> list[str]:
        return []  # no weight changes; the structure is undone by ``undo``

    def apply(self, subject, generator) -> None:
        if self.passes == 1:
            return  # the plain model
        owner, attr, container = self._container(subject)
        current = list(container)
        count = len(current)
        order = list(range(self.start)) + list(range(self.start, self.end + 1)) * self.passes \
            + list(range(self.end + 1, count))
        sequence = []
        for position, i in enumerate(order):
            block = current[i]
            sequence.append(block if _indices(block) <= {position} else _repeat(block, position))
        changes: list[tuple[Any, str, Any]] = [(owner, attr, LoopedLayers(container, sequence))]
        for cfg in self._configs(subject, owner, count):
            changes.append((cfg, "num_hidden_layers", len(order)))
            keys = [k for k, v in vars(cfg).items() if isinstance(v, (list, tuple)) and len(v) == count
                    and (k in PER_LAYER_LISTS or k.endswith("layer_types"))]
            for key in keys:
                values = getattr(cfg, key)
                changes.append((cfg, key, type(values)(values[i] for i in order)))
        for obj, key, value in changes:  # each change recorded before it is made: undo reverts what was done
            self._undo.append((obj, key, getattr(obj, key)))
            setattr(obj, key, value)

    def undo(self, subject) -> None:
        while self._undo:
            obj, key, value = self._undo.pop()
            setattr(obj, key, value)


@hookimpl
def lensbench_register_perturbations() -> list[type]:
    return [LoopLayers]
