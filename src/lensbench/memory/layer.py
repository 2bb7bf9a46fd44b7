"""A product-key memory layer (Lample et al. 2019; Berges et al. 2024, "Memory Layers at Scale").

For each of ``heads`` memory heads the input ``x`` (``[..., hidden]``) is projected to a query of
``k_dim`` values, split in two halves. Each half is scored against its own table of ``n_keys``
half-keys (``keys[head, half]``, ``[n_keys, k_dim / 2]``); each half keeps its ``topk`` best
rows, the ``topk x topk`` sums of the kept scores are the scores of the product slots
``i1 * n_keys + i2`` (``n_keys²`` slots in all), and the ``topk`` best of those sums are the
slots read. Their scores, softmax-normalised per head, weight the slots' value vectors (one
table of ``n_keys²`` rows shared by the heads, read by ``F.embedding_bag``); the heads' reads
are summed. The product search is exact: it finds the same slots as scoring all ``n_keys²``
sums and taking the top ``topk`` (``reference_forward``).

The gated variant ("memory+") multiplies the read by ``silu(gate(x))`` and projects it back with
``out``, as the paper's memory+ does; ``v_dim`` different from ``hidden`` also adds ``out``.

Interventions (used by the memory-ablation analysis) are buffers that are not saved with the
weights: ``blocked_rows`` (``[heads, 2, n_keys]`` booleans: a half-key row whose score is -inf,
so it is never chosen; zeroing a key vector would not do this: its score becomes 0 and it can
still win) and ``blocked_slots`` (slot ids never read; the search stays exact by keeping
``topk + len(blocked_slots)`` rows per half). With ``record = True`` a forward keeps
its chosen slots and weights (``last_slots``, ``last_weights``, ``[..., heads, topk]``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ProductKeyMemory(nn.Module):
    """Product-key memory: ``query`` projection, ``keys`` (two half-key tables per head),
    ``values`` (``[n_keys², v_dim]``, read as an embedding bag), optional ``gate``/``out``."""

    def __init__(self, hidden: int, n_keys: int = 128, heads: int = 4, topk: int = 32, k_dim: int = 128,
                 v_dim: int | None = None, gated: bool = False, query_norm: bool = False) -> None:
        super().__init__()
        check_memory_shape(hidden, n_keys, heads, topk, k_dim, v_dim)
        self.hidden, self.n_keys, self.heads, self.topk, self.k_dim = hidden, n_keys, heads, topk, k_dim
        self.v_dim = v_dim or hidden
        self.gated = gated
        self.query = nn.Linear(hidden, heads * k_dim, bias=False)
        self.query_norm = query_norm
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, k_dim // 2))
        self.values = nn.Parameter(torch.empty(n_keys * n_keys, self.v_dim))
        self.gate = nn.Linear(hidden, self.v_dim, bias=False) if gated else None
        self.out = nn.Linear(self.v_dim, hidden, bias=False) if gated or self.v_dim != hidden else None
        self.register_buffer("blocked_rows", torch.zeros(heads, 2, n_keys, dtype=torch.bool), persistent=False)
        self.register_buffer("blocked_slots", torch.zeros(0, dtype=torch.long), persistent=False)
        self.record = False
        self.last_slots: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None
        self.reset_parameters()

    @property
    def n_slots(self) -> int:
        return self.n_keys * self.n_keys

    def memory_parameters(self) -> dict[str, list[str]]:
        """Names (relative to this module) of the key and value parameters, for the anatomy's
        ``memory_keys``/``memory_values`` groups; any module with this method is a memory layer."""
        return {"keys": ["keys"], "values": ["values"]}

    def active_parameters(self) -> dict[str, int]:
        """Parameters (names relative to this module) one token uses: every one, except the value
        table, of which each head reads ``topk`` rows (``heads x topk x v_dim``; the key tables
        count in full: every half-key row is scored). A memory layer may define this method to
        have ``lensbench fit``'s ``parameters.csv`` count it; without it every parameter is active."""
        counts = {name: p.numel() for name, p in self.named_parameters()}
        counts["values"] = min(counts["values"], self.heads * self.topk * self.v_dim)
        return counts

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, init=nn.init) -> None:
        """Keys uniform in ``±1/sqrt(k_dim/2)``, values ``N(0, 1/v_dim)`` (as product-key memories
        are initialised), projections ``N(0, std)``. ``init`` is the module of ``uniform_``/``normal_``
        to use (transformers' skips tensors already loaded from a checkpoint)."""
        bound = 1 / math.sqrt(self.k_dim // 2)
        init.uniform_(self.keys, -bound, bound)
        init.normal_(self.values, mean=0.0, std=self.v_dim ** -0.5)
        for lin in (self.query, self.gate, self.out):
            if lin is not None:
                init.normal_(lin.weight, mean=0.0, std=std)
        self.clear_interventions()

    @torch.no_grad()
    def clear_interventions(self) -> None:
        """No blocked row or slot (the buffers are never saved, so a loaded model starts here)."""
        self.blocked_rows.zero_()
        self.blocked_slots = self.blocked_slots.new_zeros(0)

    def half_scores(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, heads, 2, n_keys]``: every half-key's score (blocked rows at -inf)."""
        q = self.query(x).view(x.shape[0], self.heads, 2, self.k_dim // 2)
        if self.query_norm:  # each half-query to unit RMS: scores depend on direction, not scale
            q = F.rms_norm(q, (self.k_dim // 2,))
        scores = torch.einsum("nhsd,hskd->nhsk", q, self.keys.to(q.dtype))
        if self.blocked_rows.any():
            scores = scores.masked_fill(self.blocked_rows, float("-inf"))
        return scores

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen slots and their softmax weights, each ``[N, heads, topk]``, for flat ``x`` ``[N, hidden]``."""
        k = self.topk
        # With B blocked slots, each half keeps k + B rows: a slot of the true top k among the
        # open slots is beaten by at most k - 1 open slots, and by at most B blocked ones.
        kk = min(self.n_keys, k + int(self.blocked_slots.numel()))
        s1, i1 = self.half_scores(x).topk(kk, dim=-1)  # [N, H, 2, kk]
        sums = s1[:, :, 0, :, None] + s1[:, :, 1, None, :]  # [N, H, kk, kk]
        if self.blocked_slots.numel():  # the candidates' slot ids are needed to mask the blocked ones
            slots = i1[:, :, 0, :, None] * self.n_keys + i1[:, :, 1, None, :]
            sums = sums.masked_fill(torch.isin(slots, self.blocked_slots), float("-inf"))
        best, pos = sums.flatten(2).topk(k, dim=-1)  # [N, H, k], pos = a * kk + b
        # slot ids of the chosen only: rows a of the first half and b of the second
        chosen = i1[:, :, 0].gather(-1, pos // kk) * self.n_keys + i1[:, :, 1].gather(-1, pos % kk)
        return chosen, torch.softmax(best.float(), dim=-1).to(x.dtype)

    def read(self, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The weighted sum of the slots' values over heads and top-k: ``[N, v_dim]``."""
        n = slots.shape[0]
        return F.embedding_bag(slots.reshape(n, -1), self.values, mode="sum",
                               per_sample_weights=weights.reshape(n, -1).to(self.values.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        slots, weights = self.select(flat)
        if self.record:
            self.last_slots = slots.detach().view(*shape[:-1], self.heads, self.topk)
            self.last_weights = weights.detach().view(*shape[:-1], self.heads, self.topk)
        out = self.read(slots, weights).to(x.dtype)
        if self.gate is not None:
            out = out * F.silu(self.gate(flat))
        if self.out is not None:
            out = self.out(out)
        return out.view(*shape[:-1], self.hidden)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same output by brute force: every one of the ``n_keys²`` slots scored, the top
        ``topk`` taken over all of them, values gathered densely (slow; for tests)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        s = self.half_scores(flat)  # [N, H, 2, n_keys]
        full = (s[:, :, 0, :, None] + s[:, :, 1, None, :]).flatten(2)  # [N, H, n_keys²], slot = i1*n + i2
        if self.blocked_slots.numel():
            full[..., self.blocked_slots] = float("-inf")
        best, slots = full.topk(self.topk, dim=-1)
        w = torch.softmax(best.float(), dim=-1).to(x.dtype)
        out = (self.values[slots] * w[..., None]).sum(dim=(1, 2))
        if self.gate is not None:
            out = out * F.silu(self.gate(flat))
        if self.out is not None:
            out = self.out(out)
        return out.view(*shape[:-1], self.hidden)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, n_keys={self.n_keys} ({self.n_slots} slots), heads={self.heads}, "
                f"topk={self.topk}, k_dim={self.k_dim}, v_dim={self.v_dim}, gated={self.gated}")


def check_memory_shape(hidden: int, n_keys: int, heads: int, topk: int, k_dim: int, v_dim: int | None) -> None:
    """ValueError (one line, the setting and its allowed range) for an impossible memory shape."""
    if n_keys < 1:
        raise ValueError(f"memory_n_keys={n_keys} is out of range; use at least 1 (n_keys² slots)")
    if not 1 <= topk <= n_keys:
        raise ValueError(f"memory_topk={topk} is out of range; use 1..memory_n_keys ({n_keys})")
    if heads < 1:
        raise ValueError(f"memory_heads={heads} is out of range; use at least 1")
    if k_dim < 2 or k_dim % 2:
        raise ValueError(f"memory_k_dim={k_dim} must be an even number >= 2 (two half-keys)")
    if v_dim is not None and v_dim < 1:
        raise ValueError(f"memory_v_dim={v_dim} is out of range; use at least 1, or null for the hidden size")
    if hidden < 1:
        raise ValueError(f"hidden size {hidden} is out of range")
