"""Work items: stable keys, the state-grouped plan and its sharding over ranks."""

from __future__ import annotations

import itertools
import random

import pytest

from lensbench.errors import LensbenchError
from lensbench.state import State, TransformSpec
from lensbench.work import Unit, WorkItem, key_str, plan_items, shard_by_state

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is optional
    given = None


def _states():
    noisy = TransformSpec("noise", (("sigma", 0.1),), seed=3)
    return [State("tiny"), State("tiny", (noisy,)), State("other")]


def test_keys_are_state_id_then_unit_key_grouped_by_state():
    states = _states()
    units = [Unit(("alpha", 0), "p0"), Unit(("alpha", 1), "p1"), Unit(("beta", 0), "p2")]
    items = plan_items(states, units)
    assert len(items) == 9
    assert [it.key for it in items] == [(s.id, *u.key) for s in states for u in units]
    assert [it.state for it in items] == [s for s in states for _ in units]
    assert [it.payload for it in items] == ["p0", "p1", "p2"] * 3
    assert items[3].key[0].startswith("tiny|") and '"seed":3' in items[3].key[0]
    assert items[0].key_str == '["tiny","alpha",0]' == key_str(items[0].key)


def test_key_str_is_compact_and_keeps_unicode():
    assert key_str(("café", "x", 1)) == '["café","x",1]'
    assert key_str(["a"]) == key_str(("a",))


def test_units_are_consumed_once_even_from_a_generator():
    units = (Unit(("d", i)) for i in range(3))
    assert len(plan_items([State("a"), State("b")], units)) == 6


@pytest.mark.parametrize("states, units", [
    ([State("a")], [Unit(("d", 0)), Unit(("d", 0))]),
    ([State("a"), State("a")], [Unit(("d", 0))]),
    ([State("a", labels=(("x", 1),)), State("a", labels=(("x", 2),))], [Unit(("d", 0))]),
])
def test_duplicate_keys_are_an_error(states, units):
    with pytest.raises(LensbenchError, match=r'work item key \["a","d",0\] occurs twice'):
        plan_items(states, units)


def test_a_transform_makes_a_distinct_state():
    a = State("m", (TransformSpec("noise", seed=1),))
    b = State("m", (TransformSpec("noise", seed=2),))
    assert a.id != b.id != "m"
    assert len(plan_items([State("m"), a, b], [Unit(("d", 0))])) == 3


def test_rank_outside_world_is_refused():
    items = plan_items([State("a")], [Unit(("d", i)) for i in range(3)])
    for rank, world in ((-1, 2), (2, 2), (0, 0)):
        with pytest.raises(ValueError, match="outside world"):
            shard_by_state(items, rank, world)


def _check_sharding(items: list[WorkItem], world: int) -> None:
    shards = [shard_by_state(items, rank, world) for rank in range(world)]
    flat = [it for shard in shards for it in shard]
    # An exact partition: nothing lost, nothing twice.
    assert sorted(it.key_str for it in flat) == sorted(it.key_str for it in items)
    assert len({it.key_str for it in flat}) == len(flat) == len(items)
    # Balanced.
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    # Few state changes per rank.
    for shard in shards:
        changes = sum(1 for a, b in zip(shard, shard[1:]) if a.state.id != b.state.id)
        assert changes <= max(len({it.state.id for it in shard}) - 1, 0)
    # Concatenated in rank order: states in order of first appearance, each one contiguous,
    # and plan order kept within a state.
    first_seen = list(dict.fromkeys(it.state.id for it in items))
    runs = [sid for sid, _ in itertools.groupby(it.state.id for it in flat)]
    assert runs == first_seen
    for sid in first_seen:
        assert [it.key_str for it in flat if it.state.id == sid] == \
            [it.key_str for it in items if it.state.id == sid]


def _interleaved_items(state_of: list[int]) -> list[WorkItem]:
    states = [State(f"s{i}") for i in range(max(state_of, default=0) + 1)]
    return [WorkItem((states[s].id, "d", n), states[s], n) for n, s in enumerate(state_of)]


@pytest.mark.parametrize("n_states", [1, 2, 3, 7])
def test_sharding_partitions_planned_items_for_many_sizes(n_states):
    for n_units in range(0, 13):
        items = plan_items([State(f"s{i}") for i in range(n_states)], [Unit(("d", u)) for u in range(n_units)])
        for world in range(1, 11):
            _check_sharding(items, world)


def test_sharding_regroups_interleaved_items():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(0, 40)
        items = _interleaved_items([rng.randrange(rng.randint(1, 6)) for _ in range(n)])
        for world in (1, 2, 3, 5, 8, 50):
            _check_sharding(items, world)


def test_example_shares():
    items = plan_items([State("a"), State("b")], [Unit(("d", i)) for i in range(5)])  # 10 items
    shares = [[it.key_str for it in shard_by_state(items, r, 3)] for r in range(3)]
    assert [len(s) for s in shares] == [4, 3, 3]
    assert shares[1] == ['["a","d",4]', '["b","d",0]', '["b","d",1]']  # one state change
    assert shard_by_state(items[:2], 3, 4) == []  # more ranks than items: some idle


if given is not None:
    @settings(max_examples=200, deadline=None)
    @given(state_of=st.lists(st.integers(0, 5), max_size=60), world=st.integers(1, 16))
    def test_sharding_properties_hypothesis(state_of, world):
        _check_sharding(_interleaved_items(state_of), world)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("drop", [0, 5])
def test_a_group_of_items_is_never_split_between_ranks_or_steps(world, drop):
    from lensbench.data.modules import group_steps

    # 3 states x 9 batches x 4 loop counts, as loop_identity plans them; some items already stored.
    units = [Unit(("d", b, k)) for b in range(9) for k in range(4)]
    items = plan_items([State("a"), State("b"), State("c")], units)
    rng = random.Random(world * 10 + drop)
    items = [it for it in items if it not in set(rng.sample(items, drop))]

    def group(item):
        return item.key[:-1]

    shards = [shard_by_state(items, rank, world, group) for rank in range(world)]
    flat = [it for shard in shards for it in shard]
    assert sorted(it.key_str for it in flat) == sorted(it.key_str for it in items)  # an exact partition
    owner = {}
    for rank, shard in enumerate(shards):
        for item in shard:
            assert owner.setdefault(group(item), rank) == rank, group(item)  # one rank per group
        steps = group_steps(shard, 4, group)
        assert all(len({group(it) for it in step}) == 1 for step in steps)  # one group per step
        assert len(steps) == len({group(it) for it in shard})  # and one step per group
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 2 * 4  # balanced up to a group's size either side
    # Without a group the sharding is the plain balanced one.
    assert [shard_by_state(items, r, world) for r in range(world)] == \
        [shard_by_state(items, r, world, None) for r in range(world)]
