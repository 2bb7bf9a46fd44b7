"""Where the parts of a language model live: embedding, blocks, attention, MLP, value projections.

``find_anatomy(model)`` maps a model without per-architecture tables: the blocks are
``model.get_decoder().layers`` when that exists (Llama, Mistral, Qwen2, Gemma-3, GPT-NeoX), else the
``nn.ModuleList`` of same-typed children holding the most parameters (GPT-2 ``transformer.h``, BERT
``encoder.layer``). Inside a block the attention and MLP are found by child name (``self_attn``,
``attn``, ``attention``...; ``mlp``, ``feed_forward``, ``ffn``..., or BERT's ``intermediate`` +
``output`` pair). Models it cannot map take ``AnatomyOverrides`` globs (``anatomy: {blocks: ...}`` in
the model's config entry).

Value projections are a whole ``v_proj``/``value`` weight (+bias), or the value slice of a fused
projection: GPT-2 ``c_attn`` (Conv1D, weight ``[D, 3D]``, value = columns ``2D..3D``, ``dim=1``) and
GPT-NeoX/Bloom ``query_key_value`` (Linear rows laid out per head as ``(heads, 3, head_dim)``, value =
rows ``h*3*hd + 2*hd .. h*3*hd + 3*hd`` of every head ``h``, ``dim=0``); biases are sliced alike.

Parameter-group spec grammar (``Anatomy.parameter_group``)::

    spec    := group [ "[" layers "]" ] | glob
    group   := attn_only   value projections only (weight-degradation studies)
             | attn        every parameter of the attention modules
             | mlp_only    every parameter of the MLP modules
             | embed_only  the input-embedding weight
             | blocks      every parameter of the blocks
             | all         every parameter of the model
             | memory      every parameter of the memory layers (product-key memories)
             | memory_keys     their key tables
             | memory_values   their value tables
    layers  := item ("," item)*      item := N | N-M   (block indices, inclusive, 0-based)
    glob    := anything containing * ? { or . : fnmatch over qualified parameter names, after
               brace expansion ({4-8} -> 4..8, {a,b} -> a|b), e.g. model.layers.{4-8}.mlp.*

A memory layer is any module with a ``memory_parameters()`` method returning ``{"keys": [...],
"values": [...]}`` (parameter names relative to it), such as ``lensbench.memory.ProductKeyMemory``;
where it replaces a block's MLP it is that block's MLP too (``mlp_only``).

Examples: ``mlp_only[4-8]``, ``attn[0,2,5-6]``, ``transformer.h.{0,1}.attn.c_attn.weight``.
Tied weights are listed once, under their ``named_parameters()`` name; globs also match aliases.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from lensbench.errors import LensbenchError, did_you_mean

GROUPS = ("attn_only", "attn", "mlp_only", "embed_only", "blocks", "all", "memory", "memory_keys", "memory_values")
_ATTN = ("self_attn", "self_attention", "attn", "attention", "mixer_attn", "sa")
_MLP = ("mlp", "feed_forward", "ffn", "feedforward", "ff", "block_sparse_moe", "moe", "memory")
_NORM = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f", "final_norm")
_VALUE = ("v_proj", "value", "v_lin", "to_v", "value_proj", "v")
_HINT = 'set anatomy: {blocks: "<glob>", attention: "<name>", mlp: "<name>", embedding: "<name>"} in the model\'s config entry'


@dataclass
class AnatomyOverrides:
    """User globs (fnmatch, with brace expansion) for models ``find_anatomy`` cannot map."""

    blocks: str | None = None  # qualified names of the blocks, e.g. "transformer.h.*"
    attention: str | None = None  # relative to a block, e.g. "attn"
    mlp: str | None = None  # relative to a block, e.g. "mlp" or "{intermediate,output}"
    embedding: str | None = None  # qualified module name, e.g. "transformer.wte"


@dataclass
class ParamSelection:
    """A parameter, or the slice ``index`` along ``dim`` of it, that belongs to a group."""

    name: str
    dim: int | None = None
    index: torch.Tensor | None = None

    def get(self, model: nn.Module) -> torch.Tensor:
        """The selected values (a copy when sliced)."""
        p = model.get_parameter(self.name)
        return p if self.index is None else p.index_select(self.dim, self.index.to(p.device))


@dataclass
class Anatomy:
    embedding_name: str
    block_names: list[str]
    attention_names: list[str]
    mlp_names: list[str]
    final_norm_name: str | None
    value_params: list[ParamSelection]
    mlp_parts: list[list[str]] = field(default_factory=list)  # per block, all MLP modules (BERT: 2)
    memory_names: dict[int, list[str]] = field(default_factory=dict)  # block index -> its memory layers
    memory_params: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # layer -> keys/values names

    def num_layers(self) -> int:
        return len(self.block_names)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [model.get_submodule(n) for n in self.block_names]

    def describe(self) -> dict:
        vals = [{"name": s.name, "dim": s.dim, "size": None if s.index is None else int(s.index.numel())}
                for s in self.value_params]
        return {"embedding": self.embedding_name, "num_layers": self.num_layers(), "blocks": list(self.block_names),
                "attention": list(self.attention_names), "mlp": list(self.mlp_names),
                "mlp_parts": [list(p) for p in self._mlp_parts()], "final_norm": self.final_norm_name,
                "value_params": vals, "memory": {str(i): list(n) for i, n in self.memory_names.items()}}

    def memory_layers(self, model: nn.Module) -> dict[int, list[nn.Module]]:
        """Block index -> the memory layers inside that block."""
        return {i: [model.get_submodule(n) for n in names] for i, names in self.memory_names.items()}

    def _mlp_parts(self) -> list[list[str]]:
        return self.mlp_parts or [[n] for n in self.mlp_names]

    def parameter_group(self, model: nn.Module, spec: str, field: str = "parameter_group") -> list[ParamSelection]:
        """The parameters named by ``spec`` (grammar in the module docstring), in model order."""
        spec = spec.strip()
        aliases: dict[int, str] = {}  # id(param) -> canonical name
        for n, p in model.named_parameters():
            aliases.setdefault(id(p), n)
        pairs = [(n, aliases[id(p)]) for n, p in model.named_parameters(remove_duplicate=False) if id(p) in aliases]
        order = list(dict.fromkeys(aliases.values()))
        m = re.fullmatch(r"(\w+)\s*(?:\[([^\]]*)\])?", spec)
        if not m or any(c in spec for c in "*?{."):
            pats = expand_braces(spec)
            hit = {canon for n, canon in pairs if any(fnmatch.fnmatchcase(n, pt) for pt in pats)}
            if not hit:
                raise LensbenchError(f"glob {spec!r} matches no parameter of the model; check it against model.named_parameters() (e.g. {order[0]!r})" if order else f"glob {spec!r} matches no parameter (the model has none)", field)
            return [ParamSelection(n) for n in order if n in hit]
        name, rng = m.group(1), m.group(2)
        if name not in GROUPS:
            raise LensbenchError(f"unknown parameter group {name!r}; {did_you_mean(name, GROUPS)} (or use a glob over parameter names)", field)
        if rng is not None and name in ("all", "embed_only"):
            raise LensbenchError(f"group {name!r} takes no layer range; drop '[{rng}]' or use attn_only, attn, mlp_only or blocks", field)
        layers = _parse_layers(rng, self.num_layers(), spec, field) if rng is not None else range(self.num_layers())

        def under(prefixes: list[str]) -> list[ParamSelection]:
            hit = {canon for n, canon in pairs if any(p == "" or n.startswith(p + ".") for p in prefixes)}
            return [ParamSelection(n) for n in order if n in hit]

        if name.startswith("memory"):
            if not self.memory_names:
                raise LensbenchError(f"group {name!r}: this model has no memory layer; use a model with product-key memory layers (model_type memory_llama) or another group", field)
            kinds = {"memory": None, "memory_keys": "keys", "memory_values": "values"}[name]
            mods = [m for i in layers for m in self.memory_names.get(i, [])]
            if kinds is None:
                out = under(mods)
            else:
                hit = {f"{m}.{rel}" for m in mods for rel in self.memory_params[m][kinds]}
                out = [ParamSelection(n) for n in order if n in hit]
        elif name == "all":
            out = [ParamSelection(n) for n in order]
        elif name == "embed_only":
            out = under([self.embedding_name])
        elif name == "attn_only":
            if not self.value_params:
                raise LensbenchError("attn_only: no value projection was found in this model's attention; use a glob over the value weights instead (e.g. '*.{0-3}.attn.v.weight')", field)
            prefixes = tuple(self.block_names[i] + "." for i in layers)
            out = [s for s in self.value_params if s.name.startswith(prefixes)]
        else:
            per_layer = {"attn": [[a] for a in self.attention_names], "mlp_only": self._mlp_parts(),
                         "blocks": [[b] for b in self.block_names]}[name]
            out = under([p for i in layers for p in per_layer[i]])
        if not out:
            raise LensbenchError(f"group {spec!r} matches no parameter of this model; pick another group or a glob", field)
        return out


def expand_braces(pattern: str) -> list[str]:
    """``a.{4-6}.{x,y}`` -> ``a.4.x a.4.y ... a.6.y``; nested braces expand too."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        raise LensbenchError(f"unbalanced '{{' in {pattern!r}; close every brace", "parameter_group")
    body, alts, depth, cur = pattern[start + 1:end], [], 0, ""
    for ch in body:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            alts.append(cur)
            cur = ""
        else:
            cur += ch
    alts.append(cur)
    items: list[str] = []
    for a in alts:
        r = re.fullmatch(r"(\d+)-(\d+)", a)
        items += [str(i) for i in range(int(r.group(1)), int(r.group(2)) + 1)] if r else expand_braces(a)
    return [x for it in items for x in expand_braces(pattern[:start] + it + pattern[end + 1:])]


def _parse_layers(text: str, n: int, spec: str, fld: str) -> list[int]:
    out: list[int] = []
    for item in text.split(","):
        r = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if not r:
            raise LensbenchError(f"bad layer range {item.strip()!r} in {spec!r}; write block indices like [4-8] or [0,2,5-6]", fld)
        lo, hi = int(r.group(1)), int(r.group(2) or r.group(1))
        if lo > hi:
            raise LensbenchError(f"layer range {lo}-{hi} in {spec!r} is reversed; write {hi}-{lo}", fld)
        if hi >= n:
            raise LensbenchError(f"layer {hi} in {spec!r} is out of range; this model has blocks 0-{n - 1}", fld)
        out += [i for i in range(lo, hi + 1) if i not in out]
    return out


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _outermost(names: list[str], pattern: str) -> list[str]:
    """Names matching the (brace-expanded) glob that are not inside another match, in numeric order."""
    pats = expand_braces(pattern)
    hit = [n for n in names if n and any(fnmatch.fnmatchcase(n, p) for p in pats)]
    hit = [n for n in hit if not any(n.startswith(o + ".") for o in hit)]
    return sorted(hit, key=_natural)


def _find_blocks(model: nn.Module, names: dict[int, str]) -> list[str] | None:
    try:
        layers = getattr(model.get_decoder(), "layers", None)
    except Exception:  # no get_decoder, or it refuses
        layers = None
    if isinstance(layers, nn.ModuleList) and len(layers) and id(layers) in names:
        return [f"{names[id(layers)]}.{i}".lstrip(".") for i in range(len(layers))]
    best, best_key = None, None
    for qn, mod in model.named_modules():
        kids = list(mod.children()) if isinstance(mod, nn.ModuleList) else []
        if not kids or len({type(k) for k in kids}) != 1:
            continue
        key = (sum(p.numel() for p in mod.parameters()), len(kids), -qn.count("."))
        if key[0] and (best_key is None or key > best_key):
            best, best_key = [f"{qn}.{i}".lstrip(".") for i in range(len(kids))], key
    return best


def _child(block: nn.Module, prefix: str, candidates: tuple[str, ...], pattern: str | None,
           what: str, fld: str, keywords: tuple[str, ...]) -> list[str]:
    rel = [n for n, _ in block.named_modules() if n]
    if pattern is not None:
        found = _outermost(rel, pattern)
        if not found:
            kids = ", ".join(n for n, _ in block.named_children())
            raise LensbenchError(f"{what} glob {pattern!r} matches no module of block {prefix!r} (its children: {kids}); fix anatomy.{what}", fld)
        return [f"{prefix}.{n}" for n in found]
    kids = [n for n, _ in block.named_children()]
    for c in candidates:
        if c in kids:
            return [f"{prefix}.{c}"]
    if what == "mlp" and "intermediate" in kids and "output" in kids:  # BERT-style split MLP
        return [f"{prefix}.intermediate", f"{prefix}.output"]
    for k in kids:
        low = k.lower()
        if any(w in low for w in keywords) and "norm" not in low and "ln" not in low:
            return [f"{prefix}.{k}"]
    return []


def _value_params(model: nn.Module, attn_name: str) -> list[ParamSelection]:
    attn = model.get_submodule(attn_name)
    mods = dict(attn.named_modules())
    for cand in _VALUE:
        rel = next((n for n in mods if n == cand or n.endswith("." + cand)), None)
        if rel is not None and getattr(mods[rel], "weight", None) is not None:
            mod, base = mods[rel], f"{attn_name}.{rel}"
            return [ParamSelection(f"{base}.{pn}") for pn, _ in mod.named_parameters(recurse=False)]
    if "c_attn" in mods and type(mods["c_attn"]).__name__ == "Conv1D":  # GPT-2: [D, 3D], q|k|v columns
        mod = mods["c_attn"]
        third = mod.weight.shape[1] // 3
        idx = torch.arange(2 * third, 3 * third)
        out = [ParamSelection(f"{attn_name}.c_attn.weight", 1, idx)]
        if mod.bias is not None:
            out.append(ParamSelection(f"{attn_name}.c_attn.bias", 0, idx))
        return out
    if "query_key_value" in mods:  # GPT-NeoX / Bloom: rows as (heads, 3, head_dim)
        mod = mods["query_key_value"]
        cfg = getattr(model, "config", None)
        hd = getattr(attn, "head_size", None) or getattr(attn, "head_dim", None)
        if hd is None and cfg is not None:
            hd = cfg.hidden_size // cfg.num_attention_heads
        rows = mod.weight.shape[0]
        if not hd or rows % (3 * hd):
            return []
        idx = torch.cat([torch.arange(h * 3 * hd + 2 * hd, h * 3 * hd + 3 * hd) for h in range(rows // (3 * hd))])
        out = [ParamSelection(f"{attn_name}.query_key_value.weight", 0, idx)]
        if mod.bias is not None:
            out.append(ParamSelection(f"{attn_name}.query_key_value.bias", 0, idx))
        return out
    return []


def find_anatomy(model: nn.Module, overrides: AnatomyOverrides | None = None, field: str = "anatomy") -> Anatomy:
    """Map ``model``'s parts; raise ``LensbenchError`` with the override to set when it cannot."""
    ov = overrides or AnatomyOverrides()
    names = {id(m): n for n, m in model.named_modules()}
    all_names = list(dict.fromkeys(names.values()))
    top = ", ".join(n for n, _ in model.named_children()) or "none"
    kind = type(model).__name__

    if ov.blocks is not None:
        block_names = _outermost(all_names, ov.blocks)
        if not block_names:
            raise LensbenchError(f"blocks glob {ov.blocks!r} matches no module of {kind} (top-level modules: {top}); fix anatomy.blocks", field)
    else:
        block_names = _find_blocks(model, names)
        if not block_names:
            raise LensbenchError(f"cannot find the transformer blocks of {kind} (top-level modules: {top}); {_HINT}", field)

    if ov.embedding is not None:
        if ov.embedding not in all_names:
            hint = did_you_mean(ov.embedding, all_names)
            raise LensbenchError(f"embedding {ov.embedding!r} is not a module of {kind}; {hint if hint.startswith('did') else 'top-level modules: ' + top}", field)
        emb_name = ov.embedding
    else:
        try:
            emb = model.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            embs = [m for m in model.modules() if isinstance(m, nn.Embedding)]
            emb = max(embs, key=lambda m: m.num_embeddings) if embs else None
        if emb is None or id(emb) not in names:
            raise LensbenchError(f"cannot find the token embedding of {kind} (top-level modules: {top}); {_HINT}", field)
        emb_name = names[id(emb)]

    attention_names, mlp_names, mlp_parts, values = [], [], [], []
    for bn in block_names:
        block = model.get_submodule(bn)
        att = _child(block, bn, _ATTN, ov.attention, "attention", field, ("attn", "attention"))
        mlp = _child(block, bn, _MLP, ov.mlp, "mlp", field, ("mlp", "ffn", "feed_forward", "feedforward"))
        for what, got in (("attention", att), ("mlp", mlp)):
            if not got:
                kids = ", ".join(n for n, _ in block.named_children())
                raise LensbenchError(f"cannot find the {what} in block {bn!r} of {kind} (its children: {kids}); {_HINT}", field)
        attention_names.append(att[0])
        mlp_names.append(mlp[0])
        mlp_parts.append(mlp)
        values.append(_value_params(model, att[0]))
    value_params = [s for v in values for s in v] if all(values) else []

    memory_names: dict[int, list[str]] = {}
    memory_params: dict[str, dict[str, list[str]]] = {}
    for i, bn in enumerate(block_names):
        for rel, mod in model.get_submodule(bn).named_modules():
            parts = getattr(mod, "memory_parameters", None)
            if rel and callable(parts):
                memory_names.setdefault(i, []).append(f"{bn}.{rel}")
                memory_params[f"{bn}.{rel}"] = {k: list(v) for k, v in parts().items()}

    skip = tuple(b + "." for b in block_names) + (emb_name + ".",)
    norms = [n for n in all_names if n.rsplit(".", 1)[-1] in _NORM and not n.startswith(skip) and n not in block_names]
    final_norm = min(norms, key=lambda n: n.count(".")) if norms else None
    return Anatomy(emb_name, block_names, attention_names, mlp_names, final_norm, value_params, mlp_parts,
                   memory_names, memory_params)
