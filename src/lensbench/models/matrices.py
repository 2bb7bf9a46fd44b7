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

NOT_LINEAR = ("*embed*", "*wte*", "*wpe*", "*norm*", "*ln_*", "*lm_head*", "*position*")


@dataclass(frozen=True)
class MatrixInfo:
    name: str
    layer: int  # block index, -1 outside the blocks (e.g. an untied lm_head)
    module: str  # path inside the block without ".weight" (self_attn.q_proj, mlp.down_proj)


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


def _linear_names(model: torch.nn.Module) -> list[str]:
    tied = None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if out is not None and inp is not None and getattr(model.config, "tie_word_embeddings", False):
        tied = out
    names = []
    for name, module in model.named_modules():
        if module is tied:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            names.append(f"{name}.weight")
    return names


def _locate(name: str, blocks: list[str]) -> tuple[int, str]:
    for index, block in enumerate(blocks):
        if name.startswith(block + "."):
            return index, name[len(block) + 1 :].removesuffix(".weight")
    match = re.search(r"\.(\d+)\.(.+)\.weight$", name)
    if match and not blocks:
        return int(match.group(1)), match.group(2)
    return -1, name.removesuffix(".weight")


def linear_matrices(names: list[str], shapes: dict[str, tuple[int, ...]], config: dict[str, Any] | None,
                    include: list[str] | None = None, exclude: list[str] | None = None) -> list[MatrixInfo]:
    """The matrices among ``names`` to compare, in checkpoint order.

    ``include`` globs (brace ranges allowed) replace the default choice (linear-layer weights);
    ``exclude`` globs remove names from whichever choice.
    """
    present = set(names)
    blocks: list[str] = []
    chosen: set[str] | None = None
    if config and config.get("model_type"):
        best: tuple[int, Any] = (0, None)
        for model in _meta_models(config):
            linear = [n for n in _linear_names(model) if n in present]
            if len(linear) > best[0]:
                best = (len(linear), (model, linear))
        if best[1] is not None:
            model, linear = best[1]
            chosen = set(linear)
            try:
                from .anatomy import find_anatomy

                blocks = find_anatomy(model).block_names
            except Exception:  # an unmappable architecture still gets layer numbers from names
                blocks = []
    if chosen is None:
        chosen = {n for n in names if n.endswith(".weight") and len(shapes[n]) == 2
                  and not any(fnmatch.fnmatch(n.lower(), p) for p in NOT_LINEAR)}
    if include:
        patterns = [p for spec in include for p in expand_braces(spec)]
        chosen = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    if exclude:
        patterns = [p for spec in exclude for p in expand_braces(spec)]
        chosen = {n for n in chosen if not any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    return [MatrixInfo(n, *_locate(n, blocks)) for n in names if n in chosen]
