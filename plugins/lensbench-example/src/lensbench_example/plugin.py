"""Hook implementations of the example plugin.

- ``max_abs``: a per-token statistic for ``activation_norms``: the largest absolute coordinate
  of the token's hidden state, max_i |h_i| (the L-infinity norm). Outlier features show up here
  long before they move the L2 norm.
- ``capitals``: a tiny JSONL dataset of sentences about capital cities.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from lensbench.data.sources import DatasetEntry
from lensbench.hookspecs import hookimpl
from lensbench.metrics import TokenStatistic


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
