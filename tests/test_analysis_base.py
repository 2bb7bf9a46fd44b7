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
    import lensbench.report.html
    from lensbench.cli import main

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lensbench.report.html, "write_report", broken)
    monkeypatch.chdir(workdir)
    assert main(["predict", "--config", "run.yaml"]) == 0
    run = workdir / "outputs" / "activation_norms" / "run"
    assert (run / "activation_norms.csv").is_file() and not (run / "report.html").exists()
    assert "the results are written, but not report.html (OSError: [Errno 28] No space left on device)" in \
        (run / "logs" / "rank0.log").read_text(encoding="utf-8")


def _plugin_with_method(name: str):
    """A plugin module registering a copy of mult_gauss under ``name``."""
    import types

    from lensbench.hookspecs import hookimpl
    from lensbench.perturbations import MultGauss

    module = types.ModuleType(f"{name}_plugin")
    method = type("PluginMethod", (MultGauss,), {"name": name})

    @hookimpl
    def lensbench_register_perturbations():
        return [method]

    module.lensbench_register_perturbations = lensbench_register_perturbations
    return module, method


def test_an_analysis_holds_the_registries_it_was_built_with(tiny_model):
    """The grid's method is looked up in the registries handed over when the analysis was built
    (the innermost block), not in whatever registries are active later; built outside any block,
    an analysis needing a registry says so in one line."""
    from lensbench.analyses.activation_norms import ActivationNorms
    from lensbench.analysis import hand_registries
    from lensbench.testing import registries_for

    plugin, method = _plugin_with_method("plugin_gauss")
    plain, with_plugin = registries_for(), registries_for(plugin)
    grid = PerturbationGrid(method="plugin_gauss", levels=[0.5], include_baseline=False)
    models = [str(tiny_model)]
    with hand_registries(plain):
        with hand_registries(with_plugin):
            inner = ActivationNorms(models=models, perturbation=grid)
        with pytest.raises(LensbenchError) as excinfo:
            ActivationNorms(models=models, perturbation=grid)
    assert excinfo.value.field == "model.init_args.perturbation.method"
    assert "unknown" in excinfo.value.message and "plugin_gauss" in excinfo.value.message
    assert inner.registries is with_plugin
    (state,) = inner.states()
    assert [t.name for t in state.transforms] == ["plugin_gauss"]
    assert inner.registries.perturbations.get("plugin_gauss") is method

    from lensbench.analyses.logit_lens import LogitLens

    bare = LogitLens(models=models)  # outside any block: fine while no registry is needed
    assert [s.checkpoint for s in bare.states()] == ["tiny"]
    for build in (lambda: LogitLens(models=models, perturbation=grid),  # the grid's method
                  lambda: LogitLens(models=[ModelSpec(str(tiny_model), transforms=[{"name": "loop_layers"}])]),
                  lambda: ActivationNorms(models=models)):  # its statistics are registered metrics
        with pytest.raises(LensbenchError) as excinfo:
            build()
        assert "built without registries" in excinfo.value.message and "use_plugins()" in excinfo.value.message


def test_the_command_hands_its_registries_to_the_analysis(workdir, monkeypatch):
    """`lensbench predict` builds the analysis with the registries it resolved the config with
    (here the active ones, made so without entering any block): a method only they know runs."""
    import lensbench.plugins
    from lensbench.cli import main
    from lensbench.testing import registries_for

    plugin, _ = _plugin_with_method("plugin_gauss")
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(lensbench.plugins, "_active", [registries_for(plugin)])
    assert main(["predict", "--config", "run.yaml", "--model.init_args.perturbation.method", "plugin_gauss",
                 "--model.init_args.perturbation.levels", "[0.5]",
                 "--model.init_args.perturbation.include_baseline", "false"]) == 0
    import pandas as pd

    table = pd.read_csv(workdir / "outputs" / "activation_norms" / "run" / "activation_norms.csv")
    assert set(table["degradation_method"]) == {"plugin_gauss"}
