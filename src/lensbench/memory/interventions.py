"""Interventions on memory layers (and on MLP neurons and attention heads of any model), as
registered transforms: each is a model state that composes with every other and that the state
manager undoes exactly, touching only the rows it changes.

| transform | params | what it does |
| --- | --- | --- |
| ``mask_memory_keys`` | ``layer``, ``keys`` ([[head, half, row], ...]), ``slots`` ([slot, ...]) | the half-key rows and slots can never be chosen (their scores are -inf before the top-k) |
| ``ablate_memory_values`` | ``layer``, ``slots``, ``mode`` (zero or random) | the slots' value vectors zeroed, or redrawn from N(0, std of the table) |
| ``ablate_memory_keys`` | ``layer``, ``keys`` ([[head, half, row], ...]), ``mode`` (zero or random) | the half-key rows zeroed (score 0: still chosen when 0 beats the other rows, the seed's per-key ablation), or redrawn from N(mean, std of their head-half's table) |
| ``ablate_memory`` | ``layer``, ``part`` (keys, values or layer) | the key tables zeroed (scores all 0: the seed's key ablation), the value table zeroed, or every parameter of the memory layer zeroed |
| ``swap_memory_keys`` | ``layer``, ``a``, ``b``, ``head`` (all), ``half`` (both) | half-key rows a and b exchanged |
| ``swap_memory_values`` | ``layer``, ``a``, ``b`` | the value vectors of slots a and b exchanged |
| ``ablate_attention_head`` | ``layer``, ``head`` | the head's slice of the attention output projection zeroed (its output removed) |
| ``ablate_mlp_neurons`` | ``layer``, ``neurons`` | the neurons' columns of the MLP's down projection zeroed (Geva et al. 2021: up/gate rows are keys, down columns values) |

``layer`` is a block index. Every index is checked against the model before anything changes.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import LensbenchError
from ..hookspecs import hookimpl
from ..state import Rows, Transform

FIELD = "transforms.params"


def _memory(subject, layer: Any, name: str):
    """(qualified name, module) of the memory layer of block ``layer``."""
    anatomy = subject.anatomy
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise LensbenchError(f"{name}: layer must be a block index, got {layer!r}", f"{FIELD}.layer")
    found = anatomy.memory_names.get(layer)
    if not found:
        has = sorted(anatomy.memory_names)
        raise LensbenchError(f"{name}: block {layer} has no memory layer; the model's memory layers are in blocks "
                             f"{has if has else 'none (not a memory model)'}", f"{FIELD}.layer")
    return found[0], subject.model.get_submodule(found[0])


def _indices(values: Any, size: int, what: str, field: str, name: str) -> list[int]:
    items = [values] if isinstance(values, int) else list(values or [])
    for v in items:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < size:
            raise LensbenchError(f"{name}: {what} {v!r} is out of range; use 0..{size - 1}", field)
    return items


class MaskMemoryKeys(Transform):
    name = "mask_memory_keys"
    description = "half-key rows and slots of a memory layer can never be chosen"
    structural = True  # sets the layer's (unsaved) blocking buffers; no weight changes

    def validate(self, subject) -> None:
        _, mem = _memory(subject, self.params.get("layer"), self.name)
        keys = self.params.get("keys") or []
        for k in keys:
            if not isinstance(k, (list, tuple)) or len(k) != 3:
                raise LensbenchError(f"{self.name}: each key is [head, half, row], got {k!r}", f"{FIELD}.keys")
            _indices(k[0], mem.heads, "head", f"{FIELD}.keys", self.name)
            _indices(k[1], 2, "half", f"{FIELD}.keys", self.name)
            _indices(k[2], mem.n_keys, "row", f"{FIELD}.keys", self.name)
        slots = _indices(self.params.get("slots"), mem.n_slots, "slot", f"{FIELD}.slots", self.name)
        if not keys and not slots:
            raise LensbenchError(f"{self.name}: give keys ([[head, half, row], ...]) or slots", f"{FIELD}.keys")
        # every half of every head must keep at least topk open rows, else a token reads nothing
        blocked = torch.zeros(mem.heads, 2, mem.n_keys, dtype=torch.bool)
        for h, s, r in keys:
            blocked[h, s, r] = True
        if int((~blocked).sum(-1).min()) < mem.topk or mem.n_slots - len(set(slots)) < mem.topk:
            raise LensbenchError(f"{self.name}: too many keys masked; every head and half must keep at least "
                                 f"topk={mem.topk} rows and slots open", f"{FIELD}.keys")

    def touched(self, subject) -> list[str]:
        return []

    def apply(self, subject, generator) -> None:
        _, mem = _memory(subject, self.params["layer"], self.name)
        self._saved = (mem.blocked_rows.clone(), mem.blocked_slots.clone())
        for h, s, r in self.params.get("keys") or []:
            mem.blocked_rows[h, s, r] = True
        slots = _indices(self.params.get("slots"), mem.n_slots, "slot", f"{FIELD}.slots", self.name)
        if slots:
            mem.blocked_slots = torch.unique(torch.cat([mem.blocked_slots, torch.tensor(slots, device=mem.blocked_slots.device)]))

    def undo(self, subject) -> None:
        saved = getattr(self, "_saved", None)
        if saved is None:
            return
        _, mem = _memory(subject, self.params["layer"], self.name)
        mem.blocked_rows.copy_(saved[0])
        mem.blocked_slots = saved[1]


class AblateMemoryValues(Transform):
    name = "ablate_memory_values"
    description = "value vectors of chosen memory slots zeroed or randomised"

    def validate(self, subject) -> None:
        _, mem = _memory(subject, self.params.get("layer"), self.name)
        if not _indices(self.params.get("slots"), mem.n_slots, "slot", f"{FIELD}.slots", self.name):
            raise LensbenchError(f"{self.name}: give at least one slot", f"{FIELD}.slots")
        if self.params.get("mode", "zero") not in ("zero", "random"):
            raise LensbenchError(f"{self.name}: mode must be zero or random, got {self.params.get('mode')!r}", f"{FIELD}.mode")

    def touched(self, subject) -> list[Rows]:
        name, _ = _memory(subject, self.params["layer"], self.name)
        return [Rows(f"{name}.values", tuple(self.params["slots"]))]

    def apply(self, subject, generator) -> None:
        _, mem = _memory(subject, self.params["layer"], self.name)
        index = torch.tensor(sorted(set(self.params["slots"])), device=mem.values.device)
        if self.params.get("mode", "zero") == "zero":
            mem.values.index_fill_(0, index, 0.0)
        else:
            std = float(mem.values.float().std())
            noise = torch.randn((len(index), mem.values.shape[1]), generator=generator, device=mem.values.device) * std
            mem.values.index_copy_(0, index, noise.to(mem.values.dtype))


class AblateMemoryKeys(Transform):
    name = "ablate_memory_keys"
    description = "half-key rows of a memory layer zeroed or randomised"
    MODES = ("zero", "random")

    def _where(self, subject):
        """(parameter name, module, distinct keys in order) after checking every index."""
        name, mem = _memory(subject, self.params.get("layer"), self.name)
        keys = self.params.get("keys")
        if not isinstance(keys, (list, tuple)) or not keys:
            raise LensbenchError(f"{self.name}: give keys as [[head, half, row], ...], got {keys!r}", f"{FIELD}.keys")
        for k in keys:
            if not isinstance(k, (list, tuple)) or len(k) != 3:
                raise LensbenchError(f"{self.name}: each key is [head, half, row], got {k!r}", f"{FIELD}.keys")
            _indices(k[0], mem.heads, "head", f"{FIELD}.keys", self.name)
            _indices(k[1], 2, "half", f"{FIELD}.keys", self.name)
            _indices(k[2], mem.n_keys, "row", f"{FIELD}.keys", self.name)
        if self.params.get("mode", "zero") not in self.MODES:
            raise LensbenchError(f"{self.name}: mode must be zero or random, got {self.params.get('mode')!r}",
                                 f"{FIELD}.mode")
        return name, mem, sorted({tuple(k) for k in keys})

    def validate(self, subject) -> None:
        self._where(subject)

    def touched(self, subject) -> list[Rows]:
        name, _, keys = self._where(subject)
        # keys is [heads, 2, n_keys, k_dim/2]: the rows' slices along dim 2 (every head and half) hold them
        return [Rows(f"{name}.keys", tuple(sorted({r for _, _, r in keys})), dim=2)]

    def apply(self, subject, generator) -> None:
        _, mem, keys = self._where(subject)
        if self.params.get("mode", "zero") == "zero":
            for h, s, r in keys:
                mem.keys[h, s, r] = 0.0
            return
        # each row from N(mean, std) of its head-half's table as it was, drawn in sorted key order
        stats = {(h, s): (float(mem.keys[h, s].float().mean()), float(mem.keys[h, s].float().std()))
                 for h, s, _ in keys}
        noise = torch.randn((len(keys), mem.keys.shape[-1]), generator=generator, device=mem.keys.device)
        for (h, s, r), z in zip(keys, noise):
            mean, std = stats[h, s]
            mem.keys[h, s, r] = (z * std + mean).to(mem.keys.dtype)


class AblateMemory(Transform):
    name = "ablate_memory"
    description = "a memory layer's keys, values, or every parameter zeroed"
    PARTS = ("keys", "values", "layer")

    def validate(self, subject) -> None:
        _memory(subject, self.params.get("layer"), self.name)
        if self.params.get("part", "layer") not in self.PARTS:
            raise LensbenchError(f"{self.name}: part must be one of {', '.join(self.PARTS)}", f"{FIELD}.part")

    def touched(self, subject) -> list[str]:
        name, mem = _memory(subject, self.params["layer"], self.name)
        part = self.params.get("part", "layer")
        if part == "layer":
            return [f"{name}.{n}" for n, _ in mem.named_parameters()]
        return [f"{name}.{part}"]

    def apply(self, subject, generator) -> None:
        for name in self.touched(subject):
            subject.model.get_parameter(name).zero_()


class SwapMemoryKeys(Transform):
    name = "swap_memory_keys"
    description = "two half-key rows of a memory layer exchanged"

    def _where(self, subject):
        name, mem = _memory(subject, self.params.get("layer"), self.name)
        a = _indices(self.params.get("a"), mem.n_keys, "row", f"{FIELD}.a", self.name)
        b = _indices(self.params.get("b"), mem.n_keys, "row", f"{FIELD}.b", self.name)
        heads = _indices(self.params["head"], mem.heads, "head", f"{FIELD}.head", self.name) \
            if self.params.get("head") is not None else list(range(mem.heads))
        halves = _indices(self.params["half"], 2, "half", f"{FIELD}.half", self.name) \
            if self.params.get("half") is not None else [0, 1]
        if len(a) != 1 or len(b) != 1:
            raise LensbenchError(f"{self.name}: a and b are one row each", f"{FIELD}.a")
        return name, mem, a[0], b[0], heads, halves

    def validate(self, subject) -> None:
        self._where(subject)

    def touched(self, subject) -> list[str]:
        return [f"{self._where(subject)[0]}.keys"]  # small: heads x 2 x n_keys x k_dim/2

    def apply(self, subject, generator) -> None:
        _, mem, a, b, heads, halves = self._where(subject)
        for h in heads:
            for s in halves:
                row_a = mem.keys[h, s, a].clone()
                mem.keys[h, s, a] = mem.keys[h, s, b]
                mem.keys[h, s, b] = row_a


class SwapMemoryValues(Transform):
    name = "swap_memory_values"
    description = "the value vectors of two memory slots exchanged"

    def _where(self, subject):
        name, mem = _memory(subject, self.params.get("layer"), self.name)
        a = _indices(self.params.get("a"), mem.n_slots, "slot", f"{FIELD}.a", self.name)
        b = _indices(self.params.get("b"), mem.n_slots, "slot", f"{FIELD}.b", self.name)
        if len(a) != 1 or len(b) != 1:
            raise LensbenchError(f"{self.name}: a and b are one slot each", f"{FIELD}.a")
        return name, mem, a[0], b[0]

    def validate(self, subject) -> None:
        self._where(subject)

    def touched(self, subject) -> list[Rows]:
        name, _, a, b = self._where(subject)
        return [Rows(f"{name}.values", (a, b))]

    def apply(self, subject, generator) -> None:
        _, mem, a, b = self._where(subject)
        mem.values[[a, b]] = mem.values[[b, a]]


_OUT = ("o_proj", "out_proj", "dense", "c_proj", "wo", "out")
_DOWN = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2", "wo", "out_proj")


def _child_linear(subject, parent: str, names: tuple[str, ...], what: str, field: str) -> str:
    modules = dict(subject.model.get_submodule(parent).named_modules())
    for n in names:
        if n in modules and getattr(modules[n], "weight", None) is not None:
            return f"{parent}.{n}.weight"
    raise LensbenchError(f"cannot find the {what} of {parent} (looked for {', '.join(names)})", field)


def _block(subject, layer: Any, name: str) -> int:
    n = subject.anatomy.num_layers()
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n:
        raise LensbenchError(f"{name}: layer {layer!r} is out of range; the model has blocks 0..{n - 1}", f"{FIELD}.layer")
    return layer


class _ZeroSlices(Transform):
    """Zeroes the slices ``_cols(subject)`` names (``Rows``): only those are saved and restored."""

    def _cols(self, subject) -> Rows:
        raise NotImplementedError

    def validate(self, subject) -> None:
        self._cols(subject)

    def touched(self, subject) -> list[Rows]:
        return [self._cols(subject)]

    def apply(self, subject, generator) -> None:
        rows = self._cols(subject)
        param = subject.model.get_parameter(rows.name)
        param.index_fill_(rows.dim, torch.tensor(rows.index, device=param.device), 0.0)


class AblateAttentionHead(_ZeroSlices):
    name = "ablate_attention_head"
    description = "one attention head's output removed (its slice of the output projection zeroed)"

    def _cols(self, subject) -> Rows:
        layer = _block(subject, self.params.get("layer"), self.name)
        weight = _child_linear(subject, subject.anatomy.attention_names[layer], _OUT, "attention output projection",
                               f"{FIELD}.layer")
        config = subject.model.config.get_text_config()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        head = _indices(self.params.get("head"), heads, "head", f"{FIELD}.head", self.name)
        if len(head) != 1:
            raise LensbenchError(f"{self.name}: head is one index", f"{FIELD}.head")
        module = subject.model.get_submodule(weight[:-len(".weight")])
        dim = 0 if type(module).__name__ == "Conv1D" else 1  # the projection's input features
        return Rows(weight, tuple(range(head[0] * head_dim, (head[0] + 1) * head_dim)), dim=dim)



class AblateMlpNeurons(_ZeroSlices):
    name = "ablate_mlp_neurons"
    description = "MLP neurons removed (their down-projection columns zeroed): any model's key-value memory"

    def _cols(self, subject) -> Rows:
        layer = _block(subject, self.params.get("layer"), self.name)
        mlp = subject.anatomy.mlp_names[layer]
        weight = _child_linear(subject, mlp, _DOWN, "MLP down projection", f"{FIELD}.layer")
        module = subject.model.get_submodule(weight[:-len(".weight")])
        dim = 0 if type(module).__name__ == "Conv1D" else 1  # GPT-2's Conv1D stores [in, out]
        size = subject.model.get_parameter(weight).shape[dim]
        neurons = _indices(self.params.get("neurons"), size, "neuron", f"{FIELD}.neurons", self.name)
        if not neurons:
            raise LensbenchError(f"{self.name}: give at least one neuron", f"{FIELD}.neurons")
        return Rows(weight, tuple(neurons), dim=dim)



@hookimpl
def lensbench_register_perturbations() -> list[type]:
    return [MaskMemoryKeys, AblateMemoryValues, AblateMemoryKeys, AblateMemory, SwapMemoryKeys, SwapMemoryValues,
            AblateAttentionHead, AblateMlpNeurons]
