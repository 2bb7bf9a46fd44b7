"""Load chosen tensors of a pretrained checkpoint into a model: whole blocks, components, or all.

``PretrainedLayers`` names the checkpoint and what to take from it; ``load_pretrained_layers``
copies those tensors into a model built otherwise (a model with a memory layer in place of an
MLP, a deeper model seeded from a shallower one). In every mapping, keys are SOURCE names (of the
checkpoint) and values are TARGET names (of the model).

- ``load_all`` pairs every source tensor with the target tensor of the same name and shape;
  source tensors without one are reported as skipped.
- ``layer_mappings`` (``{"0-5": "0-5", "6": "10"}``) sends every tensor of source block i to the
  same relative name under target block j. The blocks are the longest numbered list found in the
  names (``model.layers.`` for Llama, ``transformer.h.`` for GPT-2), found in source and target
  separately.
- ``component_mappings`` (``{"model.layers.0.mlp.*": "model.layers.1.mlp.*"}``) maps exact
  names, module prefixes (``model.layers.0.mlp``) or wildcards, whose every ``*`` captures text
  put into the matching ``*`` of the target; braces expand (``{0,1}``, ``{0-3}``) in both, in step.

Later sources win: ``component_mappings`` over ``layer_mappings`` over ``load_all``, and within
``component_mappings`` later entries over earlier ones. Every pair's shape is checked before any
tensor is copied, so a refused mapping leaves the model as it was. Tensors are read one at a time
(``open_checkpoint``), cast to the target's dtype and device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lensbench.errors import LensbenchError, did_you_mean
from lensbench.models.anatomy import expand_braces

_WILDCARD = frozenset("*?[")


@dataclass
class PretrainedLayers:
    """Tensors to copy from a pretrained checkpoint into the model before training.

    In ``layer_mappings`` and ``component_mappings`` keys are SOURCE (checkpoint) names and
    values are TARGET (model) names.
    """

    source: str
    """The checkpoint: a model folder, an embedded alias (smollm2), a .safetensors or .gguf file,
    or a hub id, as a model's ``source`` takes."""
    step: int | None = None
    """Read ``<source>/checkpoint-<step>`` (the Hugging Face folders a training run writes)
    instead of ``source`` itself."""
    layer_mappings: dict[str, str] = field(default_factory=dict)
    """Source blocks -> target blocks, as indices or ranges of equal length:
    ``{"0-5": "0-5", "6": "10"}``. Every tensor of source block i goes to the same relative
    name under target block j."""
    component_mappings: dict[str, str] = field(default_factory=dict)
    """Source name -> target name: exact names, module prefixes, or wildcards whose each ``*``
    carries its text to the matching ``*`` of the target: ``{"model.layers.0.mlp.*":
    "model.layers.1.mlp.*"}``. Overrides ``layer_mappings`` and ``load_all``."""
    load_all: bool = False
    """Load every source tensor whose exact name the target has with the same shape; the others
    are reported as skipped."""
    strict: bool = True
    """Refuse a mapping whose source matches nothing or whose target name does not exist
    (otherwise such mappings are reported and skipped)."""


@dataclass
class LoadReport:
    """What ``load_pretrained_layers`` copied."""

    source: str
    """The checkpoint read (its ``source``, with ``/checkpoint-<step>`` when a step was given)."""
    loaded: list[tuple[str, str]] = field(default_factory=list)
    """(target name, source name) of every tensor copied, in the target's order."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Source name -> why it was not loaded (load_all tensors without a same-named, same-shaped
    target; with strict off, mapped tensors whose target does not exist)."""
    unmatched: list[str] = field(default_factory=list)
    """Mapping keys that matched no source tensor (strict off only)."""
    parameters: int = 0
    """Elements copied."""

    def summary(self) -> str:
        """One line: ``loaded 27 tensors (1.2M parameters) from smollm2``."""
        line = f"loaded {len(self.loaded)} tensors ({_human(self.parameters)} parameters) from {self.source}"
        if self.skipped:
            line += f"; skipped {len(self.skipped)} source tensors"
        if self.unmatched:
            line += f"; matched nothing: {', '.join(self.unmatched)}"
        return line


@dataclass
class _Pair:
    target: str
    source: str
    field: str  # the config field that asked for it, for errors


def _human(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def _shape(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def block_list(names: list[str]) -> tuple[str, list[int]] | None:
    """The prefix and indices of the model's numbered block list (``model.layers.``, [0, 1, ...]).

    Each name's first all-digit segment marks a list entry; the list with the most entries wins
    (ties: the one holding more names). ``None`` when no name has a numbered segment.
    """
    lists: dict[str, tuple[set[int], list[int]]] = {}
    for name in names:
        parts = name.split(".")
        for k, part in enumerate(parts[:-1]):
            if part.isdigit():
                entry = lists.setdefault(".".join(parts[:k]) + "." if k else "", (set(), [0]))
                entry[0].add(int(part))
                entry[1][0] += 1
                break
    if not lists:
        return None
    prefix = max(lists, key=lambda p: (len(lists[p][0]), lists[p][1][0], -len(p)))
    return prefix, sorted(lists[prefix][0])


def _span(indices: list[int]) -> str:
    return f"{indices[0]}-{indices[-1]}" if indices == list(range(indices[0], indices[-1] + 1)) \
        else ", ".join(map(str, indices))


def parse_layers(text: Any, field: str) -> list[int]:
    """``"0-2,5"`` (or an int) -> [0, 1, 2, 5]; reversed ranges and junk raise."""
    out: list[int] = []
    for item in str(text).split(","):
        r = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if not r:
            raise LensbenchError(f"bad layer range {item.strip()!r} in {text!r}; write block indices like "
                                 "'3', '0-5' or '0-2,5'", field)
        lo, hi = int(r.group(1)), int(r.group(2) or r.group(1))
        if lo > hi:
            raise LensbenchError(f"layer range {lo}-{hi} is reversed; write {hi}-{lo}", field)
        out += range(lo, hi + 1)
    return out


def _checkpoint_folder(spec: PretrainedLayers, field: str) -> str:
    """``spec.source``, or its ``checkpoint-<step>`` subfolder when ``step`` is set."""
    if spec.step is None:
        return str(spec.source)
    if isinstance(spec.step, bool) or not isinstance(spec.step, int) or spec.step < 0:
        raise LensbenchError(f"must be a training step (an integer >= 0), not {spec.step!r}", f"{field}.step")
    root = Path(str(spec.source)).expanduser()
    if not root.is_dir():
        raise LensbenchError(f"reads <source>/checkpoint-{spec.step}, but source {spec.source!r} is not a local "
                             "folder; give the folder the training run wrote, or drop step", f"{field}.step")
    folder = root / f"checkpoint-{spec.step}"
    if not folder.is_dir():
        steps = sorted(int(p.name.split("-", 1)[1]) for p in root.glob("checkpoint-*")
                       if p.is_dir() and p.name.split("-", 1)[1].isdigit())
        have = (f"it holds {', '.join(f'checkpoint-{s}' for s in steps)}" if steps
                else "it holds no checkpoint-<N> folders")
        raise LensbenchError(f"{root} has no checkpoint-{spec.step}; {have}; pick one of those steps",
                             f"{field}.step")
    return str(folder)


def _targets(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every parameter and buffer by name (tied aliases too) and each name's canonical name."""
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        tensors[name] = t
    for name, t in model.named_buffers(remove_duplicate=False):
        tensors[name] = t
    first: dict[int, str] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        first.setdefault(id(t), name)
    canonical = {name: first.get(id(t), name) for name, t in tensors.items()}
    return tensors, canonical


def _close(name: str, names: list[str]) -> str:
    hint = did_you_mean(name, names)
    return hint if hint.startswith("did you mean") else "names look like " + ", ".join(repr(n) for n in names[:3])


def _component_pairs(src_pat: str, tgt_pat: str, source_names: list[str], fld: str) -> list[tuple[str, str]] | None:
    """(source, target) names for one component mapping; None when its source matches nothing."""
    try:
        sources, targets = expand_braces(src_pat), expand_braces(tgt_pat)
    except LensbenchError as exc:
        raise LensbenchError(exc.message, fld) from None
    if len(targets) == 1:
        targets = targets * len(sources)
    elif len(targets) != len(sources):
        raise LensbenchError(f"{src_pat!r} expands to {len(sources)} names but {tgt_pat!r} to {len(targets)}; "
                             "give braces of equal length on both sides", fld)
    out: list[tuple[str, str]] = []
    for src, tgt in zip(sources, targets):
        if _WILDCARD & set(src):
            stars, tstars = src.count("*"), tgt.count("*")
            if tstars not in (0, stars) or _WILDCARD & (set(tgt) - {"*"}):
                raise LensbenchError(f"target {tgt!r} must carry the {stars} '*' of source {src!r} (or none), "
                                     "and no other wildcards", fld)
            pieces = re.split(r"(\*)", src)
            regex = "".join("(.*)" if p == "*" else _glob_regex(p) for p in pieces)
            for name in source_names:
                m = re.fullmatch(regex, name)
                if m:
                    it = iter(m.groups())
                    out.append((name, re.sub(r"\*", lambda _: next(it), tgt) if tstars else tgt))
        elif src in source_names:
            out.append((src, tgt))
        else:
            prefix, into = (src, tgt) if src.endswith(".") else (src + ".", tgt.rstrip(".") + ".")
            out += [(n, into + n[len(prefix):]) for n in source_names if n.startswith(prefix)]
    seen: dict[str, str] = {}
    for src, tgt in out:
        if seen.setdefault(tgt, src) != src:
            raise LensbenchError(f"{src_pat!r} -> {tgt_pat!r} sends both {seen[tgt]} and {src} to {tgt}; "
                                 "give the target as many '*' as the source", fld)
    return out or None


def _glob_regex(text: str) -> str:
    """Regex for a glob piece without ``*``: ``?`` one character, ``[...]`` a class, the rest literal."""
    out, i = "", 0
    while i < len(text):
        ch = text[i]
        if ch == "?":
            out += "."
        elif ch == "[" and "]" in text[i + 1:]:
            end = text.index("]", i + 1)
            body = text[i + 1:end]
            out += "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
            i = end
        else:
            out += re.escape(ch)
        i += 1
    return out


def _layer_pairs(mappings: dict, source_names: list[str], target_names: list[str], label: str,
                 fld: str) -> list[tuple[str, str]]:
    src_blocks, tgt_blocks = block_list(source_names), block_list(target_names)
    if src_blocks is None or tgt_blocks is None:
        which = "checkpoint " + label if src_blocks is None else "target model"
        raise LensbenchError(f"the {which} has no numbered block list (like model.layers.0.); "
                             "map its tensors with component_mappings instead", fld)
    (sp, s_idx), (tp, t_idx) = src_blocks, tgt_blocks
    out: list[tuple[str, str]] = []
    taken: dict[int, int] = {}
    for src_text, tgt_text in mappings.items():
        src_layers, tgt_layers = parse_layers(src_text, fld), parse_layers(tgt_text, fld)
        if len(src_layers) != len(tgt_layers):
            raise LensbenchError(f"maps {len(src_layers)} source layers ({src_text}) to {len(tgt_layers)} target "
                                 f"layers ({tgt_text}); give ranges of equal length", fld)
        for i, j in zip(src_layers, tgt_layers):
            if i not in s_idx:
                raise LensbenchError(f"source layer {i} is out of range; {label} has blocks {_span(s_idx)} "
                                     f"({sp}N.)", fld)
            if j not in t_idx:
                raise LensbenchError(f"target layer {j} is out of range; the target has blocks {_span(t_idx)} "
                                     f"({tp}N.)", fld)
            if taken.get(j, i) != i:
                raise LensbenchError(f"target layer {j} is mapped from both source layers {taken[j]} and {i}; "
                                     "map each target layer once", fld)
            taken[j] = i
            head = f"{sp}{i}."
            out += [(n, f"{tp}{j}." + n[len(head):]) for n in source_names if n.startswith(head)]
    return out


def load_pretrained_layers(model: nn.Module, spec: PretrainedLayers | dict,
                           field: str = "model.init_args.pretrained_layers") -> LoadReport:
    """Copy the tensors ``spec`` selects from its checkpoint into ``model``; report what moved.

    All mappings are resolved and every pair's shape checked before the first copy: an error
    (unknown source or target names under ``strict``, out-of-range or unequal layer ranges, a
    shape mismatch, a missing step) leaves ``model`` unchanged.
    """
    from lensbench.models.checkpoint import open_checkpoint
    from lensbench.models.loading import ModelSpec

    if isinstance(spec, dict):
        spec = PretrainedLayers(**spec)
    for key in ("layer_mappings", "component_mappings"):
        if not isinstance(getattr(spec, key) or {}, dict):
            raise LensbenchError(f"must map source names to target names, not {type(getattr(spec, key)).__name__}; "
                                 "write {source: target}", f"{field}.{key}")
    if not (spec.load_all or spec.layer_mappings or spec.component_mappings):
        raise LensbenchError("selects nothing to load; set load_all: true, layer_mappings or component_mappings",
                             field)
    location = _checkpoint_folder(spec, field)
    label = str(spec.source) if spec.step is None else f"{spec.source}/checkpoint-{spec.step}"
    reader = open_checkpoint(ModelSpec(source=location), field)
    source_names = reader.names()
    tensors, canonical = _targets(model)
    target_names = list(tensors)
    report = LoadReport(label)
    pairs: dict[str, _Pair] = {}  # canonical target name -> pair; later assignments win

    if spec.load_all:
        fld = f"{field}.load_all"
        for name in source_names:
            if name not in tensors:
                report.skipped[name] = "the target has no tensor of this name"
            elif tuple(reader.shape(name)) != tuple(tensors[name].shape):
                report.skipped[name] = (f"shape {_shape(reader.shape(name))} differs from the target's "
                                        f"{_shape(tensors[name].shape)}")
            elif canonical[name] != name and canonical[name] in source_names:
                report.skipped[name] = f"tied to {canonical[name]} in the target, which is loaded instead"
            else:
                pairs[canonical[name]] = _Pair(name, name, fld)

    explicit: list[tuple[str, str, str]] = []  # (source, target, field), in order of precedence
    if spec.layer_mappings:
        fld = f"{field}.layer_mappings"
        explicit += [(s, t, fld) for s, t in _layer_pairs(spec.layer_mappings, source_names, target_names,
                                                               label, fld)]
    for src_pat, tgt_pat in (spec.component_mappings or {}).items():
        fld = f"{field}.component_mappings"
        found = _component_pairs(str(src_pat), str(tgt_pat), source_names, fld)
        if found is None:
            if spec.strict:
                raise LensbenchError(f"source {src_pat!r} matches no tensor of {label}; "
                                     f"{_close(str(src_pat), source_names)} (or set strict: false)", fld)
            report.unmatched.append(str(src_pat))
            continue
        explicit += [(s, t, fld) for s, t in found]
    for src, tgt, fld in explicit:
        if tgt not in tensors:
            if spec.strict:
                raise LensbenchError(f"source {src} maps to {tgt}, which the target does not have; "
                                     f"{_close(tgt, target_names)} (or set strict: false)", fld)
            report.skipped[src] = f"mapped to {tgt}, which the target does not have"
            continue
        report.skipped.pop(src, None)
        pairs[canonical[tgt]] = _Pair(tgt, src, fld)

    order = {name: k for k, name in enumerate(target_names)}
    keys = sorted(pairs, key=lambda n: order.get(n, len(order)))
    mismatched = [pairs[k] for k in keys
                  if tuple(reader.shape(pairs[k].source)) != tuple(tensors[pairs[k].target].shape)]
    if mismatched:
        p = mismatched[0]
        more = f" (and {len(mismatched) - 1} more pairs)" if len(mismatched) > 1 else ""
        raise LensbenchError(f"source {p.source} {_shape(reader.shape(p.source))} cannot load into {p.target} "
                             f"{_shape(tensors[p.target].shape)}{more}; map layers of the same shape", p.field)

    with torch.no_grad():
        for key in keys:
            p = pairs[key]
            dest = tensors[p.target]
            dest.copy_(reader.get(p.source).to(device=dest.device, dtype=dest.dtype))
            report.loaded.append((p.target, p.source))
            report.parameters += dest.numel()
    return report
