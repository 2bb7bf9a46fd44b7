"""Work items with stable keys, and the state-aware plan that shards them over ranks.

A *unit* is what a DataModule yields (a batch of texts, a prompt, a matrix name); a *state* is
the model state an analysis needs (a checkpoint plus transforms). A work item is one (state,
unit) pair with the stable key ``(state.id, *unit.key)``. Keys make resume, de-duplication and
merging simple: stored keys are dropped before the rest is sharded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .errors import LensbenchError


def key_str(key: tuple | list) -> str:
    """The canonical text of a key, as stored in result shards."""
    return json.dumps(list(key), separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Unit:
    key: tuple
    payload: Any = field(default=None, compare=False)
    #: A hash of what the unit holds (its texts, a prompt and its picture), stored with each record:
    #: a rerun refuses stored records whose unit now holds something else. None: not checked.
    digest: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class WorkItem:
    key: tuple
    state: Any  # a lensbench.state.State
    payload: Any = field(default=None, compare=False)
    digest: str | None = field(default=None, compare=False)

    @property
    def key_str(self) -> str:
        return key_str(self.key)


def plan_items(states: Iterable, units: Iterable[Unit]) -> list[WorkItem]:
    """Every (state, unit) pair, grouped by state, in plan order; duplicate keys are an error."""
    units = list(units)
    items: list[WorkItem] = []
    seen: set[str] = set()
    for state in states:
        for unit in units:
            item = WorkItem((state.id, *unit.key), state, unit.payload, unit.digest)
            if item.key_str in seen:
                raise LensbenchError(f"work item key {item.key_str} occurs twice; names of models/datasets must be unique")
            seen.add(item.key_str)
            items.append(item)
    return items


def content_digest(*parts: Any) -> str:
    """A short hash of JSON-serialisable ``parts`` (a unit's content)."""
    import hashlib

    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def changed_items(items: list[WorkItem], stored: dict[str, str | None]) -> str | None:
    """None when every stored record of ``items`` was computed on the content its unit holds now;
    else a short description of the first changed unit and how many there are."""
    changed = [it for it in items if it.digest is not None and stored.get(it.key_str) not in (None, it.digest)]
    if not changed:
        return None
    more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
    return f"work item {changed[0].key_str}{more} now holds other content"


def shard_by_state(items: list[WorkItem], rank: int, world_size: int,
                   group: Callable[[WorkItem], Any] | None = None) -> list[WorkItem]:
    """Rank ``rank``'s share: contiguous, balanced slices of the items grouped by state.

    Items of one state stay together, so a rank changes model state only where its slice
    crosses a state boundary: at most (states in its slice - 1) times. Shares differ in size by
    at most one item. With ``group`` (an analysis's ``step_group``), consecutive items of one
    state and one group value are never split between ranks: slices are cut at the group
    boundary nearest to the balanced cut, so shares differ by at most one group's size.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    order: dict[str, int] = {}
    for item in items:
        order.setdefault(item.state.id, len(order))
    grouped = sorted(items, key=lambda it: order[it.state.id])  # stable: plan order within a state
    if group is None:
        base, extra = divmod(len(grouped), world_size)
        start = rank * base + min(rank, extra)
        return grouped[start : start + base + (1 if rank < extra else 0)]
    bounds = [0] + [i for i in range(1, len(grouped))
                    if (grouped[i].state.id, group(grouped[i])) != (grouped[i - 1].state.id, group(grouped[i - 1]))]
    bounds.append(len(grouped))

    def cut(r: int) -> int:
        target = r * len(grouped) / world_size
        return min(bounds, key=lambda b: (abs(b - target), b))

    return grouped[cut(rank) : cut(rank + 1)]
