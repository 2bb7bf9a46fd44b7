"""Freeze or train a model's parameters by name: exact names, wildcards and module prefixes.

``freeze(model, spec)`` sets ``requires_grad`` from ``spec``, a mapping pattern -> action
(``"freeze"`` or ``"train"``) applied in order, so later entries win: ``{"*": "freeze",
"*.memory.*": "train"}`` trains the memory layers alone. A list of patterns freezes them all, and
either form may come as a JSON string (as given on the command line).

A pattern is matched against every qualified parameter name (tied aliases such as a tied
``lm_head.weight`` included) and is one of

- an exact name: ``model.layers.0.self_attn.k_proj.weight``;
- a wildcard (``*``, ``?``, ``[...]`` as in ``fnmatch``, where ``*`` crosses dots, plus braces
  ``{4-6}`` and ``{a,b}``): ``*.memory.keys*``, ``model.layers.{0-3}.mlp.*``; a wildcard that
  names a module (``*.mlp``) takes every parameter under it too;
- a module prefix, with or without the trailing dot: ``model.layers.0.`` or ``model.layers.1``,
  meaning every parameter under that module (``model.layers.1`` never takes ``model.layers.10``).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lensbench.errors import LensbenchError, did_you_mean
from lensbench.models.anatomy import expand_braces

ACTIONS = ("freeze", "train")
_WILDCARD = frozenset("*?[")


@dataclass
class FreezeReport:
    """What ``freeze`` left frozen and trainable, counted in parameter elements."""

    frozen: int
    """Elements of the parameters that do not require gradients (tied parameters counted once)."""
    trainable: int
    """Elements of the parameters that require gradients."""
    total: int
    """Elements of all parameters: ``frozen + trainable``."""
    frozen_names: list[str] = field(default_factory=list)
    """Names of the frozen tensors (one name per tied group: ``named_parameters``' own)."""
    matches: dict[str, int] = field(default_factory=dict)
    """Pattern -> number of tensors it matched (tied tensors once)."""
    unmatched: list[str] = field(default_factory=list)
    """Patterns that matched nothing (non-strict mode only; strict mode raises instead)."""

    def summary(self) -> str:
        """One line: ``froze 1,234 of 5,678 parameters (21.7%) in 12 tensors``."""
        share = 100.0 * self.frozen / self.total if self.total else 0.0
        line = (f"froze {self.frozen:,} of {self.total:,} parameters ({share:.1f}%) "
                f"in {len(self.frozen_names)} tensors")
        if self.unmatched:
            line += f"; matched nothing: {', '.join(self.unmatched)}"
        return line


def parse_freeze_spec(spec: Any, field: str = "model.init_args.freeze") -> list[tuple[str, str]]:
    """``spec`` (mapping, list, JSON string of either, or one pattern) as ordered (pattern, action) pairs."""
    if spec is None:
        return []
    if isinstance(spec, str):
        text = spec.strip()
        if text[:1] in "{[":
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as exc:
                raise LensbenchError(f"is not valid JSON ({exc.msg} at character {exc.pos}); write "
                                     "'{\"*\": \"freeze\", \"*.memory.*\": \"train\"}' or '[\"model.embed_tokens\"]'",
                                     field) from None
        else:
            spec = [text] if text else []
    if isinstance(spec, dict):
        pairs = [(str(p), a) for p, a in spec.items()]
    elif isinstance(spec, (list, tuple)):
        pairs = [(p, "freeze") for p in spec]
    else:
        raise LensbenchError(f"must map patterns to freeze/train or list patterns to freeze, not "
                             f"{type(spec).__name__}; write {{'*': freeze, '*.memory.*': train}}", field)
    for pattern, action in pairs:
        if not isinstance(pattern, str) or not pattern.strip():
            raise LensbenchError(f"pattern {pattern!r} is not a parameter name, prefix or wildcard; "
                                 "give a non-empty string", field)
        if action not in ACTIONS:
            raise LensbenchError(f"unknown action {action!r} for pattern {pattern!r}; "
                                 f"{did_you_mean(str(action), ACTIONS)} (use freeze or train)", field)
    return [(p.strip(), a) for p, a in pairs]


def pattern_matcher(pattern: str, field: str = "model.init_args.freeze"):
    """A predicate on qualified names for one pattern (exact name, wildcard or module prefix)."""
    try:
        alternatives = expand_braces(pattern)
    except LensbenchError as exc:
        raise LensbenchError(exc.message, field) from None

    def one(alt: str):
        if _WILDCARD & set(alt):
            under = alt.rstrip(".") + ".*"
            return lambda name: fnmatch.fnmatchcase(name, alt) or fnmatch.fnmatchcase(name, under)
        prefix = alt if alt.endswith(".") else alt + "."
        return lambda name: name == alt or name.startswith(prefix)

    tests = [one(alt) for alt in alternatives]
    return lambda name: any(test(name) for test in tests)


def close_names(pattern: str, names: list[str]) -> str:
    """A short hint of names (parameters or their modules) close to ``pattern``."""
    modules = {name.rsplit(".", k)[0] for name in names for k in range(1, name.count(".") + 1)}
    hint = did_you_mean(pattern, sorted(set(names) | modules))
    if hint.startswith("did you mean"):
        return hint
    return "names look like " + ", ".join(repr(n) for n in names[:3])


def freeze(model: nn.Module, spec: Any, strict: bool = True, field: str = "model.init_args.freeze") -> FreezeReport:
    """Set ``requires_grad`` of ``model``'s parameters from ``spec`` and report the result.

    Entries apply in order (later entries win); parameters no pattern matches keep their current
    ``requires_grad``. With ``strict``, a pattern matching no parameter raises a ``LensbenchError``
    naming it and close parameter names; otherwise it is listed in ``FreezeReport.unmatched``.
    Every pattern is checked before any parameter changes.
    """
    pairs = parse_freeze_spec(spec, field)
    by_name = dict(model.named_parameters(remove_duplicate=False))  # tied aliases too
    canonical = {id(p): name for name, p in model.named_parameters()}
    names = list(by_name)
    plan: list[tuple[str, str, list[nn.Parameter]]] = []
    for pattern, action in pairs:
        match = pattern_matcher(pattern, field)
        hits = list({id(by_name[n]): by_name[n] for n in names if match(n)}.values())
        if not hits and strict:
            raise LensbenchError(f"pattern {pattern!r} matches no parameter; {close_names(pattern, names)} "
                                 "(or set strict: false)", field)
        plan.append((pattern, action, hits))
    report = FreezeReport(0, 0, 0)
    for pattern, action, hits in plan:
        for param in hits:
            param.requires_grad_(action == "train")
        report.matches[pattern] = report.matches.get(pattern, 0) + len(hits)
        if not hits:
            report.unmatched.append(pattern)
    for param in {id(p): p for p in by_name.values()}.values():
        report.total += param.numel()
        if param.requires_grad:
            report.trainable += param.numel()
        else:
            report.frozen += param.numel()
            report.frozen_names.append(canonical[id(param)])
    return report
