"""Parameter counts of a model, total and active per token (the seed's ``calculate_active_parameters``):
``lensbench fit`` writes them to ``<run>/parameters.csv``.

A token uses every parameter of a dense model. A memory layer (a module with ``memory_parameters()``)
reads only some rows of its value table: its ``active_parameters()`` (name -> count) says how many
of each parameter one token uses; a memory layer without that method counts in full. The token
embedding counts in full too, as is usual for active-parameter counts (its own row, ``embeddings``,
lets a reader leave it out).
"""

from __future__ import annotations

import torch

#: The part of a parameter outside a memory layer: the first of these fragments its name holds
#: (``norm`` first: ``post_attention_layernorm`` is a norm).
PARTS = (("norm", "norms"), ("embed", "embeddings"), ("lm_head", "output"), ("attn", "attention"),
         ("attention", "attention"), ("mlp", "mlp"))


def part_of(name: str) -> str:
    return next((part for fragment, part in PARTS if fragment in name), "other")


def parameter_table(model: torch.nn.Module):
    """One row per part (``embeddings``, ``attention``, ``mlp``, ``memory.<name>``, ``norms``,
    ``output``, ``other``), then ``all``: ``part``, ``parameters`` (total), ``active`` (used by one
    token), ``trained`` (not frozen). A tied weight counts once."""
    import pandas as pd

    active: dict[str, int] = {}
    memory_part: dict[str, str] = {}
    for prefix, module in model.named_modules():
        if not callable(getattr(module, "memory_parameters", None)):
            continue
        get = getattr(module, "active_parameters", None)
        counts = get() if callable(get) else {}
        for name, p in module.named_parameters():
            full = f"{prefix}.{name}" if prefix else name
            active[full] = int(counts.get(name, p.numel()))
            memory_part[full] = f"memory.{name.split('.')[0]}"
    rows: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        part = memory_part.get(name) or part_of(name)
        row = rows.setdefault(part, {"parameters": 0, "active": 0, "trained": 0})
        row["parameters"] += p.numel()
        row["active"] += active.get(name, p.numel())
        row["trained"] += p.numel() if p.requires_grad else 0
    table = pd.DataFrame([{"part": part, **row} for part, row in rows.items()])
    total = {"part": "all", **{k: int(table[k].sum()) for k in ("parameters", "active", "trained")}}
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True)
