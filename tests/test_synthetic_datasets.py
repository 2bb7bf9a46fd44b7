"""Synthetic datasets: determinism, counts, formats, option errors, files and registration."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from lensbench.errors import LensbenchError
from lensbench.plugins import build_registries, get_plugin_manager
from lensbench.synthetic.datasets import (
    DigitLookup,
    HashHop,
    SyntheticQA,
    TwoHop,
    materialize,
    read_splits,
    write_splits,
)
from lensbench.synthetic.masks import MASKS

SIX = re.compile(r"^[1-9]\d{5}$")


def gen(ds, seed=0, **options):
    return ds.generate(seed, ds.options(options, "data.init_args.options"))


def answer_follows_prompt(row: dict) -> bool:
    rest = row["text"][len(row["prompt"]):]
    return row["text"].startswith(row["prompt"]) and (rest.startswith(row["answer"])
                                                      or rest.startswith(" " + row["answer"]))


@pytest.fixture(scope="module")
def registry():
    return build_registries(get_plugin_manager(load_installed=False)).synthetic_datasets


def test_registered(registry):
    assert registry.names() == ["digit_lookup", "hashhop", "synthetic_qa", "two_hop"]
    for entry in registry:
        assert entry.obj.mask in MASKS
        assert entry.obj.description


@pytest.mark.parametrize("ds", [SyntheticQA(), DigitLookup(), TwoHop(), HashHop()], ids=lambda d: d.name)
def test_deterministic_and_seeded(ds):
    small = {"synthetic_qa": {"num_pairs": 80}, "digit_lookup": {"num_pairs": 50, "test_size": 10},
             "two_hop": {"num_chains": 20}, "hashhop": {"num_chains": 10}}[ds.name]
    a, b, c = gen(ds, 3, **small), gen(ds, 3, **small), gen(ds, 4, **small)
    assert a == b
    assert a != c
    assert set(a) == set(ds.splits)
    for rows in a.values():
        for row in rows:
            assert answer_follows_prompt(row), row
            assert row["answer"] and not row["answer"].endswith(" ")


def test_qa_buckets_and_heldout():
    ds = SyntheticQA()
    splits = gen(ds, 1, num_pairs=103, buckets=[1, 3, 5], heldout_fraction=0.2, val_per_bucket=4)
    test = splits["test"]
    assert len(test) == 103 and [r["pair_id"] for r in test] == list(range(103))
    sizes = Counter(r["bucket"] for r in test)
    assert sizes == {1: 35, 3: 34, 5: 34}  # remainder 1 to the first bucket
    held = {r["pair_id"] for r in test if r["split"] == "heldout"}
    assert Counter(r["bucket"] for r in test if r["split"] == "heldout") == {1: 7, 3: 6, 5: 6}
    train_counts = Counter(r["pair_id"] for r in splits["train"])
    bucket_of = {r["pair_id"]: r["bucket"] for r in test}
    assert not held & set(train_counts)
    assert set(train_counts) == set(range(103)) - held
    assert all(n == bucket_of[pid] for pid, n in train_counts.items())
    # shuffled: not grouped by pair
    ids = [r["pair_id"] for r in splits["train"]]
    assert ids != sorted(ids)
    ents = [e for r in test for e in (r["subject"], r["object"])]
    assert all(SIX.match(e) for e in ents) and len(set(ents)) == len(ents)
    val = splits["val"]
    for bucket in (1, 3, 5):
        rows = [r for r in val if r["bucket"] == bucket]
        assert Counter(r["split"] for r in rows) == {"seen": 4, "heldout": 4}
        assert all((r["pair_id"] in held) == (r["split"] == "heldout") for r in rows)


def test_qa_formats():
    pair = gen(SyntheticQA(), 0, num_pairs=8)["test"][0]
    x, y = pair["subject"], pair["object"]
    assert (pair["text"], pair["prompt"], pair["answer"]) == (f"{x}:{y} ", f"{x}:", y)
    q = gen(SyntheticQA(), 0, num_pairs=8, format="question")["test"][0]
    assert (q["text"], q["prompt"], q["answer"]) == (f"What is paired with {x}? {y}", f"What is paired with {x}?", y)


def test_default_qa_counts():
    splits = gen(SyntheticQA(), 0)
    assert len(splits["test"]) == 10000
    assert Counter(r["bucket"] for r in splits["test"]) == {b: 1250 for b in (1, 2, 4, 8, 16, 32, 64, 128)}
    assert sum(r["split"] == "heldout" for r in splits["test"]) == 8 * 125
    assert len(splits["train"]) == 1125 * sum((1, 2, 4, 8, 16, 32, 64, 128))
    assert len(splits["val"]) == 8 * 40


def test_digit_lookup():
    splits = gen(DigitLookup(), 5, num_pairs=300, test_size=40)
    train, known, novel = splits["train"], splits["test_known"], splits["test_novel"]
    assert (len(train), len(known), len(novel)) == (300, 40, 40)
    keys = [r["prompt"][:-1] for r in train]
    assert len(set(keys)) == 300 and all(SIX.match(k) and SIX.match(r["answer"]) for k, r in zip(keys, train))
    assert all(r["text"] == f"{r['prompt']}{r['answer']} " for r in train + novel)
    trained = {r["text"] for r in train}
    assert all(r["text"] in trained for r in known)
    assert not {r["prompt"] for r in novel} & {r["prompt"] for r in train}


def test_digit_lookup_200k():
    splits = gen(DigitLookup(), 0, num_pairs=200000)
    assert len(splits["train"]) == 200000 and len(splits["test_known"]) == 1000 and len(splits["test_novel"]) == 1000
    assert len({r["prompt"] for r in splits["train"]} | {r["prompt"] for r in splits["test_novel"]}) == 201000


def test_two_hop_partition():
    splits = gen(TwoHop(), 2, num_chains=50, known_fraction=0.3)
    train, known, novel = splits["train"], splits["test_known"], splits["test_novel"]
    assert (len(known), len(novel)) == (15, 35)
    assert {r["chain_id"] for r in known} | {r["chain_id"] for r in novel} == set(range(50))
    assert not {r["chain_id"] for r in known} & {r["chain_id"] for r in novel}
    direct = {r["text"] for r in train if r["hops"] == 2}
    assert direct == {r["text"] for r in known}
    assert not direct & {r["text"] for r in novel}
    one_hop = {r["prompt"][:-1]: r["answer"] for r in train if r["hops"] == 1}
    assert len(one_hop) == 100
    for row in known + novel:
        a = row["prompt"][:-2]
        assert row["prompt"] == f"{a}::" and row["text"] == f"{a}::{row['answer']} "
        assert one_hop[one_hop[a]] == row["answer"]  # A -> B -> C
    ents = [e for r in train if r["hops"] == 1 for e in (r["prompt"][:-1], r["answer"])]
    assert all(SIX.match(e) for e in ents) and len(set(ents)) == 150


def test_hashhop_chains():
    splits = gen(HashHop(), 7, num_chains=12, max_hops=3, hash_length=4)
    train, test = splits["train"], splits["test"]
    assert len(train) == 36 and len(test) == 12 * 3 * 2
    link = {}
    for r in train:
        m = re.fullmatch(r"([A-Za-z]{4}) = '([A-Za-z]{4})'", r["text"])
        assert m and r["prompt"] == f"{m[1]} = '" and r["answer"] == m[2]
        link[m[1]] = m[2]
    hashes = set(link) | set(link.values())
    assert len(hashes) == 12 * 4
    assert any(h != h.lower() for h in hashes) and any(h != h.upper() for h in hashes)
    for r in test:
        k = r["hops"]
        m = re.match(r"hops=(\d) cot=([01]) ([A-Za-z]{4}) = '", r["text"])
        assert m and int(m[1]) == k and m[2] == str(int(r["cot"])) and r["prompt"] == m[0]
        node, path = m[3], []
        for _ in range(k):
            node = link[node]
            path.append(node)
        assert r["target"] == node
        expected = " = ".join(f"'{h}'" for h in path) if r["cot"] else f"'{node}'"
        assert r["text"] == f"{m[0][:-1]}{expected}"
    assert Counter((r["hops"], r["cot"]) for r in test) == {(k, c): 12 for k in (1, 2, 3) for c in (True, False)}


def test_hashhop_train_multihop():
    plain = gen(HashHop(), 0, num_chains=5, max_hops=2)
    multi = gen(HashHop(), 0, num_chains=5, max_hops=2, train_multihop=True)
    assert len(multi["train"]) == 5 * 2 * 2 + 5 * 2 * 2  # links of both sets + multi-hop rows of the second
    multi_rows = [r for r in multi["train"] if r["text"].startswith("hops=")]
    assert len(multi_rows) == 20 and {r["chain_id"] for r in multi_rows} == set(range(5, 10))
    assert not {r["text"] for r in multi_rows} & {r["text"] for r in multi["test"]}
    assert not any(r["text"].startswith("hops=") for r in plain["train"])


@pytest.mark.parametrize("ds,raw,field,words", [
    (SyntheticQA(), {"num_pairz": 5}, "data.init_args.options.num_pairz", "'num_pairs'"),
    (SyntheticQA(), {"num_pairs": 0}, "data.init_args.options.num_pairs", "at least 1"),
    (SyntheticQA(), {"buckets": [1, 0]}, "data.init_args.options.buckets", "positive"),
    (SyntheticQA(), {"buckets": [1, "2"]}, "data.init_args.options.buckets", "must be int"),
    (SyntheticQA(), {"heldout_fraction": 1.0}, "data.init_args.options.heldout_fraction", "[0, 1)"),
    (SyntheticQA(), {"format": "questoin"}, "data.init_args.options.format", "'question'"),
    (SyntheticQA(), {"num_pairs": 3}, "data.init_args.options.num_pairs", "number of buckets"),
    (SyntheticQA(), {"num_pairs": 500000}, "data.init_args.options.num_pairs", "900000"),
    (DigitLookup(), {"num_pairs": True}, "data.init_args.options.num_pairs", "must be int"),
    (DigitLookup(), {"test_sise": 3}, "data.init_args.options.test_sise", "'test_size'"),
    (TwoHop(), {"known_fraction": 1.5}, "data.init_args.options.known_fraction", "[0, 1]"),
    (HashHop(), {"hash_length": 1, "num_chains": 20}, "data.init_args.options.hash_length", "raise hash_length"),
    (HashHop(), {"max_hops": 0}, "data.init_args.options.max_hops", "at least 1"),
])
def test_option_errors(ds, raw, field, words):
    with pytest.raises(LensbenchError) as err:
        ds.options(raw, "data.init_args.options")
    assert err.value.field == field
    assert words in err.value.message


def test_options_defaults_and_coercion():
    opts = SyntheticQA().options({"heldout_fraction": 0, "buckets": (2, 4)}, "o")
    assert opts.heldout_fraction == 0.0 and isinstance(opts.heldout_fraction, float)
    assert opts.buckets == [2, 4] and opts.num_pairs == 10000 and opts.format == "pair"
    assert SyntheticQA().options(opts, "o") == opts


def test_hashhop_dense_alphabet():
    splits = gen(HashHop(), 0, num_chains=10, max_hops=4, hash_length=1)  # 50 of the 52 letters
    letters = {r["prompt"][0] for r in splits["train"]} | {r["answer"] for r in splits["train"]}
    assert len(letters) == 50


def test_write_read_round_trip(tmp_path):
    splits = gen(TwoHop(), 0, num_chains=10)
    folder = write_splits(splits, tmp_path / "d", {"name": "two_hop", "seed": 0})
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.json", "test_known.jsonl", "test_novel.jsonl",
                                                        "train.jsonl"]
    info = json.loads((folder / "dataset.json").read_text())
    assert info["counts"] == {k: len(v) for k, v in splits.items()} and info["name"] == "two_hop"
    assert read_splits(folder, "f") == splits


def test_read_errors(tmp_path):
    with pytest.raises(LensbenchError, match="not a folder") as err:
        read_splits(tmp_path / "missing", "data.init_args.folder")
    assert err.value.field == "data.init_args.folder"
    folder = write_splits({"train": [{"text": "a"}, {"text": "b"}], "test": [{"text": "c"}]}, tmp_path / "d")
    (folder / "train.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(LensbenchError, match=r"train\.jsonl:2 is not valid JSON"):
        read_splits(folder)
    (folder / "train.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(LensbenchError, match="holds 1 rows but the manifest says 2"):
        read_splits(folder)
    (folder / "test.jsonl").unlink()
    (folder / "train.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(LensbenchError, match=r"test\.jsonl is missing"):
        read_splits(folder)


def test_materialize_reuse_and_mismatch(tmp_path, registry):
    folder = tmp_path / "qa"
    first = materialize("synthetic_qa", 1, {"num_pairs": 16, "buckets": [1, 2]}, folder, registry)
    assert json.loads((folder / "dataset.json").read_text())["options"]["num_pairs"] == 16
    stamp = (folder / "train.jsonl").stat().st_mtime_ns
    again = materialize("synthetic_qa", 1, {"buckets": [1, 2], "num_pairs": 16}, folder, registry)
    assert again == first and (folder / "train.jsonl").stat().st_mtime_ns == stamp
    with pytest.raises(LensbenchError, match="delete the folder or choose another") as err:
        materialize("synthetic_qa", 2, {"num_pairs": 16, "buckets": [1, 2]}, folder, registry)
    assert err.value.field == "data.init_args.folder" and "seed (1 there, 2 asked)" in err.value.message
    with pytest.raises(LensbenchError, match="options"):
        materialize("synthetic_qa", 1, {"num_pairs": 17, "buckets": [1, 2]}, folder, registry)
    with pytest.raises(LensbenchError, match="name"):
        materialize("digit_lookup", 1, {}, folder, registry)
    with pytest.raises(LensbenchError, match="did you mean 'synthetic_qa'") as err:
        materialize("synthetic_q", 1, {}, tmp_path / "other", registry)
    assert err.value.field == "data.init_args.name"
    with pytest.raises(LensbenchError) as err:
        materialize("synthetic_qa", 1, {"num_pairz": 1}, tmp_path / "other", registry)
    assert err.value.field == "data.init_args.options.num_pairz"
    assert not (tmp_path / "other").exists()
