"""The ``SyntheticDataset`` contract: cached rows keyed by the generator's version and class, the
``answer_spans`` hook used by training and memory_ablation alike, and the built-ins unchanged."""

from __future__ import annotations

import hashlib
import json
import types
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import yaml

from lensbench import testing
from lensbench.errors import LensbenchError
from lensbench.hookspecs import hookimpl
from lensbench.synthetic.collate import PackedCollator, PaddedCollator
from lensbench.synthetic.datasets import (
    DigitLookup,
    HashHop,
    SyntheticDataset,
    SyntheticQA,
    TwoHop,
    default_folder,
    load_dataset,
    materialize,
    write_splits,
)
from lensbench.synthetic.masks import IGNORE, DatasetMask, token_labels

CHAR = testing.char_tokenizer()


class Spelled(SyntheticDataset):
    """Rows ``"ask {a} reply {b} done"``: no mask type finds ``b``; ``answer_spans`` does."""

    name = "spelled"
    description = "ask/reply rows whose answer only answer_spans finds"
    mask = "qa"  # trains nothing of these rows: no '?' and no ':'
    splits = ("train", "test")
    version = "1"
    generated = 0
    asked: ClassVar[list] = []

    @dataclass
    class Options:
        n: int = 4

    def generate(self, seed, options):
        type(self).generated += 1
        rows = [{"text": f"ask {10 + seed + i} reply {50 + i} done", "prompt": f"ask {10 + seed + i} reply ",
                 "answer": str(50 + i), "pair_id": i} for i in range(options.n)]
        return {"train": rows, "test": [dict(r) for r in rows]}

    def answer_spans(self, row, mask):
        type(self).asked.append((row["text"], mask))
        start = len(row["prompt"])
        return [(start, start + len(row["answer"]))]


class OtherSpelled(Spelled):
    """Another plugin's generator of the same name."""


def plugin(*datasets) -> types.ModuleType:
    module = types.ModuleType("spelled_plugin")

    @hookimpl
    def lensbench_register_synthetic_datasets():
        return list(datasets)

    module.lensbench_register_synthetic_datasets = lensbench_register_synthetic_datasets
    return module


@pytest.fixture
def spelled(tmp_path, monkeypatch):
    """The ``spelled`` plugin active, the working folder ``tmp_path``, the counters at zero."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Spelled, "generated", 0)
    monkeypatch.setattr(Spelled, "asked", [])
    with testing.use_plugins(plugin(Spelled())) as registries:
        yield registries


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# -- the cache key ---------------------------------------------------------------------------------


def test_same_version_is_reused_without_generating(spelled, tmp_path):
    first, _ = load_dataset("spelled", {"n": 3}, 0, None, None, "data", registry=spelled.synthetic_datasets)
    again, _ = load_dataset("spelled", {"n": 3}, 0, None, None, "data", registry=spelled.synthetic_datasets)
    assert Spelled.generated == 1 and again == first
    folder = default_folder("spelled", 0, {"n": 3}, spelled.synthetic_datasets.get("spelled"))
    info = json.loads((folder / "dataset.json").read_text())
    assert (info["version"], info["generator"]) == ("1", f"{Spelled.__module__}:Spelled")
    materialize("spelled", 0, {"n": 3}, tmp_path / "mine", spelled.synthetic_datasets)
    stamp = snapshot(tmp_path / "mine")
    assert materialize("spelled", 0, {"n": 3}, tmp_path / "mine", spelled.synthetic_datasets) == first
    assert Spelled.generated == 2 and snapshot(tmp_path / "mine") == stamp


def test_a_bumped_version_regenerates_into_a_new_default_folder(spelled, monkeypatch):
    load_dataset("spelled", {"n": 3}, 0, None, None, "data", registry=spelled.synthetic_datasets)
    old = default_folder("spelled", 0, {"n": 3}, spelled.synthetic_datasets.get("spelled"))
    before = snapshot(old)
    monkeypatch.setattr(Spelled, "version", "2")
    new = default_folder("spelled", 0, {"n": 3}, spelled.synthetic_datasets.get("spelled"))
    assert new != old and new.parent == old.parent and new.name.startswith("spelled-seed0-")
    load_dataset("spelled", {"n": 3}, 0, None, None, "data", registry=spelled.synthetic_datasets)
    assert Spelled.generated == 2
    assert json.loads((new / "dataset.json").read_text())["version"] == "2"
    assert snapshot(old) == before  # the old rows are left alone
    load_dataset("spelled", {"n": 3}, 0, None, None, "data", registry=spelled.synthetic_datasets)
    assert Spelled.generated == 2


def test_a_bumped_version_is_refused_in_a_named_folder(spelled, tmp_path, monkeypatch):
    load_dataset("spelled", {"n": 3}, 0, None, "mine", "data", registry=spelled.synthetic_datasets)
    before = snapshot(tmp_path / "mine")
    monkeypatch.setattr(Spelled, "version", "2")
    with pytest.raises(LensbenchError) as err:
        load_dataset("spelled", {"n": 3}, 0, None, "mine", "data", registry=spelled.synthetic_datasets)
    assert err.value.field == "data.data_dir"
    assert "holds rows of spelled version '1', but its generator is now version '2'" in err.value.message
    assert "delete the folder to regenerate them, or choose another folder" in err.value.message
    assert "\n" not in err.value.message
    assert Spelled.generated == 1 and snapshot(tmp_path / "mine") == before


def test_a_named_folder_of_rows_lensbench_did_not_write_is_never_overwritten(spelled, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.jsonl").write_text('{"prompt": "my own row", "answer": "x"}\n')
    before = snapshot(mine)
    with pytest.raises(LensbenchError) as err:
        load_dataset("spelled", {"n": 3}, 0, None, "mine", "data", registry=spelled.synthetic_datasets)
    assert err.value.field == "data.data_dir" and "\n" not in err.value.message
    assert "holds train.jsonl but no dataset.json" in err.value.message and "would be overwritten" in err.value.message
    assert Spelled.generated == 0 and snapshot(mine) == before


def test_a_write_cut_before_its_manifest_is_written_again(spelled, tmp_path, monkeypatch):
    """A kill after some splits and before the manifest leaves lensbench's marker: the next run
    writes the folder again, the same rows as an uninterrupted write."""
    import lensbench.synthetic.datasets as module

    real = module._write_atomic

    def cut(path, text):
        if path.name == "dataset.json":
            raise KeyboardInterrupt
        real(path, text)

    monkeypatch.setattr(module, "_write_atomic", cut)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("spelled", {"n": 3}, 0, None, "cut", "data", registry=spelled.synthetic_datasets)
    assert (tmp_path / "cut" / "dataset.json.writing").exists() and not (tmp_path / "cut" / "dataset.json").exists()
    monkeypatch.setattr(module, "_write_atomic", real)
    again, _ = load_dataset("spelled", {"n": 3}, 0, None, "cut", "data", registry=spelled.synthetic_datasets)
    whole, _ = load_dataset("spelled", {"n": 3}, 0, None, "whole", "data", registry=spelled.synthetic_datasets)
    assert again == whole and snapshot(tmp_path / "cut") == snapshot(tmp_path / "whole")
    assert not (tmp_path / "cut" / "dataset.json.writing").exists()


def test_a_manifest_from_before_versions_counts_as_version_1(tmp_path, monkeypatch):
    registry = testing.registries_for().synthetic_datasets
    folder = tmp_path / "old"
    rows = materialize("digit_lookup", 0, {"num_pairs": 5, "test_size": 2}, folder, registry)
    info = json.loads((folder / "dataset.json").read_text())
    assert (info["version"], info["generator"]) == ("1", "lensbench.synthetic.datasets:DigitLookup")
    del info["version"], info["generator"]
    (folder / "dataset.json").write_text(json.dumps(info))
    before = snapshot(folder)
    monkeypatch.setattr(DigitLookup, "generate", lambda *a: pytest.fail("cached rows regenerated"))
    assert materialize("digit_lookup", 0, {"num_pairs": 5, "test_size": 2}, folder, registry) == rows
    assert snapshot(folder) == before
    monkeypatch.setattr(DigitLookup, "version", "2")
    with pytest.raises(LensbenchError, match="version '1', but its generator is now version '2'"):
        materialize("digit_lookup", 0, {"num_pairs": 5, "test_size": 2}, folder, registry)


def test_two_generators_of_one_name_never_share_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with testing.use_plugins(plugin(Spelled())) as ours:
        materialize("spelled", 0, {}, tmp_path / "mine", ours.synthetic_datasets)
        ours_folder = default_folder("spelled", 0, {}, ours.synthetic_datasets.get("spelled"))
    with testing.use_plugins(plugin(OtherSpelled())) as theirs:
        assert default_folder("spelled", 0, {}, theirs.synthetic_datasets.get("spelled")) != ours_folder
        with pytest.raises(LensbenchError, match="holds rows of another generator named 'spelled'") as err:
            materialize("spelled", 0, {}, tmp_path / "mine", theirs.synthetic_datasets, "data", "data.data_dir")
    assert err.value.field == "data.data_dir" and "OtherSpelled" in err.value.message


# -- the answer hook -------------------------------------------------------------------------------


def trained_positions(labels) -> list[int]:
    return [i for i, label in enumerate(labels) if label != IGNORE]


def test_a_custom_answer_hook_picks_the_trained_and_scored_tokens(spelled, tmp_path):
    from lensbench.analyses.memory_ablation import MemoryAblation
    from lensbench.data.answers import AnswerDataModule
    from lensbench.training.data import SyntheticTextData

    text = "ask 10 reply 50 done"  # seed 0, row 0: "50" is characters 13 and 14
    with pytest.raises(LensbenchError, match="mask 'qa' trains no token"):
        token_labels(CHAR, text, "qa")  # no mask type finds it

    fit_data = SyntheticTextData(dataset="spelled", options={"n": 3}, data_dir="d", val_split="test", max_length=32)
    assert isinstance(fit_data.mask, DatasetMask) and fit_data.mask == "qa"
    rows = fit_data.load_splits()["train"]
    assert rows[0]["text"] == text
    padded = PaddedCollator(CHAR, fit_data.mask, 32, append_eos=True)(rows)
    for labels, row in zip(padded["labels"].tolist(), rows):
        assert trained_positions(labels) == [13, 14]  # the EOS after " done" is not trained
        assert [labels[i] for i in (13, 14)] == CHAR.convert_tokens_to_ids(list(row["answer"]))
    packed = PackedCollator(CHAR, fit_data.mask, 64)(rows[:2])
    assert trained_positions(packed["labels"][0].tolist()) == [13, 14, 20 + 13, 20 + 14]

    scored = AnswerDataModule(dataset="spelled", options={"n": 3}, data_dir="d", splits=["test"])
    assert isinstance(scored.mask, DatasetMask)
    analysis = SimpleNamespace(trainer=SimpleNamespace(datamodule=scored), max_length=32)
    batch = MemoryAblation._collator(analysis, CHAR)(scored.rows["test"])
    for labels in batch["labels"].tolist():
        assert trained_positions(labels) == [13, 14]
    assert Spelled.generated == 1  # both read the one folder
    assert {mask for _, mask in Spelled.asked} == {"qa"}
    assert (text, "qa") in Spelled.asked

    with_mask = SyntheticTextData(dataset="spelled", options={"n": 3}, data_dir="d", mask="none", val_split="test")
    PaddedCollator(CHAR, with_mask.mask, 32)(rows[:1])
    assert Spelled.asked[-1] == (text, "none")  # a config's mask reaches the hook


def test_a_hook_giving_bad_spans_is_one_line(spelled, monkeypatch):
    from lensbench.training.data import SyntheticTextData

    monkeypatch.setattr(Spelled, "answer_spans", lambda self, row, mask: [(3, 99)])
    dm = SyntheticTextData(dataset="spelled", options={"n": 1}, data_dir="d", val_split=None)
    with pytest.raises(LensbenchError, match="answer_spans of synthetic dataset 'spelled' gave") as err:
        PaddedCollator(CHAR, dm.mask, 32, field="data")(dm.load_splits()["train"])
    assert err.value.field == "data.dataset"
    monkeypatch.setattr(Spelled, "answer_spans", lambda self, row, mask: [(3, 3)])
    with pytest.raises(LensbenchError, match="answer_spans of synthetic dataset 'spelled' trains no token") as err:
        PaddedCollator(CHAR, dm.mask, 32, field="data")(dm.load_splits()["train"])
    assert err.value.field == "data.dataset"


def write_fit_config(folder: Path, **data) -> None:
    testing.save_char_tokenizer(folder / "chars")
    config = {
        "model": {"tokenizer": str(folder / "chars"), "lr": 1e-2, "warmup_steps": 1, "decay": "constant",
                  "save_every": 2, "track_memory_every": 0,
                  "config": {"model_type": "memory_llama", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "memory_layers": [1], "memory_n_keys": 8, "memory_heads": 2, "memory_topk": 4,
                             "memory_k_dim": 16, "max_position_embeddings": 32}},
        "data": {"dataset": "spelled", "options": {"n": 6}, "max_length": 24, "batch_size": 3,
                 "val_split": "test", "test_split": "test", **data},
        "trainer": {"max_steps": 2, "accelerator": "cpu", "enable_progress_bar": False, "log_every_n_steps": 1},
    }
    (folder / "train.yaml").write_text(yaml.safe_dump(config))


def test_fit_trains_what_the_hook_says_and_refuses_another_version_in_one_line(spelled, tmp_path, capsys,
                                                                               monkeypatch):
    from lensbench.cli import main

    write_fit_config(tmp_path)
    assert main(["fit", "--config", "train.yaml"]) == 0
    train_texts = {f"ask {10 + i} reply {50 + i} done" for i in range(6)}
    assert train_texts <= {text for text, _ in Spelled.asked}  # the qa mask alone would refuse these rows
    assert (tmp_path / "outputs/fit/train/checkpoint-2").is_dir()

    write_fit_config(tmp_path, data_dir="mine")
    load_dataset("spelled", {"n": 6}, 0, None, "mine", "data", registry=spelled.synthetic_datasets)
    before = snapshot(tmp_path / "mine")
    monkeypatch.setattr(Spelled, "version", "2")
    capsys.readouterr()
    assert main(["fit", "--config", "train.yaml", "--model.experiment", "bumped"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lensbench: error: data.data_dir: ")
    assert "version '1', but its generator is now version '2'" in err[0]
    assert snapshot(tmp_path / "mine") == before
    assert not (tmp_path / "outputs/fit/bumped/run.json").exists()


# -- the built-ins unchanged -----------------------------------------------------------------------

SMALL = {"synthetic_qa": {"num_pairs": 12, "buckets": [1, 3], "val_per_bucket": 2, "format": "question"},
         "digit_lookup": {"num_pairs": 9, "test_size": 3}, "two_hop": {"num_chains": 5},
         "hashhop": {"num_chains": 3, "max_hops": 3, "train_multihop": True}}
#: Digests of the rows as written (``<split>.jsonl`` bytes) and of the padded collator's labels
#: (append_eos, char tokenizer), taken before versions and answer_spans existed.
BEFORE = {"synthetic_qa": ("670da6f491136ba2", "b20e8fb764993719"),
          "digit_lookup": ("dd413ec7295af1ac", "7884d047f8bc6cb0"),
          "two_hop": ("42ae60f13474f5ed", "3cf1c12baba62b24"),
          "hashhop": ("3be40b57b6771a34", "46b9e9eaf1a291c4")}


def plain_trained(text: str, mask: str) -> set[int]:
    """The trained characters of ``text``, spelled out again from the mask types' definitions."""
    if mask == "qa":
        if "?" in text:
            start = text.rindex("?") + 1
        elif ":" in text:
            start = text.index(":") + 1
        else:
            return set()
        return set(range(start, len(text)))
    if mask == "digit_lookup":
        end = len(text)
        while end and text[end - 1].isspace():
            end -= 1
        return set(range(text.rindex(":") + 1, end))
    assert mask == "hashhop"
    out, i = set(), 0
    while (i := text.find("= '", i)) >= 0:
        close = text.index("'", i + 3)
        out |= set(range(i + 3, close))
        i = close + 1
    return out


@pytest.mark.parametrize("ds", [SyntheticQA(), DigitLookup(), TwoHop(), HashHop()], ids=lambda d: d.name)
def test_builtin_rows_and_masks_are_unchanged(ds, tmp_path):
    assert ds.version == "1" and type(ds).answer_spans is SyntheticDataset.answer_spans
    registry = testing.registries_for().synthetic_datasets
    splits = materialize(ds.name, 3, SMALL[ds.name], tmp_path / "d", registry)
    assert splits == ds.generate(3, ds.options(SMALL[ds.name], "o"))
    write_splits(splits, tmp_path / "again")
    files = b"".join((tmp_path / "d" / f"{s}.jsonl").read_bytes() for s in splits)
    assert files == b"".join((tmp_path / "again" / f"{s}.jsonl").read_bytes() for s in splits)
    collate = PaddedCollator(CHAR, DatasetMask(ds.mask, registry.get(ds.name, "d")), 128, append_eos=True)
    labels = [collate([r])["labels"][0].tolist() for rows in splits.values() for r in rows]
    digest = (hashlib.sha256(files).hexdigest()[:16], hashlib.sha256(json.dumps(labels).encode()).hexdigest()[:16])
    assert digest == BEFORE[ds.name]
    texts = [r["text"] for rows in splits.values() for r in rows]
    for text, labs in zip(texts, labels):
        trained = plain_trained(text, ds.mask)
        assert set(trained_positions(labs[:len(text)])) == trained, text
        eos = not any(c.isalnum() for c in text[max(trained) + 1:])
        assert (labs[len(text)] != IGNORE) == eos, text
        assert token_labels(CHAR, text, ds.mask, append_eos=True)[1] == labs[:len(text) + 1]
