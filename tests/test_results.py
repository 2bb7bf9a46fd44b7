"""ResultStore: JSONL shards that survive a kill at any moment."""

from __future__ import annotations

import json
import math

import pytest

from lensbench.errors import LensbenchError
from lensbench.results import ResultStore
from lensbench.work import key_str


def _write(store: ResultStore, rank: int, records: dict[str, dict], attempt: str = "") -> None:
    store.open_shard(rank, attempt)
    try:
        for key, record in records.items():
            store.write(key, record)
    finally:
        store.close()


def _assert_valid_jsonl(path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.decode("utf-8").split("\n")[:-1]]


def test_round_trip(tmp_path):
    store = ResultStore(tmp_path)
    records = {
        key_str(["tiny", "alpha", 0]): {"value": 1.5, "stats": {"mean": [1.0, 2.0]}},
        key_str(["tiny", "alpha", 1]): {"value": float("nan"), "text": "café ☕ \n tab\t"},
        key_str(["tiny", "beta", 0]): {"value": -3, "nested": [[1, 2], {"a": None}]},
    }
    path = store.open_shard(3)
    assert path == tmp_path / "shards" / "rank00003.jsonl"
    for key, record in records.items():
        store.write(key, record)
    store.close()
    assert store.shards() == [path]
    assert store.keys() == set(records)
    got = {r["key"]: r for r in store.records()}
    assert set(got) == set(records)
    nan_key = key_str(["tiny", "alpha", 1])
    assert math.isnan(got[nan_key].pop("value")) and math.isnan(records[nan_key].pop("value"))
    for key, record in records.items():
        assert got[key] == {"key": key, **record}
    assert len(_assert_valid_jsonl(path)) == 3  # one line per record, even with newlines in text


def test_an_empty_store_has_nothing(tmp_path):
    store = ResultStore(tmp_path / "never-written")
    assert store.shards() == [] and store.keys() == set() and list(store.records()) == []


def test_reopening_appends(tmp_path):
    store = ResultStore(tmp_path)
    _write(store, 0, {"a": {"v": 1}})
    _write(store, 0, {"b": {"v": 2}})
    assert [r["key"] for r in store.records()] == ["a", "b"]
    assert len(_assert_valid_jsonl(store.shards()[0])) == 2


@pytest.mark.parametrize("torn", [b'{"key": "c", "v"', b'{"key": "c", "v": 3}', b"\xe2\x98"])
def test_a_torn_last_line_is_ignored_then_cut_off(tmp_path, torn):
    store = ResultStore(tmp_path)
    _write(store, 0, {"a": {"v": 1}, "b": {"v": 2}})
    path = store.shards()[0]
    intact = path.read_bytes()
    with open(path, "ab") as fh:  # a kill in the middle of a write
        fh.write(torn)
    # Readers ignore the torn tail (even one that happens to be complete JSON: it has no newline).
    assert store.keys() == {"a", "b"}
    assert [r["key"] for r in store.records()] == ["a", "b"]
    # The next writer cuts it off before appending; the file stays valid JSONL.
    assert store.open_shard(0) == path
    assert path.read_bytes() == intact
    store.write("c", {"v": 30})
    store.close()
    lines = _assert_valid_jsonl(path)
    assert [r["key"] for r in lines] == ["a", "b", "c"] and lines[-1]["v"] == 30


def test_a_shard_holding_only_a_torn_line(tmp_path):
    store = ResultStore(tmp_path)
    store.dir.mkdir(parents=True)
    path = store.dir / "rank00000.jsonl"
    path.write_bytes(b'{"key": "a", "v": 1')
    assert store.keys() == set()
    store.open_shard(0)
    store.write("a", {"v": 1})
    store.close()
    assert _assert_valid_jsonl(path) == [{"key": "a", "v": 1}]


def test_another_ranks_torn_shard_is_left_alone(tmp_path):
    store = ResultStore(tmp_path)
    _write(store, 1, {"x": {"v": 1}})
    other = store.dir / "rank00001.jsonl"
    with open(other, "ab") as fh:
        fh.write(b'{"key": "y"')
    before = other.read_bytes()
    _write(store, 0, {"a": {"v": 1}})
    assert other.read_bytes() == before
    assert store.keys() == {"a", "x"}


def test_a_corrupt_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    store = ResultStore(tmp_path)
    _write(store, 0, {"a": {"v": 1}})
    path = store.shards()[0]
    with open(path, "ab") as fh:
        fh.write(b'{"key": "b", "v": \n')  # a complete line that is not JSON
    _write(store, 0, {"c": {"v": 3}})
    for read in (lambda: list(store.records()), store.keys):
        with pytest.raises(LensbenchError) as err:
            read()
        assert f"{path}:2 is corrupt" in str(err.value)


def test_blank_lines_are_skipped_but_keep_line_numbers(tmp_path):
    store = ResultStore(tmp_path)
    store.dir.mkdir(parents=True)
    path = store.dir / "rank00000.jsonl"
    path.write_bytes(b'{"key": "a"}\n\n{"key": "b"}\nnot json\n')
    with pytest.raises(LensbenchError, match=rf"{path}:4 is corrupt"):
        store.keys()
    path.write_bytes(b'{"key": "a"}\n\n   \n{"key": "b"}\n')
    assert store.keys() == {"a", "b"}


def test_duplicate_keys_across_shards_yield_the_first_only(tmp_path):
    store = ResultStore(tmp_path)
    _write(store, 0, {"k1": {"v": "rank0"}, "k3": {"v": "rank0"}})
    _write(store, 1, {"k1": {"v": "rank1"}, "k2": {"v": "rank1"}})
    _write(store, 0, {"k2": {"v": "rank0-retry"}}, attempt="-b")  # rank00000-b sorts before rank00001
    records = list(store.records())
    assert [r["key"] for r in records] == ["k1", "k2", "k3"]
    assert [r["v"] for r in records] == ["rank0", "rank0-retry", "rank0"]
    assert store.keys() == {"k1", "k2", "k3"}


def test_duplicate_keys_in_one_shard_yield_the_first_only(tmp_path):
    store = ResultStore(tmp_path)
    _write(store, 0, {"k": {"v": 1}})
    _write(store, 0, {"k": {"v": 2}})
    assert [r["v"] for r in store.records()] == [1]


def test_records_are_ordered_by_key_whatever_the_write_order(tmp_path):
    keys = [key_str(["m", d, i]) for d in ("beta", "alpha") for i in (3, 0, 12, 1)]
    one = ResultStore(tmp_path / "one")
    _write(one, 0, {k: {"i": n} for n, k in enumerate(keys)})
    two = ResultStore(tmp_path / "two")
    _write(two, 0, {k: {"i": n} for n, k in enumerate(keys) if n % 2})
    _write(two, 1, {k: {"i": n} for n, k in enumerate(keys) if not n % 2})
    order = [r["key"] for r in one.records()]
    assert order == sorted(keys)
    assert [r["key"] for r in two.records()] == order
    assert list(one.records()) == list(two.records())
