"""Text inputs read alike everywhere (``lensbench.data.textio``): a UTF-8 byte-order mark is dropped,
lines end at "\\n" only (a form feed or U+2028 inside a line is part of it), "\\r\\n" is a line end;
YAML configs refuse a key given twice (``lensbench.yamlio``), naming it and its line; an empty config
and a string given for a list are one line saying what to write."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from lensbench.data.sources import read_records, read_texts
from lensbench.data.textio import decode, read_lines, split_lines
from lensbench.errors import LensbenchError
from lensbench.yamlio import DuplicateKeyError, load_config, safe_load

BOM = "\ufeff"
#: Everything ``str.splitlines`` splits on besides "\n", "\r" and "\r\n".
INNER = ("\f", "\v", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")


# -- the shared reader ------------------------------------------------------------------------------

@pytest.mark.parametrize("char", INNER)
def test_a_line_is_split_on_newline_only(char):
    assert split_lines(f"one{char}two\nthree\n") == [f"one{char}two", "three"]


def test_crlf_and_a_missing_last_newline():
    assert split_lines("a\r\nb\r\nc") == ["a", "b", "c"]
    assert split_lines("a\n\nb\n") == ["a", "", "b"]  # line numbers stay those of the file
    assert split_lines("") == [] and split_lines("\n") == [""]


def test_a_bom_is_dropped_and_a_bom_only_file_is_empty():
    assert decode((BOM + "text\n").encode(), "f.txt", "dataset") == "text\n"
    assert decode(BOM.encode(), "f.txt", "dataset") == ""
    assert decode(f"a{BOM}b".encode(), "f.txt", "dataset") == f"a{BOM}b"  # only a leading one is a marker


def test_invalid_utf8_names_the_byte_after_a_bom(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(BOM.encode() + "caf\xe9".encode("latin-1"))
    with pytest.raises(LensbenchError, match=r"latin.txt is not UTF-8 text \(byte 6 is invalid\)"):
        read_lines(path, "dataset")


def test_a_missing_file_says_what_is_needed(tmp_path):
    with pytest.raises(LensbenchError) as err:
        read_lines(tmp_path / "nope.jsonl", "f", "give one line per example")
    assert str(err.value) == f"f: {tmp_path / 'nope.jsonl'} is missing; give one line per example"


# -- text datasets ----------------------------------------------------------------------------------

def test_txt_with_a_bom_crlf_and_a_form_feed(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_bytes((BOM + "the cat sat\r\npage one\fpage two\r\n\r\nlast\u2028line").encode())
    assert read_texts(path) == ["the cat sat", "page one\fpage two", "last\u2028line"]
    assert [r["index"] for r in read_records(path)] == [0, 1, 2]


def test_a_bom_only_txt_holds_no_text(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(BOM.encode())
    with pytest.raises(LensbenchError, match="bom.txt holds no text"):
        read_texts(path, field="data.init_args.datasets[0]")


def test_jsonl_with_a_bom_and_a_raw_line_separator(tmp_path):
    rows = [{"text": "first\u2028still first", "id": 1}, {"text": "second\u2029para\fpage", "id": 2}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    assert len(text.splitlines()) == 4  # what str.splitlines made of it (json.dumps escapes the form feed)
    path = tmp_path / "rows.jsonl"
    path.write_bytes((BOM + text).encode())
    assert read_texts(path) == [r["text"] for r in rows]
    assert [(r["id"], r["text"], r["index"]) for r in read_records(path)] == [(1, rows[0]["text"], 0),
                                                                             (2, rows[1]["text"], 1)]


def test_jsonl_errors_still_name_the_file_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes((BOM + '{"text": "a\u2028b"}\n{"text": \n').encode())
    with pytest.raises(LensbenchError, match=r"rows.jsonl:2 is not valid JSON"):
        read_texts(path)


def test_the_text_datamodule_measures_no_bom(tmp_path):
    from lensbench.data.modules import load_datasets

    path = tmp_path / "texts.txt"
    path.write_bytes((BOM + "the cat\fsat\n").encode())
    rows, _ = load_datasets([str(path)], "data.init_args.datasets", None)
    assert [r["text"] for r in rows["texts"]] == ["the cat\fsat"]


# -- local MTEB task folders and synthetic splits --------------------------------------------------

def _sts(folder: Path, bom: bool = False, task: str | None = None) -> Path:
    folder.mkdir()
    (folder / "task.json").write_bytes(((BOM if bom else "") + (task or json.dumps(
        {"type": "STS", "description": "pairs"}))).encode())
    rows = [{"sentence1": f"a{i}\u2028b", "sentence2": f"c{i}\fd", "score": float(i % 5)} for i in range(6)]
    (folder / "test.jsonl").write_bytes(((BOM if bom else "") + "".join(
        json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows)).encode())
    return folder


def test_a_local_task_with_a_bom_and_line_separators_reads_as_written(tmp_path):
    from lensbench.layer_sweep.local_tasks import _files, _read_jsonl, _read_task_json

    folder = _sts(tmp_path / "sts", bom=True)
    assert _read_task_json(folder, "tasks")["type"] == "STS"
    rows = _read_jsonl(folder / "test.jsonl", "STS", _files("STS", "test")["test.jsonl"], "tasks")
    assert [n for n, _ in rows] == [1, 2, 3, 4, 5, 6] and rows[0][1]["sentence1"] == "a0\u2028b"


def test_task_json_naming_a_key_twice_is_refused(tmp_path):
    from lensbench.layer_sweep.local_tasks import _read_task_json

    folder = _sts(tmp_path / "dup", task='{"type": "STS",\n "description": "x", "type": "Classification"}')
    with pytest.raises(LensbenchError) as err:
        _read_task_json(folder, "data.init_args.tasks")
    assert str(err.value) == f"data.init_args.tasks: {folder / 'task.json'}: key 'type' is given twice; keep one"


def test_synthetic_splits_read_a_line_separator_inside_a_row(tmp_path):
    from lensbench.synthetic.datasets import read_splits

    (tmp_path / "train.jsonl").write_bytes((BOM + json.dumps({"text": "q\u2028a"}, ensure_ascii=False) + "\n").encode())
    assert read_splits(tmp_path) == {"train": [{"text": "q\u2028a"}]}


# -- YAML -------------------------------------------------------------------------------------------

def test_a_duplicate_key_names_the_key_and_both_lines():
    with pytest.raises(DuplicateKeyError) as err:
        safe_load("data:\n  batch_size: 2\n  max_examples: 3\n  batch_size: 4\n")
    assert (err.value.key, err.value.line, err.value.first) == ("batch_size", 4, 2)
    assert err.value.describe("x.yaml") == "duplicate key 'batch_size' at line 4 of x.yaml (first at line 2); keep one"
    with pytest.raises(LensbenchError) as err:
        load_config("{a: 1, a: 2}", "the value")
    assert str(err.value) == "config: duplicate key 'a' at line 1 of the value; keep one"


def test_what_is_no_duplicate_loads_as_before():
    text = "base: &b {lr: 1, steps: 2}\nrun:\n  <<: *b\n  lr: 3\nlist: [{a: 1}, {a: 2}]\nnested: {a: {a: 1}}\n"
    assert safe_load(text) == {"base": {"lr": 1, "steps": 2}, "run": {"lr": 3, "steps": 2},
                               "list": [{"a": 1}, {"a": 2}], "nested": {"a": {"a": 1}}}
    assert safe_load(BOM + "a: 1\n") == {"a": 1} and safe_load("") is None


def test_a_pipeline_config_that_is_no_mapping_names_its_sections():
    assert load_config("base: tiny\n", "p.yaml", sections="base:") == {"base": "tiny"}
    assert load_config("", "p.yaml") is None  # without sections: the caller decides
    with pytest.raises(LensbenchError) as err:
        load_config("# nothing yet\n", "p.yaml", sections="base:, others:")
    assert str(err.value) == ("config: p.yaml holds nothing (it is empty or only comments); write a config with its "
                              "sections (base:, others:)")


def _loader():
    from lensbench.cli_base import _make_loader

    return _make_loader(SimpleNamespace(analyses=()))


def test_the_config_loader_refuses_a_duplicate_key_naming_the_file():
    with pytest.raises(LensbenchError) as err:
        _loader()("model:\n  init_args: {}\nmodel: {}\n", path="run.yaml")
    assert str(err.value) == "config: duplicate key 'model' at line 3 of run.yaml (first at line 1); keep one"


@pytest.mark.parametrize("text, held", [("", "nothing (it is empty or only comments)"),
                                        ("# all commented out\n", "nothing (it is empty or only comments)"),
                                        ("- model\n- data\n", "a list, not a mapping of sections"),
                                        ("activation_norms\n", "a single value, not a mapping of sections")])
def test_a_config_file_that_is_no_mapping_says_so(text, held):
    with pytest.raises(LensbenchError) as err:
        _loader()(text, path="run.yaml")
    assert str(err.value).startswith(f"config: run.yaml holds {held}; write a config with its sections")


def test_values_on_the_command_line_still_load():
    load = _loader()
    assert load("") is None and load("[a, b]") == ["a", "b"] and load("{levels: [0.1]}") == {"levels": [0.1]}


def test_a_string_for_a_list_or_a_mapping_says_what_to_write():
    from jsonargparse import ArgumentError

    from lensbench.cli import _short_error

    nested = ('Parser key "model":\n  Does not validate against any of the Union subtypes\n'
              "  Subtypes: [<class 'lensbench.analysis.Analysis'>, <class 'NoneType'>]\n  Errors:\n"
              "    - Problem with given class_path 'lensbench.analyses.activation_norms.ActivationNorms':\n"
              '        Parser key "{key}":\n\n{inner}'
              "    - Expected a <class 'NoneType'>\n  Given value type: <class 'dict'>\n  Given value: {{}}\n")
    as_list = ("          - Expected a path but tiny either not accessible or invalid\n"
               "          - Does not validate against any of the Union subtypes\n"
               "          Subtypes: [list[str | lensbench.models.loading.ModelSpec], <class 'NoneType'>]\n"
               "          Errors:\n            - Expected a <class 'list'>\n            - Expected a <class 'NoneType'>\n"
               "          Given value type: <class 'str'>\n          Given value: tiny\n")
    assert _short_error(ArgumentError(None, nested.format(key="models", inner=as_list))) == \
        "model.init_args.models: expected a list, got the string 'tiny'; write [tiny]"
    as_map = ("          - Expected a path but mult either not accessible or invalid\n"
              "          Subtypes: [<class 'lensbench.perturbations.PerturbationGrid'>, <class 'NoneType'>]\n"
              "          Errors:\n            - Expected a dot import path string: mult\n"
              "          Given value type: <class 'str'>\n          Given value: mult\n")
    assert _short_error(ArgumentError(None, nested.format(key="perturbation", inner=as_map))) == (
        "model.init_args.perturbation: expected a mapping (PerturbationGrid settings), got the string 'mult'; "
        "write {key: value, ...} (--print_config shows the keys)")
    as_int = "          Expected a <class 'int'>. Got value: [1]\n"
    assert _short_error(ArgumentError(None, nested.format(key="batch_size", inner=as_int))) == \
        "model.init_args.batch_size: Expected a int. Got value: [1]"  # no string given: as before
