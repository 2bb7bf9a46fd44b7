"""Per-token statistics of hidden states, registered through ``lensbench_register_metrics``."""

from __future__ import annotations

import torch

from .hookspecs import hookimpl


class TokenStatistic:
    """Maps the hidden states of N tokens, ``[N, D]``, to one float per token, ``[N]``.

    Subclasses set ``name`` (the registry key and the column suffix: ``mean_<name>``) and
    ``description``, and implement ``__call__``. Inputs arrive in float32, on the model's device:
    the non-padding tokens of one batch at one layer. The hook returns instances, and the
    registered instance serves every call, so keep it free of per-call state. The full contract
    is in docs/plugins.md, "Contracts".
    """

    name: str = ""
    description: str = ""

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N]
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class L2Norm(TokenStatistic):
    name = "norm"
    description = "L2 norm of the token's hidden state, sqrt(sum_i h_i^2)"

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(hidden, ord=2, dim=-1)


@hookimpl
def lensbench_register_metrics() -> list[TokenStatistic]:
    return [L2Norm()]
