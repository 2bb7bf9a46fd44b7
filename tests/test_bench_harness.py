"""bench/harness.py, what the benchmarks share: rewriting one marked part of a docs file, the order
sides are timed in, medians and ratios as text, the disturbance check; and that the scripts of
bench/ use it rather than copies of their own."""

from __future__ import annotations

import ast
import importlib.util
import math
import re
import sys

import pytest

from conftest import ROOT

BENCH = ROOT / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name != "harness.py")


def load(path):
    """A bench module loaded from its file, as the tests load bench/gpu_suite.py."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def harness():
    return load(BENCH / "harness.py")


DOC = ("# Benchmarks\n\nIntro.\n\n## alpha\n\nold alpha\n| a | b |\n\n### a subheading\n\nstill alpha\n\n"
       "## alphabet\n\nnot alpha\n\n<!-- findings:one -->\nold one\n<!-- /findings:one -->\n\n## last\n\nold last\n")


# -- replacing a marked part -------------------------------------------------------------------------
def test_a_heading_section_is_replaced_up_to_the_next_heading_and_nothing_else(harness, tmp_path):
    path = tmp_path / "bench.md"
    path.write_text(DOC)
    harness.replace_sections(path, {"## alpha": ["new line 1", "", "new line 2", ""]})
    head, tail = DOC.split("## alpha\n", 1)[0], DOC[DOC.index("\n## alphabet"):]
    assert path.read_text() == head + "## alpha\n\nnew line 1\n\nnew line 2\n" + tail
    path.write_text(DOC)
    harness.replace_sections(path, {"## last": ["x"]})  # the last section: up to the end of the file
    assert path.read_text() == DOC[:DOC.index("## last")] + "## last\n\nx\n"


def test_a_findings_block_is_replaced_between_its_comments(harness, tmp_path):
    path = tmp_path / "memory.md"
    path.write_text(DOC)
    harness.replace_sections(path, {"findings:one": ["", "| t |", "| --- |", ""]})
    assert path.read_text() == DOC.replace("<!-- findings:one -->\nold one\n",
                                           "<!-- findings:one -->\n| t |\n| --- |\n")


def test_several_parts_of_one_file_in_one_call(harness, tmp_path):
    path = tmp_path / "bench.md"
    path.write_text(DOC)
    harness.replace_sections(path, {"## last": ["L"], "## alpha": ["A"]})
    assert path.read_text() == (DOC[:DOC.index("## alpha\n")] + "## alpha\n\nA\n"
                                + DOC[DOC.index("\n## alphabet"):DOC.index("## last")] + "## last\n\nL\n")
    two = tmp_path / "memory.md"
    two.write_text("a\n<!-- findings:x -->\n1\n<!-- /findings:x -->\nb\n<!-- findings:y -->\n2\n<!-- /findings:y -->\nc")
    harness.replace_sections(two, {"findings:y": ["Y"], "findings:x": ["X1", "X2"]})
    assert two.read_text() == ("a\n<!-- findings:x -->\nX1\nX2\n<!-- /findings:x -->\nb\n<!-- findings:y -->\nY\n"
                               "<!-- /findings:y -->\nc")


@pytest.mark.parametrize("marker,words", [("## beta", "no section '## beta'"),
                                          ("### a", "no section '### a'"),
                                          ("## alph", "no section '## alph'"),
                                          ("findings:two", "no block <!-- findings:two --> ... <!-- /findings:two -->")])
def test_a_missing_marker_stops_in_one_line_and_writes_nothing(harness, tmp_path, marker, words):
    path = tmp_path / "bench.md"
    path.write_text(DOC)
    with pytest.raises(SystemExit) as info:  # a script stops with the message as its one line
        harness.replace_sections(path, {"## alpha": ["would be written"], marker: ["x"]})
    assert isinstance(info.value, harness.MissingMarker)
    message = str(info.value.code)
    assert "\n" not in message and message.startswith(f"{path}: ") and words in message
    assert path.read_text() == DOC
    assert [p.name for p in tmp_path.iterdir()] == ["bench.md"]  # no temporary file left


def test_a_findings_block_without_its_end_is_missing(harness, tmp_path):
    path = tmp_path / "memory.md"
    path.write_text("<!-- findings:one -->\ntext\n")
    with pytest.raises(harness.MissingMarker):
        harness.replace_sections(path, {"findings:one": ["x"]})
    # only a comment that begins a line is a marker: one named in a sentence is text
    text = "Blocks such as `<!-- findings:one -->` are rewritten.\n<!-- findings:one -->\nold\n<!-- /findings:one -->\n"
    path.write_text(text)
    harness.replace_sections(path, {"findings:one": ["new"]})
    assert path.read_text() == text.replace("\nold\n", "\nnew\n")
    with pytest.raises(harness.MissingMarker, match="no section"):
        harness.read_section(tmp_path / "absent.md", "## alpha")


def test_the_docs_are_what_their_sections_write(harness, tmp_path):
    """Every section of docs/benchmarks.md and every findings block of docs/memory*.md, written back
    with its own text, gives the file byte for byte: the scripts' writer keeps their format."""
    docs = [ROOT / "docs" / "benchmarks.md", *sorted((ROOT / "docs").glob("memory*.md"))]
    seen = 0
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        markers = re.findall(r"^## .*?(?=[ \t]*$)", text, re.M) + re.findall(r"^<!-- (findings:\w+) -->$", text, re.M)
        copy = tmp_path / doc.name
        for marker in markers:
            copy.write_text(text, encoding="utf-8")
            current = harness.read_section(copy, marker)
            harness.replace_sections(copy, {marker: current.strip("\n").split("\n")})
            assert copy.read_text(encoding="utf-8") == text, (doc.name, marker)
            seen += 1
    assert seen >= 10


def test_activation_norms_keeps_its_hand_written_notes(tmp_path):
    module = load(BENCH / "activation_norms.py")
    path = tmp_path / "benchmarks.md"
    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    path.write_text(text, encoding="utf-8")
    old = text[text.index("## activation_norms"):text.index("\n## param_diff")]
    notes = old[old.index(module.NOTES_START):old.index(module.NOTES_END) + len(module.NOTES_END)]
    module.write_docs(path, "New figures.\n\n| a |\n")
    assert path.read_text(encoding="utf-8") == text.replace(old, f"## activation_norms\n\nNew figures.\n\n| a |\n\n{notes}\n")


def test_report_writes_intro_machine_date_table_and_footer(harness, tmp_path, monkeypatch):
    path = tmp_path / "bench.md"
    path.write_text(DOC)
    monkeypatch.setattr(harness, "date_utc", lambda: "2026-01-02 03:04 UTC")
    harness.report("## alpha", "Intro.", "a CPU, 2 cores", {"ratio": "**1.02**", "time": "3.00 s"}, "Footer.",
                   path=path)
    section = path.read_text()[len("# Benchmarks\n\nIntro.\n\n"):]
    assert section.startswith("## alpha\n\nIntro.\n\n- machine: a CPU, 2 cores\n- date: 2026-01-02 03:04 UTC\n\n"
                              "| figure | value |\n| --- | --- |\n| ratio | **1.02** |\n| time | 3.00 s |\n\n"
                              "Footer.\n\n## alphabet\n")


# -- timing sides alternately --------------------------------------------------------------------------
def test_sides_take_turns_first_and_each_is_timed_once_per_repetition(harness):
    clock = [0.0]
    calls = []
    cost = {"a": 1.0, "b": 2.0, "c": 4.0}

    def side(name):
        def run():
            calls.append(name)
            clock[0] += cost[name]
        return run

    times = harness.alternate({n: side(n) for n in cost}, reps=3, warmup=1, clock=lambda: clock[0])
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]  # warm-up, then rotating
    assert times == {"a": [1.0] * 3, "b": [2.0] * 3, "c": [4.0] * 3}
    assert [harness.rotated(["x", "y"], rep) for rep in range(3)] == [["x", "y"], ["y", "x"], ["x", "y"]]


def test_medians_ratios_and_goals_as_text(harness):
    assert harness.median([3.0, 1.0, 2.0, 10.0]) == 2.5
    assert (harness.fmt_s(1.234), harness.fmt_s(0.1), harness.fmt_s(0.0456)) == ("1.23 s", "0.10 s", "45.6 ms")
    assert harness.fmt_ms(0.01234) == "12.34 ms"
    assert (harness.fmt_ms(0.005, 2, small=3), harness.fmt_ms(0.05, 2, small=3)) == ("5.000 ms", "50.00 ms")
    assert harness.verdict(1.05, 1.05) == "within the goal 1.05"
    assert harness.verdict(1.051, 1.05) == "ABOVE the goal 1.05"
    assert harness.verdict(0.05, 0.05, "5%", strict=True) == "ABOVE the goal 5%"
    assert harness.table(["a", "b"], [[1, "x"]], ["---:", "---"]) == ["| a | b |", "| ---: | --- |", "| 1 | x |"]


# -- the disturbance check ------------------------------------------------------------------------------
class Counters:
    """Fake CPU counters and clock, moved by hand."""

    def __init__(self):
        self.busy, self.own, self.wall = 100.0, 10.0, 50.0

    def watch(self, harness):
        return harness.OthersCpu(busy=lambda: self.busy, own=lambda: self.own, clock=lambda: self.wall)


def test_others_cpu_is_the_machines_busy_time_less_the_measured_process(harness):
    c = Counters()
    watch = c.watch(harness)
    c.busy, c.own, c.wall = 103.0, 11.0, 54.0  # the machine was busy 3 s, of which 1 s was ours
    assert watch.seconds() == 2.0 and watch.share() == 0.5 and watch.wall() == 4.0
    assert watch.seconds(own=3.5) == 0.0  # never below 0 (a child's rusage may exceed the ticks)
    assert harness.is_disturbed(2.0, 4.0, fraction=0.05, slack=0.5)
    assert not harness.is_disturbed(0.7, 4.0, fraction=0.05, slack=0.5)
    unknown = harness.OthersCpu(busy=lambda: math.nan, own=lambda: 1.0, clock=lambda: c.wall)
    assert math.isnan(unknown.seconds()) and math.isnan(unknown.share())  # no /proc/stat: unknown, not 0
    assert not harness.is_disturbed(math.nan, 4.0, fraction=0.05)  # ... and so not disturbed


def test_waiting_for_a_quiet_machine(harness):
    c = Counters()
    shares = iter([0.9, 0.8, 0.1, 0.0])
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        share = next(shares)
        c.wall += seconds
        c.busy += share * seconds

    waited = harness.wait_quiet(0.15, 60.0, sample=3.0, sleep=sleep, watch=lambda: c.watch(harness))
    assert slept == [3.0, 3.0, 3.0] and waited == 9.0  # quiet on the third sample
    assert harness.wait_quiet(0.15, 0.0, sleep=sleep, watch=lambda: c.watch(harness)) == 0.0

    def busy_sleep(seconds):  # another process takes a whole core throughout
        c.wall += seconds
        c.busy += seconds

    assert harness.wait_quiet(0.15, 4.0, sample=3.0, sleep=busy_sleep, watch=lambda: c.watch(harness)) == 6.0


def test_a_disturbed_attempt_is_run_again_and_the_least_disturbed_kept(harness, capsys):
    shares = iter([0.5, 0.3, 0.4])
    results = iter(["first", "second", "third"])
    best = harness.least_disturbed(lambda: (next(results), next(shares)), retries=2, limit=0.1, max_wait=0,
                                   label="sweep", wait=lambda *a: 0.0)
    assert best == ("second", 0.3, 3)
    out = capsys.readouterr().out
    assert "(sweep 1 disturbed: other processes took 50% of a core meanwhile)" in out and "sweep 3" in out
    quiet = harness.least_disturbed(lambda: ("only", 0.05), retries=2, limit=0.1, max_wait=0, wait=lambda *a: 0.0)
    assert quiet == ("only", 0.05, 1) and capsys.readouterr().out == ""


# -- the scripts use the harness ----------------------------------------------------------------------------
#: Names the scripts defined for themselves before the harness took them over.
FORMER_COPIES = {"cpu_busy", "own_cpu", "own_cpu_seconds", "wait_for_quiet", "timed", "quiet_timed", "write_section",
                 "replace_block", "_md", "cpu_name", "report", "machine", "median", "fmt_s", "is_disturbed", "now"}


def top_level_names(path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def test_no_bench_script_defines_its_own_copy_of_the_harness():
    shared = {n for n in top_level_names(BENCH / "harness.py") if not n.startswith("_")} | FORMER_COPIES
    copies = {p.name: sorted(top_level_names(p) & shared) for p in SCRIPTS}
    assert {name: defs for name, defs in copies.items() if defs} == {}
    assert not (BENCH / "_report.py").exists()
    for path in SCRIPTS:
        assert "/proc/stat\")" not in path.read_text(encoding="utf-8"), path.name  # the harness reads it


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_bench_script_imports(path):
    module = load(path)
    assert callable(module.main)
