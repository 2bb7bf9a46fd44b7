"""What the Analysis base class does with what an analysis declares."""

from __future__ import annotations

import pytest

from lensbench.analysis import _built
from lensbench.errors import LensbenchError
from lensbench.models.loading import ModelSpec
from lensbench.perturbations import PerturbationGrid


def test_a_mapping_for_an_unhinted_argument_is_built_or_refused_in_one_line():
    # a constructor without type hints receives the config's mappings as they are
    assert _built(ModelSpec, {"source": "tiny", "name": "t"}, "f") == ModelSpec("tiny", name="t")
    assert _built(PerturbationGrid, {"levels": [0.5]}, "f").levels == [0.5]
    with pytest.raises(LensbenchError) as excinfo:
        _built(PerturbationGrid, {"level": [0.5]}, "model.init_args.perturbation")
    assert (excinfo.value.field, excinfo.value.message) == (
        "model.init_args.perturbation.level", "unknown key 'level'; did you mean 'levels'?")
    with pytest.raises(LensbenchError) as excinfo:
        _built(ModelSpec, {"name": "t"}, "model.init_args.models[0]")
    assert (excinfo.value.field, excinfo.value.message) == ("model.init_args.models[0].source", "is required; give source")


def test_a_report_that_cannot_be_written_leaves_the_run_finished(workdir, monkeypatch):
    import lensbench.report
    from lensbench.cli import main

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lensbench.report, "write_report", broken)
    monkeypatch.chdir(workdir)
    assert main(["predict", "--config", "run.yaml"]) == 0
    run = workdir / "outputs" / "activation_norms" / "run"
    assert (run / "activation_norms.csv").is_file() and not (run / "report.html").exists()
    assert "the results are written, but not report.html (OSError: [Errno 28] No space left on device)" in \
        (run / "logs" / "rank0.log").read_text(encoding="utf-8")
