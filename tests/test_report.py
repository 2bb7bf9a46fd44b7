"""The run report (``lensbench report``, and ``report.html`` at the end of every run): one
self-contained page holding every figure and table of a run folder, runs side by side, the state of
a partial run, the default page of an analysis with no report code; and, in headless Chromium, a
page that loads without errors, shows its figures, sorts a table and opens a big sweep quickly."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from helpers_cli import make_workdir

from lensbench.analysis import Analysis
from lensbench.cli import main
from lensbench.report import write_report
from lensbench.report.html import compare

matplotlib.use("Agg")

RUN = Path("outputs") / "activation_norms" / "run"
_TABLE = re.compile(r'<script type="application/json" id="([^"]+)">(.*?)</script>', re.S)


def tables(page: str) -> dict[str, dict]:
    """Each table of a page by its file name (``data-name``): its columns and rows as embedded."""
    specs = {ident: json.loads(text) for ident, text in _TABLE.findall(page)}
    return {name: specs[ident] for ident, name in re.findall(r'data-src="([^"]+)" data-name="([^"]+)"', page)}


def frame(spec: dict) -> pd.DataFrame:
    return pd.DataFrame(spec["data"], columns=spec["columns"])


def images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)]


def assert_offline(page: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<link" not in page and not re.search(r"<script[^>]*\ssrc=", page)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model) -> Path:
    """conftest's ``workdir`` layout with two finished runs: ``run`` and ``small`` (5 examples a dataset)."""
    folder = make_workdir(tmp_path_factory.mktemp("report") / "work", tiny_model)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        assert main(["predict", "--config", "run.yaml"]) == 0
        assert main(["predict", "--config", "run.yaml", "--model.init_args.experiment", "small",
                     "--data.init_args.max_examples", "5"]) == 0
    return folder


def test_a_run_writes_a_self_contained_page_of_its_figures_and_tables(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    assert main(["predict", "--config", "run.yaml"]) == 0
    run = workdir / RUN
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "merged: activation_norms.csv, activation_norms.png, report.html" in (run / "logs" / "rank0.log").read_text()
    assert_offline(page)
    assert images(page) == [p.read_bytes() for p in sorted(run.glob("*.png"))] != []
    shown = tables(page)
    assert sorted(shown) == sorted(p.name for p in run.glob("*.csv"))
    for name, spec in shown.items():
        pd.testing.assert_frame_equal(frame(spec), pd.read_csv(run / name), check_dtype=False)
    desc = shown["activation_norms.csv"]["desc"]  # from docs/activation_norms.md, `mean_<stat>` matching
    assert desc["mean_norm"].startswith("mean of the statistic over all those tokens")
    assert desc["layer"].startswith("0 = embedding output")
    assert "complete: all 9 planned work items stored" in page
    assert f"lensbench predict --config {RUN / 'config.yaml'}" in page  # the folder as the run named it
    assert "tiny: weights <code>v2:" in page and "0 on cpu" in page and "peak memory" in page
    import lensbench

    assert json.loads((run / "run.json").read_text())["lensbench_version"] == lensbench.__version__
    assert f"<dt>lensbench</dt><dd>{lensbench.__version__}</dd>" in page
    # `lensbench plot` redraws the figures and writes the page again
    (run / "report.html").unlink()
    assert main(["plot", str(run)]) == 0
    assert tables((run / "report.html").read_text(encoding="utf-8")).keys() == shown.keys()


def test_two_runs_stand_side_by_side_with_differences(runs, tmp_path):
    a, b = runs / RUN, runs / "outputs" / "small"
    out = tmp_path / "both.html"
    assert main(["report", str(a), str(b), "-o", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert_offline(page)
    shared, *own = images(page)  # first the runs on shared axes, then each run's own figure
    assert sorted(own) == sorted([(a / "activation_norms.png").read_bytes(), (b / "activation_norms.png").read_bytes()])
    assert "On shared axes" in page and shared not in own
    joined = frame(tables(page)["activation_norms.csv"])
    keys = ["model", "dataset", "layer"]
    expected = pd.read_csv(a / "activation_norms.csv").merge(pd.read_csv(b / "activation_norms.csv"), on=keys, suffixes=(" [run]", " [small]"))
    assert list(joined[keys].itertuples(index=False)) == list(expected[keys].itertuples(index=False))
    for column in ("n_tokens", "mean_norm", "std_norm", "max_norm"):
        diff = expected[f"{column} [small]"] - expected[f"{column} [run]"]
        np.testing.assert_allclose(joined[f"Δ {column}"], diff, rtol=1e-9)
        assert (joined[f"{column} [run]"] != joined[f"{column} [small]"]).any()  # the runs differ
    assert "joined on model, dataset, layer" in page and page.count('class="lb-card"') == 2


def test_runs_of_one_analysis_are_drawn_on_shared_axes(runs, tmp_path, monkeypatch):
    """compare_figures stacks the runs' tables (model names prefixed by the run) and the analysis's
    own plot draws every run's line on the same axes: one figure, one y range."""
    import lensbench.analyses.activation_norms as module
    from lensbench.analyses.activation_norms import ActivationNorms

    a, b = runs / RUN, runs / "outputs" / "small"
    drawn = []
    real = module.save_figure
    monkeypatch.setattr(module, "save_figure", lambda fig, out, **kw: (drawn.append(fig.axes), real(fig, out, **kw))[1])
    (tmp_path / "out").mkdir()
    paths = ActivationNorms.compare_figures([a, b], ["A", "B"], tmp_path / "out")
    assert [p.name for p in paths] == ["activation_norms.png"] and paths[0].stat().st_size > 0
    (ax,) = drawn[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    for label, run in (("A", a), ("B", b)):
        table = pd.read_csv(run / "activation_norms.csv")
        for (model, dataset), rows in table.groupby(["model", "dataset"]):
            line = lines[f"{label}: {model} / {dataset}"]  # each run's line, on the one axes
            np.testing.assert_allclose(line.get_ydata(), rows["mean_norm"], rtol=1e-12)
    assert len(lines) == 2 * pd.read_csv(a / "activation_norms.csv").groupby(["model", "dataset"]).ngroups
    # a run lacking the table: no such figure, and the page still has each run's own
    assert ActivationNorms.compare_figures([a, tmp_path], ["A", "B"], tmp_path / "out") == []


def test_fit_runs_are_drawn_on_one_figure_in_a_report(tmp_path):
    from lensbench.training.curves import FitRun

    calls = []

    class Recorder(FitRun):
        @classmethod
        def compare_figures(cls, run_dirs, labels, out_dir):
            calls.append((list(run_dirs), list(labels)))
            raise ValueError("no metrics")

    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        (run / "logs").mkdir(parents=True)
        (run / "config.yaml").write_text("model:\n  config: {}\n")
        pd.DataFrame({"step": [0, 1], "loss": [2.0, 1.5]}).to_csv(run / "memory_usage.csv", index=False)
        runs.append(run)
    page = write_report(runs, [Recorder, Recorder], tmp_path / "r.html").read_text(encoding="utf-8")
    assert calls == [(runs, ["a", "b"])]
    assert "could not be drawn on shared axes (ValueError: no metrics)" in page and "memory_usage.csv" in page


def test_a_partial_run_names_the_items_it_lacks(runs, tmp_path):
    run = shutil.copytree(runs / RUN, tmp_path / "run", symlinks=True)
    shard = run / "shards" / "rank00000.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    lost = json.loads(lines[3])["key"]
    shard.write_text("".join(lines[:3] + lines[4:]))
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "partial: 8 of 9 planned work items stored, 1 missing" in page
    assert f"missing: <code>{lost.replace(chr(34), '&quot;')}</code>" in page
    # a folder without logs/plan.json (made before it was written): the count from the run log
    (run / "logs" / "plan.json").unlink()
    assert main(["report", str(run)]) == 0
    assert "partial: 8 of 9 planned work items stored, 1 missing" in (run / "report.html").read_text(encoding="utf-8")


def test_an_analysis_without_report_code_gets_a_default_page(tmp_path):
    class Surprisal(Analysis):  # a plugin's analysis: tables and figures, nothing for the report
        name = "surprisal"

    run = tmp_path / "surprisal_run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  class_path: my_plugin.Surprisal\n")
    pd.DataFrame({"model": ["m", "m"], "position": [0, 1], "surprisal": [1.5, 2.5],
                  "note": ["</script><!-- <b>", "x"]}).to_csv(run / "scores.csv", index=False)
    fig = matplotlib.pyplot.figure(figsize=(2, 2))
    fig.savefig(run / "curve.png")
    matplotlib.pyplot.close(fig)
    sections = Surprisal.report_sections(run)
    assert [(s.title, [f.name for f in s.figures], [t.name for t in s.tables]) for s in sections] == [
        ("surprisal", ["curve.png"], ["scores.csv"])]
    page = write_report([run], [Surprisal]).read_text(encoding="utf-8")
    assert images(page) == [(run / "curve.png").read_bytes()]
    assert frame(tables(page)["scores.csv"])["surprisal"].tolist() == [1.5, 2.5]
    assert frame(tables(page)["scores.csv"])["note"].tolist() == ["</script><!-- <b>", "x"]  # data, not markup
    # the plugin not installed: `lensbench report` still draws the page from the folder
    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0
    assert frame(tables((run / "report.html").read_text(encoding="utf-8"))["scores.csv"])["position"].tolist() == [0, 1]


def test_runs_without_keys_are_stacked():
    a = pd.DataFrame({"x": [1.0, 1.0], "y": [2.0, 3.0]})
    b = pd.DataFrame({"x": [4.0], "y": [5.0]})
    joined, keys, diff, _ = compare({"a": a, "b": b}, None, {})
    assert keys == [] and diff == [] and joined["run"].tolist() == ["a", "a", "b"]


def test_a_missing_run_folder_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no config.yaml" in err


# -- in a real browser ---------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
browser = pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (apt-get install chromium; "
                             ".ci/run installs it)")

#: Injected first: every error the page raises (scripts, resources, console.error).
EARLY = """<script>window.__errors=[];
window.addEventListener('error',function(e){__errors.push(String(e.message||(e.target&&(e.target.src||'').slice(0,60))||'error'));},true);
window.addEventListener('unhandledrejection',function(e){__errors.push('rejection: '+e.reason);});
(function(){var ce=console.error;console.error=function(){__errors.push([].join.call(arguments,' '));ce.apply(console,arguments);};})();
</script>"""
#: Injected last: at the load event, what the test checks, written into the page as JSON.
LATE = """<script>window.addEventListener('load',function(){
var out={errors:window.__errors,opened_ms:performance.now(),ready:document.documentElement.getAttribute('data-lb-ready')};
var imgs=[].slice.call(document.images);out.images=imgs.length;
out.shown=imgs.filter(function(i){return i.complete&&i.naturalWidth>0;}).length;
var box=document.querySelector('.lb-table[data-src][data-name="'+SORT_TABLE+'"]');
var ths=[].slice.call(box.querySelectorAll('th')),col=ths.map(function(t){return t.textContent;}).indexOf(SORT_COLUMN);
function values(){return [].slice.call(box.querySelectorAll('tbody tr')).map(function(r){return r.cells[col].textContent;});}
out.before=values();ths[col].click();out.after=values();ths[col].click();out.descending=values();
var filter=box.querySelector('input');filter.value=FILTER;filter.dispatchEvent(new Event('input'));
out.filtered=box.querySelector('.lb-note').textContent;
var pre=document.createElement('pre');pre.id='lb-probe';pre.textContent=JSON.stringify(out);document.body.appendChild(pre);
});</script>"""


def open_in_chromium(page: Path, tmp_path: Path, table: str, column: str, filter: str = "") -> dict:
    """Load ``page`` in headless Chromium with the probes injected: sort ``table`` by ``column``
    (twice), then type ``filter`` into its filter box; return what they found."""
    probed = tmp_path / f"probed_{page.name}"
    text = page.read_text(encoding="utf-8")
    late = (LATE.replace("SORT_TABLE", json.dumps(table)).replace("SORT_COLUMN", json.dumps(column))
            .replace("FILTER", json.dumps(filter)))
    probed.write_text(text.replace("<head>", "<head>" + EARLY, 1).replace("</body>", late + "</body>", 1),
                      encoding="utf-8")
    done = subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path / 'profile'}",
                           "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=600)
    found = re.search(r'<pre id="lb-probe">(.*?)</pre>', done.stdout, re.S)
    assert found, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(html.unescape(found.group(1)))


def as_numbers(cells: list[str]) -> list[float]:
    return [float(c) for c in cells]


@pytest.mark.browser
@browser
def test_the_page_works_in_a_browser(runs, tmp_path):
    page = runs / RUN / "report.html"
    seen = open_in_chromium(page, tmp_path, "activation_norms.csv", "mean_norm", "dataset=beta")
    assert seen["errors"] == [] and seen["ready"] == "1"
    assert seen["images"] == len(list((runs / RUN).glob("*.png"))) == seen["shown"] > 0
    stored = pd.read_csv(runs / RUN / "activation_norms.csv")["mean_norm"].tolist()
    assert seen["before"] != seen["after"]  # stored by (model, dataset, layer), not by mean_norm
    assert as_numbers(seen["after"]) == sorted(as_numbers(seen["after"])) and len(seen["after"]) == len(stored)
    assert as_numbers(seen["descending"]) == sorted(as_numbers(seen["after"]), reverse=True)
    assert seen["filtered"] == f"rows 1–3 of 3 (filtered from {len(stored)})"
    # two runs side by side: the joined table sorts by its difference column
    both = tmp_path / "both.html"
    assert main(["report", str(runs / RUN), str(runs / "outputs" / "small"), "-o", str(both)]) == 0
    seen = open_in_chromium(both, tmp_path, "activation_norms.csv", "Δ mean_norm", "tiny")
    assert seen["errors"] == [] and seen["shown"] == seen["images"] == 3  # the runs on shared axes, then each run's
    assert as_numbers(seen["after"]) == sorted(as_numbers(seen["after"])) and len(seen["after"]) == len(stored)
    assert seen["filtered"] == f"rows 1–{len(stored)} of {len(stored)}"


def big_sweep(run: Path, checkpoints: int = 50, layers: int = 30, tasks: int = 4) -> Path:
    """A layer sweep-like run folder: 50 checkpoints x 30 layers x 4 tasks of scores, its summary
    tables and a dozen figures."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  class_path: lensbench.analyses.layer_sweep.LayerSweep\n")
    rng = np.random.default_rng(0)
    rows = [{"model": f"ckpt-{c:03d}", "revision": f"step{1000 * c}", "layer": layer, "task": f"Task{t}",
             "task_type": "STS" if t % 2 else "Classification", "main_score": rng.random(), "n_texts": 500,
             "n_nonfinite_texts": 0, "layer_norm": "final", "model_last_layer": layers - 1}
            for c in range(checkpoints) for layer in range(layers) for t in range(tasks)]
    scores = pd.DataFrame(rows)
    scores.to_csv(run / "layer_sweep.csv", index=False)
    by_task = scores.pivot_table(index=["model", "revision", "layer"], columns="task", values="main_score").reset_index()
    by_task.to_csv(run / "summary_layer_by_task.csv", index=False)
    best = scores.loc[scores.groupby(["model", "task"])["main_score"].idxmax()]
    best.to_csv(run / "best_layers.csv", index=False)
    import matplotlib.pyplot as plt

    for i in range(12):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.imshow(rng.random((layers, checkpoints)))
        fig.savefig(run / f"heatmap_{i:02d}.png", dpi=80)
        plt.close(fig)
    return run


@pytest.mark.browser
@browser
def test_a_fifty_checkpoint_sweep_opens_in_under_two_seconds(tmp_path):
    run = big_sweep(tmp_path / "sweep")
    assert main(["report", str(run)]) == 0
    seen = open_in_chromium(run / "report.html", tmp_path, "layer_sweep.csv", "main_score", "task=Task1")
    assert seen["errors"] == [] and seen["ready"] == "3" and seen["shown"] == seen["images"] == 12
    assert len(seen["after"]) == 100  # paged: 100 rows of 6000
    assert seen["filtered"] == "rows 1–100 of 1500 (filtered from 6000)"
    assert as_numbers(seen["after"]) == sorted(as_numbers(seen["after"]))
    assert as_numbers(seen["after"])[0] == pytest.approx(pd.read_csv(run / "layer_sweep.csv")["main_score"].min(), rel=1e-5)
    # Measured inside the page (performance.now() at the load event: from the start of navigation to
    # the tables drawn and the figures decoded), not as the wall time of this test: that would count
    # Chromium's own start and the load of the shared test machine, which say nothing of the page.
    print(f"50-checkpoint sweep page opened in {seen['opened_ms']:.0f} ms")
    assert seen["opened_ms"] < 2000


LOG = """\
2026-01-01 10:00:00,000 INFO lightning.pytorch.utilities.rank_zero: lensbench: 10 work items, 0 already stored in x, 10 to do on 2 rank(s)
2026-01-01 10:00:01,000 INFO lensbench.run: rank 0/2 on cuda:0: results to x/shards/rank00000.jsonl
2026-01-01 10:00:05,000 WARNING lightning.pytorch.lensbench: perturbation: out of memory at batch size 32; retrying with 16
2026-01-01 10:00:09,500 INFO lensbench.run: rank 0: 3/5 work items (60%), 1.00 items/s, about 2 s left; memory: rss 2.50 GiB, cuda allocated 7.25 GiB, reserved 9.00 GiB
2026-01-01 10:00:10,000 ERROR lensbench.run: rank 0: run stopped: RunStopped: stopped by SIGTERM
2026-01-01 11:00:00,000 INFO lightning.pytorch.utilities.rank_zero: lensbench: 12 work items, 3 already stored in x, 9 to do on 2 rank(s)
2026-01-01 11:00:02,000 INFO lensbench.run: rank 0: 1/5 work items (20%), 1.00 items/s, about 4 s left; memory: rss 3.00 GiB, cuda allocated 6.00 GiB, reserved 8.00 GiB
2026-01-01 11:00:02,000 WARNING lightning.pytorch.lensbench: perturbation: out of memory at batch size 32; retrying with 16
"""


def test_the_header_reads_devices_time_memory_warnings_and_a_stopped_session_from_the_logs(tmp_path):
    from lensbench.report.runinfo import read_run

    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  class_path: perturbation\n")
    (run / "logs" / "rank0.log").write_text(LOG)
    (run / "logs" / "rank1.log").write_text("2026-01-01 10:00:01,000 INFO lensbench.run: rank 1/2 on cuda:1: results to y\n")
    info = read_run(run)
    assert info.ranks == {0: "cuda:0", 1: "cuda:1"} and info.world_size == 2
    assert info.wall_s == pytest.approx(12.0) and info.sessions == 2  # 10 s, then 2 s
    assert info.peak_gib == {"rss": 3.0, "cuda allocated": 7.25, "reserved": 9.0}
    assert info.warnings == [  # each once
        "rank0: WARNING perturbation: out of memory at batch size 32; retrying with 16",
        "rank0: ERROR rank 0: run stopped: RunStopped: stopped by SIGTERM"]
    assert info.stopped is None  # the second session did not stop
    assert info.state() == "partial: 0 of 12 planned work items stored, 12 missing"


def test_the_packaged_column_descriptions_match_the_docs(tmp_path):
    from lensbench.plugins import active_registries
    from lensbench.report.doc_columns import COLUMNS
    from lensbench.report.sections import default_sections, doc_columns

    docs = Path(__file__).resolve().parents[1] / "docs"
    names = sorted(e.name for e in active_registries().analyses if (docs / f"{e.name}.md").exists())
    fix = ("regenerate: python3 -c \"from lensbench.report.sections import write_snapshot; "
           f"write_snapshot('docs', {names!r})\"")
    assert sorted(COLUMNS) == names, fix
    for name in names:
        assert COLUMNS[name] == doc_columns((docs / f"{name}.md").read_text(encoding="utf-8")), fix
    # where no doc is found (an installed wheel), the packaged copy describes the columns
    (tmp_path / "activation_norms.csv").write_text("model,mean_norm\nm,1.0\n")
    table, = default_sections(tmp_path, "activation_norms", tmp_path / "site" / "pkg" / "mod.py")[0].tables
    assert table.columns == {k: v for k, v in COLUMNS["activation_norms"]["activation_norms.csv"].items() if k}
    assert table.columns["mean_<stat>"].startswith("mean of the statistic") and table.description


def test_the_page_holds_tables_an_analysis_writes_after_its_merge(workdir, monkeypatch):
    """memory_ablation writes tables in its own ``finalize`` after the base class's merge and plot:
    the page is written once every table is there."""
    from lensbench.analyses.activation_norms import ActivationNorms

    merge_and_plot = ActivationNorms.finalize

    def finalize(self):
        outputs = merge_and_plot(self)
        pd.DataFrame({"x": [1, 2]}).to_csv(self.run_dir / "late.csv", index=False)
        return [*outputs, self.run_dir / "late.csv"]

    monkeypatch.setattr(ActivationNorms, "finalize", finalize)
    monkeypatch.chdir(workdir)
    assert main(["predict", "--config", "run.yaml"]) == 0
    shown = tables((workdir / RUN / "report.html").read_text(encoding="utf-8"))
    assert frame(shown["late.csv"])["x"].tolist() == [1, 2]


def _loop_table(scale: float) -> pd.DataFrame:
    from lensbench.analyses.loop_identity import METRICS

    rows = []
    for model, role in (("baseline", "baseline"), ("ckpt", "checkpoint")):
        for k in (0, 1, 2):
            row = {"model": model, "role": role, "step": "", "dataset": "texts", "loop_count": k, "n_tokens": 10,
                   "n_nonfinite_tokens": 0, "perplexity": scale * (10 + k)}
            for m in METRICS:
                row.update({f"{m}_mean": scale * (1 + k), f"{m}_std": 0.1, f"{m}_median": scale * (1 + k)})
            rows.append(row)
    return pd.DataFrame(rows)


def _perturbation_table(scale: float) -> pd.DataFrame:
    return pd.DataFrame({"degradation_method": ["mult_gauss"] * 3, "param_group_name": ["attn_only"] * 3,
                         "level_value": [0.0, 0.5, 1.0], "perplexity_mean": [scale * 10, scale * 20, scale * 40],
                         "perplexity_std": [1.0] * 3, "mean_tokens": [scale * 4, scale * 5, scale * 6],
                         "std_tokens": [0.5] * 3, "answer_match": [float("nan")] * 3})


@pytest.mark.parametrize("analysis, table, make, figure, column", [
    ("lensbench.analyses.loop_identity:LoopIdentity", "loop_metrics.csv", _loop_table,
     "cosine_similarity_vs_loop_count.png", "cosine_mean"),
    ("lensbench.analyses.perturbation:PerturbationAnalysis", "summary.csv", _perturbation_table,
     "perplexity_vs_level.png", "perplexity_mean"),
])
def test_line_figures_of_other_analyses_share_their_axes(analysis, table, make, figure, column, tmp_path, monkeypatch):
    """loop_identity and perturbation draw several runs' lines on one axes too: every line of
    both runs, with the run's label, its values those of its run's table."""
    import importlib

    module_name, cls_name = analysis.split(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, cls_name)
    runs = {}
    for label, scale in (("A", 1.0), ("B", 3.0)):
        runs[label] = tmp_path / label
        runs[label].mkdir()
        make(scale).to_csv(runs[label] / table, index=False)
    drawn = {}
    real = module.save_figure
    monkeypatch.setattr(module, "save_figure", lambda fig, out, **kw: (drawn.setdefault(Path(out).name, fig.axes),
                                                                      real(fig, out, **kw))[1])
    (tmp_path / "out").mkdir()
    paths = cls.compare_figures(list(runs.values()), list(runs), tmp_path / "out")
    assert figure in [p.name for p in paths]
    ax = drawn[figure][0]
    # (legend label, y values) of each line; an errorbar's label is on its container
    lines = [(c.get_label(), c.lines[0].get_ydata()) for c in ax.containers] or \
        [(line.get_label(), line.get_ydata()) for line in ax.get_lines() if not line.get_label().startswith("_")]
    labels = [name for name, _ in lines]
    for label, run in runs.items():
        mine = [ys for name, ys in lines if f"{label}: " in name]
        assert mine, labels
        values = sorted(pd.read_csv(run / table)[column].dropna())
        drawn_values = sorted(float(v) for ys in mine for v in ys)
        assert drawn_values == values, (label, drawn_values, values)


def test_a_key_of_integers_joins_the_same_key_of_floats_without_a_warning():
    import warnings

    a = pd.DataFrame({"level_value": [0, 1], "ppl": [10.0, 20.0]})
    b = pd.DataFrame({"level_value": [0.0, 1.0, 0.5], "ppl": [11.0, 22.0, 15.0]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        joined, keys, diff, _ = compare({"A": a, "B": b}, ["level_value"], {})
    assert keys == ["level_value"] and diff == ["Δ ppl"]
    assert list(joined["level_value"]) == [0.0, 0.5, 1.0]
    np.testing.assert_allclose(joined["Δ ppl"], [1.0, np.nan, 2.0])
