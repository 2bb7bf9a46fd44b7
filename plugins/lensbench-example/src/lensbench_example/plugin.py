"""Hook implementations of the example plugin.

- ``max_abs``: a per-token statistic for ``activation_norms``: the largest absolute coordinate
  of the token's hidden state, max_i |h_i| (the L-infinity norm). Outlier features show up here
  long before they move the L2 norm.
- ``capitals``: a tiny JSONL dataset of sentences about capital cities.
- ``low_rank``: a perturbation that truncates each matrix of a parameter group to its leading
  singular directions: level = the fraction of the rank removed (0 = unchanged, 0.9 = keep the top
  10%); 1-D tensors (biases, norms) are left as they are. Deterministic: it draws no randomness.
"""

from __future__ import annotations

import math

from importlib import resources
from pathlib import Path

import torch

from lensbench.data.sources import DatasetEntry
from lensbench.hookspecs import hookimpl
from lensbench.errors import LensbenchError
from lensbench.metrics import TokenStatistic
from lensbench.perturbations import Perturbation


class MaxAbs(TokenStatistic):
    name = "max_abs"
    description = "largest absolute coordinate of the token's hidden state, max_i |h_i|"

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N]
        return hidden.abs().amax(dim=-1)


@hookimpl
def lensbench_register_metrics() -> list[TokenStatistic]:
    return [MaxAbs()]


@hookimpl
def lensbench_register_datasets() -> list[DatasetEntry]:
    path = Path(str(resources.files("lensbench_example") / "capitals.jsonl"))
    return [DatasetEntry("capitals", path, "Sentences about capital cities (JSONL, field `sentence`)", "sentence")]


class LowRank(Perturbation):
    name = "low_rank"
    description = "keep the leading singular directions of each matrix; level = fraction of the rank removed"

    def __init__(self, level: float = 0.0, group: str = "attn_only") -> None:
        super().__init__(level=level, group=group)
        if self.level >= 1:
            raise LensbenchError(f"low_rank level is the fraction of the rank removed, in [0, 1), got {self.level}",
                                 "level")

    def perturb(self, w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if w.ndim != 2:
            return w.clone()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        keep = max(1, math.ceil((1 - self.level) * s.numel()))
        return (u[:, :keep] * s[:keep]) @ vh[:keep]


@hookimpl
def lensbench_register_perturbations() -> list[type]:
    return [LowRank]
