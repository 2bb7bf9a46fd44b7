"""Which tensors of a checkpoint are weight matrices of linear layers, and where they sit.

The architecture is instantiated on the meta device from the checkpoint's config (no memory,
no weights), so the answer comes from the model's own modules (``nn.Linear`` and GPT-2's
``Conv1D``), not from name patterns; the anatomy gives each matrix its layer and module type.
Without a config, 2-D ``*.weight`` tensors whose names do not look like embeddings or norms
are taken.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any

import torch

from .anatomy import expand_braces

#: Without a config: names of embeddings and norms (an output head on disk is compared: a tied one
#: is not saved separately).
NOT_LINEAR = ("*embed_tokens*", "*embed_in*", "*embeddings*", "*wte*", "*wpe*", "*norm*", "*ln_*", "*position*")


@dataclass(frozen=True)
class MatrixInfo:
    name: str
    layer: int  # block index, -1 outside the blocks (e.g. an untied lm_head)
    module: str  # path inside the block without ".weight", expert index left out (mlp.experts.w1)
    expert: int | None = None  # the expert index of a mixture-of-experts matrix


@dataclass(frozen=True)
class Skipped:
    """A two-dimensional tensor on disk that is not compared, and why."""

    name: str
    shape: tuple[int, ...]
    reason: str  # embedding | norm | tied to <name> | excluded by a glob | not included


def _meta_models(config: dict[str, Any]) -> list[torch.nn.Module]:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    models = []
    for auto in (AutoModelForCausalLM, AutoModel):
        try:
            with torch.device("meta"):
                models.append(auto.from_config(cfg))
        except (ValueError, KeyError, TypeError):
            continue
    return models


def _roles(model: torch.nn.Module, config: dict[str, Any]) -> dict[str, str]:
    """Weight name -> why it is not compared, from the model's own modules: its embeddings
    (``nn.Embedding``), its norms, and an output head tied to the input embedding."""
    roles: dict[str, str] = {}
    names = {id(m): n for n, m in model.named_modules()}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            roles[f"{name}.weight"] = "embedding"
        elif "norm" in type(module).__name__.lower():
            roles[f"{name}.weight"] = "norm"
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tie = config.get("tie_word_embeddings", getattr(model.config, "tie_word_embeddings", False))
    if out is not None and inp is not None and tie and id(out) in names and id(inp) in names:
        roles[f"{names[id(out)]}.weight"] = f"tied to {names[id(inp)]}.weight"
    return roles


def _locate(name: str, blocks: list[str]) -> tuple[int, str, int | None]:
    layer, module = -1, name.removesuffix(".weight")
    for index, block in enumerate(blocks):
        if name.startswith(block + "."):
            layer, module = index, name[len(block) + 1 :].removesuffix(".weight")
            break
    else:
        match = re.search(r"\.(\d+)\.(.+)\.weight$", name)
        if match and not blocks:
            layer, module = int(match.group(1)), match.group(2)
    expert = re.search(r"(^|\.)experts\.(\d+)\.", module + ".")
    if expert:
        module = module[: expert.start(2)] + module[expert.end(2) + 1 :]
        return layer, module, int(expert.group(2))
    return layer, module, None


def linear_matrices(names: list[str], shapes: dict[str, tuple[int, ...]], config: dict[str, Any] | None,
                    include: list[str] | None = None, exclude: list[str] | None = None) -> list[MatrixInfo]:
    """The matrices among ``names`` to compare, in checkpoint order (``select_matrices`` without the skipped)."""
    return select_matrices(names, shapes, config, include, exclude)[0]


def select_matrices(names: list[str], shapes: dict[str, tuple[int, ...]], config: dict[str, Any] | None,
                    include: list[str] | None = None,
                    exclude: list[str] | None = None) -> tuple[list[MatrixInfo], list[Skipped]]:
    """Every two-dimensional tensor on disk, compared or skipped with its reason, in checkpoint order.

    Compared by default: every 2-D weight that is not an embedding, a norm or an output head tied
    to the input embedding; so linear layers, mixture-of-experts experts and routers, and untied
    heads are all compared, named as they are on disk. ``include`` globs (brace ranges allowed)
    replace that choice; ``exclude`` globs remove names from it. Which modules are embeddings,
    norms and tied heads comes from the architecture built on the meta device from ``config``;
    without one, from the names (``NOT_LINEAR``).
    """
    blocks: list[str] = []
    roles: dict[str, str] = {}
    if config and config.get("model_type"):
        for model in _meta_models(config)[:1]:
            roles = _roles(model, config)
            try:
                from .anatomy import find_anatomy

                blocks = find_anatomy(model).block_names
            except Exception:  # an unmappable architecture still gets layer numbers from names
                blocks = []
    else:
        for n in names:
            if any(fnmatch.fnmatch(n.lower(), p) for p in NOT_LINEAR):
                roles[n] = "norm" if "norm" in n.lower() or "ln_" in n.lower() else "embedding"
        if "lm_head.weight" in names and (config or {}).get("tie_word_embeddings", False):
            roles["lm_head.weight"] = "tied to the input embedding"
    included = [p for spec in include for p in expand_braces(spec)] if include else None
    excluded = [p for spec in exclude for p in expand_braces(spec)] if exclude else []
    chosen: list[MatrixInfo] = []
    skipped: list[Skipped] = []
    for n in names:
        if len(shapes[n]) != 2:
            continue
        if included is not None:
            reason = None if any(fnmatch.fnmatchcase(n, p) for p in included) else "not included"
        else:
            reason = roles.get(n) or (None if n.endswith(".weight") or n.split(".")[-1] not in ("bias",) else "bias")
        if reason is None and any(fnmatch.fnmatchcase(n, p) for p in excluded):
            reason = "excluded by a glob"
        if reason is None:
            chosen.append(MatrixInfo(n, *_locate(n, blocks)))
        else:
            skipped.append(Skipped(n, tuple(shapes[n]), reason))
    return chosen, skipped
