"""Writing a plugin from docs/plugins.md alone: the testing recipe runs as written, ``lensbench.testing``,
entry-point names in listings and clash errors, blocking by entry point or distribution, the contracts."""

from __future__ import annotations

import re
import subprocess
import sys
import types
from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, clean_env

import lensbench.testing as testing
from lensbench.cli import main
from lensbench.errors import LensbenchError
from lensbench.hookspecs import hookimpl
from lensbench.metrics import TokenStatistic
from lensbench.perturbations import Perturbation
from lensbench.plugins import (active_registries, blocked_plugins, build_registries, get_plugin_manager,
                               installed_plugins, use_registries)
from lensbench.registry import Registries

DOC = ROOT / "docs" / "plugins.md"
EXAMPLE = "lensbench-example==0.1.0"
ENV_VARS = ("LENSBENCH_DISABLE_PLUGINS", "LENSBENCH_BLOCK_PLUGINS", "LENSBENCH_TRACE_HOOKS", "LENSBENCH_PLUGINS")


@pytest.fixture(autouse=True)
def _plain_env(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


class Spread(TokenStatistic):
    description = "a test statistic"

    def __init__(self, name: str = "spread") -> None:
        self.name = name

    def __call__(self, hidden):
        return hidden.std(dim=-1)


def plugin_module(name: str, metrics=(), perturbations=()) -> types.ModuleType:
    module = types.ModuleType(name)

    @hookimpl
    def lensbench_register_metrics():
        return list(metrics)

    @hookimpl
    def lensbench_register_perturbations():
        return list(perturbations)

    module.lensbench_register_metrics = lensbench_register_metrics
    module.lensbench_register_perturbations = lensbench_register_perturbations
    return module


def entry(registry, name):
    return next(e for e in registry if e.name == name)


# -- the doc's recipe runs as written ---------------------------------------------------------------

def recipe_files(heading: str = "## Testing a plugin") -> dict[str, str]:
    """``{file name: code}`` of the python blocks captioned with a file name in a section of the doc."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index(heading + "\n"):]
    end = section.find("\n## ", 1)
    section = section if end < 0 else section[:end]
    return dict(re.findall(r"^`([\w./-]+\.py)`:\n\n```python\n(.*?)^```$", section, re.M | re.S))


def test_the_recipe_is_a_plugin_and_its_tests():
    files = recipe_files()
    assert set(files) == {"my_plugin.py", "test_my_plugin.py"}
    plugin, tests = files["my_plugin.py"], files["test_my_plugin.py"]
    assert "class SignFlip(Perturbation)" in plugin and 'name = "sign_flip"' in plugin
    assert "class PeakAbs(TokenStatistic)" in plugin and 'name = "peak_abs"' in plugin
    assert "use_plugins(my_plugin)" in tests and "apply_transform(" in tests and "main([" in tests


@pytest.fixture(scope="module")
def subprocesses(tmp_path_factory):
    """The two slow subprocesses of this module (~5-10 s of imports each), started together."""
    recipe = tmp_path_factory.mktemp("recipe")
    for name, code in recipe_files().items():
        (recipe / name).write_text(code, encoding="utf-8")
    (recipe / "pytest.ini").write_text("[pytest]\n")  # the folder is its own rootdir
    env = {k: v for k, v in clean_env().items() if k not in ENV_VARS}
    tutorial = tmp_path_factory.mktemp("tutorial")
    for name, code in recipe_files(TUTORIAL).items():
        (tutorial / name).write_text(code, encoding="utf-8")
    (tutorial / "pytest.ini").write_text("[pytest]\n")
    started = {
        "recipe": subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=recipe,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "tutorial": subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=tutorial,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "blocked": subprocess.Popen(["lensbench", "plugins"], cwd=tmp_path_factory.mktemp("cwd"),
                                    env={**env, "LENSBENCH_BLOCK_PLUGINS": "lensbench-example,nonesuch"},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    }
    yield {name: SimpleNamespace(proc=proc, done=None) for name, proc in started.items()}
    for proc in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def finished(subprocesses, name: str) -> SimpleNamespace:
    job = subprocesses[name]
    if job.done is None:
        out, err = job.proc.communicate(timeout=300)
        job.done = SimpleNamespace(returncode=job.proc.returncode, stdout=out, stderr=err)
    return job.done


def test_the_recipe_runs_as_written(subprocesses):
    n_tests = len(re.findall(r"^def test_", recipe_files()["test_my_plugin.py"], re.M))
    assert n_tests >= 4
    result = finished(subprocesses, "recipe")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert re.search(rf"\b{n_tests} passed\b", summary) and "failed" not in summary and "error" not in summary, summary


TUTORIAL = "## Writing an analysis"


def test_the_tutorial_is_an_analysis_and_its_tests():
    files = recipe_files(TUTORIAL)
    assert set(files) == {"surprisal.py", "test_surprisal.py"}
    analysis, tests = files["surprisal.py"], files["test_surprisal.py"]
    assert "class Surprisal(Analysis)" in analysis and "self.declare_models(models)" in analysis
    assert "self.declare_grid(perturbation)" in analysis and "def fingerprint" not in analysis
    for what in ("--trainer.strategy", "perturbation.levels", "changed since it started", "use_plugins(surprisal)"):
        assert what in tests, what


def test_the_tutorial_runs_as_written_under_one_and_two_processes(subprocesses):
    names = re.findall(r"^def (test_\w+)", recipe_files(TUTORIAL)["test_surprisal.py"], re.M)
    assert {"test_two_ddp_processes_give_the_same_table", "test_a_run_over_changed_weights_is_refused",
            "test_a_resumed_run_extended_with_a_level_computes_only_that_level"} <= set(names)
    result = finished(subprocesses, "tutorial")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert re.search(rf"\b{len(names)} passed\b", summary) and "failed" not in summary, summary


def test_lensbench_plugins_loads_named_modules_and_refuses_one_that_cannot_import(tmp_path, monkeypatch):
    from lensbench.plugins import build_registries, get_plugin_manager

    (tmp_path / "tried_plugin.py").write_text(
        "from lensbench.metrics import TokenStatistic\nfrom lensbench.hookspecs import hookimpl\n\n"
        "class Peak(TokenStatistic):\n    name = 'tried_peak'\n\n    def __call__(self, hidden):\n"
        "        return hidden.abs().amax(dim=-1)\n\n@hookimpl\ndef lensbench_register_metrics():\n"
        "    return [Peak()]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("LENSBENCH_PLUGINS", " tried_plugin, tried_plugin ")
    registries = build_registries(get_plugin_manager(load_installed=False))
    assert "tried_peak" in registries.metrics
    assert {e.name: e.plugin for e in registries.metrics}["tried_peak"] == "tried_plugin"
    monkeypatch.setenv("LENSBENCH_PLUGINS", "tried_plugin,no_such_module_here")
    with pytest.raises(LensbenchError) as excinfo:
        get_plugin_manager(load_installed=False)
    assert str(excinfo.value).splitlines() == [
        "LENSBENCH_PLUGINS names 'no_such_module_here', which cannot be imported (ModuleNotFoundError: No module "
        "named 'no_such_module_here'); put its folder on PYTHONPATH, or remove it from LENSBENCH_PLUGINS"]


# -- lensbench.testing ------------------------------------------------------------------------------

def test_use_plugins_activates_fresh_registries_without_installed_plugins():
    module = plugin_module("spread_plugin", metrics=[Spread()])
    outer = Registries()
    with use_registries(outer):
        with testing.use_plugins(module) as reg:
            assert active_registries() is reg
            assert reg.metrics.names() == ["norm", "spread"]  # the built-ins and the module, not max_abs
            assert (entry(reg.metrics, "spread").plugin, entry(reg.metrics, "spread").entry_point) == ("spread_plugin", None)
            assert reg.entry_points == {}
        assert active_registries() is outer
    assert "spread" not in testing.registries_for().metrics


def test_use_plugins_takes_module_names_and_never_registers_an_installed_plugin_twice():
    import lensbench_example.plugin as example_plugin

    # The old recipe: registering the installed module by hand on a manager that loaded it fails in pluggy.
    with pytest.raises(ValueError, match="already registered"):
        get_plugin_manager(load_installed=True).register(example_plugin)
    alone = testing.registries_for("lensbench_example.plugin")
    assert (entry(alone.metrics, "max_abs").plugin, entry(alone.metrics, "max_abs").entry_point) == \
        ("lensbench_example.plugin", None)
    with testing.use_plugins(example_plugin, load_installed=True) as reg:
        assert (entry(reg.metrics, "max_abs").plugin, entry(reg.metrics, "max_abs").entry_point) == (EXAMPLE, "example")
        assert reg.entry_points == {"example": EXAMPLE}


def test_two_plugin_modules_with_one_name_are_refused():
    with pytest.raises(LensbenchError) as err:
        testing.plugin_manager(plugin_module("twin", metrics=[Spread("a")]), plugin_module("twin", metrics=[Spread("b")]))
    assert err.value.field == "plugins[1]" and "'twin'" in str(err.value)


def test_importing_lensbench_testing_imports_nothing_heavy():
    code = ("import sys, lensbench.testing; "
            "print(sorted(m for m in ('torch', 'transformers', 'tokenizers', 'lightning') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_tests_tiny_re_exports_lensbench_testing():
    import tiny

    names = ["WORDS", "LLAVA_TEMPLATE", "GEMMA3_TEMPLATE", "tiny_tokenizer", "save_tiny_llama", "write_texts",
             "save_tiny_llava", "save_tiny_gemma3"]
    assert set(names) <= set(testing.__all__)
    for name in testing.__all__:
        assert getattr(tiny, name) is getattr(testing, name), name


def test_every_testing_helper_is_documented():
    page = DOC.read_text(encoding="utf-8")
    for name in testing.__all__:
        if callable(getattr(testing, name)):
            assert f"`{name}(" in page, f"lensbench.testing.{name} is not documented in docs/plugins.md"


# -- the contracts of docs/plugins.md ---------------------------------------------------------------

class Recorder(Perturbation):
    """Records what ``perturb`` receives; doubles each tensor."""

    name = "recorder"
    calls: list = []

    def perturb(self, w, generator):
        Recorder.calls.append((w.data_ptr(), w.dtype, generator))
        return w * 2


def test_one_seeded_generator_serves_the_group_in_parameter_order(tmp_path):
    folder = testing.save_tiny_llama(tmp_path / "tiny")
    original = testing.apply_transform(folder, "mult_gauss", level=0.0, group="mlp_only").model  # level 0: as saved
    mlp = [(n, p.detach().clone()) for n, p in original.named_parameters() if ".mlp." in n]
    assert len(mlp) == 6
    with testing.use_plugins(plugin_module("recording", perturbations=[Recorder])):
        Recorder.calls.clear()
        testing.apply_transform(folder, "recorder", level=0.0, group="mlp_only")
        assert Recorder.calls == []  # level 0: perturb is never called
        loaded = testing.apply_transform(folder, "recorder", seed=7, level=0.5, group="mlp_only")
        perturbed = loaded.model.named_parameters()
    # Float32 model: ``w`` is the parameter itself, in parameter order, all with one generator.
    params = [p for n, p in perturbed if ".mlp." in n]
    assert [c[0] for c in Recorder.calls] == [p.data_ptr() for p in params]
    assert {c[1] for c in Recorder.calls} == {torch.float32}
    assert len({id(c[2]) for c in Recorder.calls}) == 1 and Recorder.calls[0][2].device.type == "cpu"
    for (name, w), p in zip(mlp, params):
        assert torch.equal(p, w * 2), name
    # The built-in mult_gauss replayed by hand: one generator seeded 7, the group's tensors in order.
    noisy = testing.apply_transform(folder, "mult_gauss", seed=7, level=0.5, group="mlp_only").model
    generator = torch.Generator().manual_seed(7)
    for name, w in mlp:
        expected = w * (1 + 0.5 * torch.randn(w.shape, generator=generator, dtype=torch.float32))
        assert torch.equal(noisy.get_parameter(name), expected), name


# -- entry points: listing, blocking, clashes -------------------------------------------------------

def test_the_example_plugin_is_installed_and_loads_from_its_entry_point():
    import lensbench_example.plugin as example_plugin

    found = {ep.name: ep for ep in entry_points(group="lensbench")}
    assert found["example"].value == "lensbench_example.plugin"
    assert found["example"].dist.name == "lensbench-example"
    assert installed_plugins()["example"] == EXAMPLE
    pm = get_plugin_manager(load_installed=True)
    assert pm.get_plugin("example") is example_plugin
    reg = build_registries(pm)
    max_abs = entry(reg.metrics, "max_abs")
    assert (max_abs.plugin, max_abs.entry_point) == (EXAMPLE, "example")
    assert type(max_abs.obj) is example_plugin.MaxAbs
    assert entry(reg.perturbations, "low_rank").obj is example_plugin.LowRank


@pytest.mark.parametrize("value", ["example", "lensbench-example", "lensbench_example", "LensBench.Example",
                                   " other-thing , lensbench-example"])
def test_block_by_entry_point_or_distribution_name(monkeypatch, capsys, value):
    monkeypatch.setenv("LENSBENCH_BLOCK_PLUGINS", value)
    pm = get_plugin_manager()
    assert pm.is_blocked("example")
    reg = build_registries(pm)
    assert "max_abs" not in reg.metrics and "capitals" not in reg.datasets and "low_rank" not in reg.perturbations
    assert reg.entry_points == {}
    err = capsys.readouterr().err
    assert ("'other-thing'" in err) is ("other-thing" in value)
    assert "lensbench-example" not in err.split("installed:")[0]  # a name that matched is not reported


def test_blocked_plugins_maps_names_to_entry_points():
    installed = {"example": EXAMPLE, "a": "multi-dist==1.0", "b": "multi-dist==1.0"}
    assert blocked_plugins("", installed) == ([], [])
    assert blocked_plugins("Multi_Dist", installed) == (["a", "b"], [])  # a distribution's every entry point
    assert blocked_plugins("b, example,nope,, a ", installed) == (["b", "example", "a"], ["nope"])
    assert blocked_plugins("Example", installed) == ([], ["Example"])  # entry-point names are exact


def test_blocking_an_unknown_name_warns_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("LENSBENCH_BLOCK_PLUGINS", "lensbench-exampel")
    reg = build_registries(get_plugin_manager())
    assert "max_abs" in reg.metrics  # nothing blocked
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["lensbench: warning: LENSBENCH_BLOCK_PLUGINS names 'lensbench-exampel', which matches no "
                     f"installed plugin's entry point or distribution; installed: example ({EXAMPLE})"]
    monkeypatch.setenv("LENSBENCH_DISABLE_PLUGINS", "1")  # nothing installed is loaded: nothing to warn about
    get_plugin_manager()
    get_plugin_manager(load_installed=False)
    assert capsys.readouterr().err == ""


def test_lensbench_plugins_shows_entry_points(capsys):
    with testing.use_plugins(plugin_module("spread_plugin", metrics=[Spread()]), load_installed=True):
        assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  max_abs +lensbench-example==0\.1\.0 +example +largest absolute", out, re.M), out
    assert re.search(r"^  norm +lensbench \(built-in\) +- +L2 norm", out, re.M), out
    assert re.search(r"^  spread +spread_plugin +- +a test statistic", out, re.M), out
    assert re.search(r"^installed plugins .*LENSBENCH_BLOCK_PLUGINS takes either name", out, re.M), out
    assert re.search(r"^  example +lensbench-example==0\.1\.0 +loaded$", out, re.M), out
    with testing.use_plugins():  # installed plugins left out
        assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "max_abs" not in out
    assert re.search(r"^  example +lensbench-example==0\.1\.0 +not loaded$", out, re.M), out


def test_console_script_blocks_by_distribution_and_warns_about_unknown_names(subprocesses):
    result = finished(subprocesses, "blocked")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith("lensbench: warning: LENSBENCH_BLOCK_PLUGINS names 'nonesuch', ")
    assert warnings[0].endswith(f"installed: example ({EXAMPLE})")
    assert "max_abs" not in result.stdout and "capitals" not in result.stdout
    assert re.search(r"^  example +lensbench-example==0\.1\.0 +not loaded \(LENSBENCH_BLOCK_PLUGINS\)$",
                     result.stdout, re.M), result.stdout


RIVAL_PLUGIN = '''
from lensbench.hookspecs import hookimpl
from lensbench.metrics import TokenStatistic


class RivalMaxAbs(TokenStatistic):
    name = "max_abs"
    description = "a second max_abs"

    def __call__(self, hidden):
        return hidden.abs().amax(dim=-1)


@hookimpl
def lensbench_register_metrics():
    return [RivalMaxAbs()]
'''


@pytest.fixture
def rival(tmp_path, monkeypatch):
    """A second installed plugin (distribution rival-stats, entry point rival) that registers max_abs too."""
    site = tmp_path / "site"
    (site / "rival_stats").mkdir(parents=True)
    (site / "rival_stats" / "__init__.py").write_text("")
    (site / "rival_stats" / "plugin.py").write_text(RIVAL_PLUGIN)
    info = site / "rival_stats-0.2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rival-stats\nVersion: 0.2.0\n")
    (info / "entry_points.txt").write_text("[lensbench]\nrival = rival_stats.plugin\n")
    monkeypatch.syspath_prepend(str(site))
    yield "rival-stats==0.2.0"
    for name in ("rival_stats.plugin", "rival_stats"):
        sys.modules.pop(name, None)


def test_two_installed_plugins_clash_and_the_error_says_how_to_skip_either(rival, monkeypatch):
    assert installed_plugins()["rival"] == rival
    with pytest.raises(LensbenchError) as err:
        build_registries(get_plugin_manager())
    message = str(err.value)
    assert "\n" not in message and message.startswith("metric 'max_abs' is registered twice")
    assert f"'{EXAMPLE}' (entry point 'example')" in message and f"'{rival}' (entry point 'rival')" in message
    offered = re.findall(r"LENSBENCH_BLOCK_PLUGINS=(\w+)", message)
    assert sorted(offered) == ["example", "rival"]
    # Each value the error offers works, and so does the distribution name.
    for value, winner in (("example", rival), ("rival", EXAMPLE), ("rival-stats", EXAMPLE)):
        monkeypatch.setenv("LENSBENCH_BLOCK_PLUGINS", value)
        assert entry(build_registries(get_plugin_manager()).metrics, "max_abs").plugin == winner, value


def test_an_in_process_plugin_clashing_with_the_example_is_told_to_block_example(monkeypatch):
    mine = plugin_module("my_plugin", metrics=[Spread("max_abs")])
    with pytest.raises(LensbenchError) as err:
        testing.registries_for(mine, load_installed=True)
    message = str(err.value)
    assert f"by '{EXAMPLE}' (entry point 'example') and by 'my_plugin';" in message
    assert message.endswith("skip the first with LENSBENCH_BLOCK_PLUGINS=example")
    monkeypatch.setenv("LENSBENCH_BLOCK_PLUGINS", "example")
    assert entry(testing.registries_for(mine, load_installed=True).metrics, "max_abs").plugin == "my_plugin"


def test_plugins_lists_everything_and_marks_a_clash(rival, capsys, monkeypatch):
    """While two installed plugins register one name, every other command refuses, but `lensbench
    plugins` lists both plugins and marks the clash with the line the others give."""
    import lensbench.plugins

    monkeypatch.setattr(lensbench.plugins, "_active", [])  # no registries cached by earlier tests
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    clash = [line for line in out.splitlines() if "CLASH:" in line]
    assert len(clash) == 1 and "metric 'max_abs' is registered twice" in clash[0]
    assert "LENSBENCH_BLOCK_PLUGINS=example" in clash[0] and "LENSBENCH_BLOCK_PLUGINS=rival" in clash[0]
    assert "rival" in out and "example" in out and "low_rank" in out  # the rest is still listed
    assert "1 name(s) registered twice" in out
    with pytest.raises(LensbenchError, match="registered twice"):  # other commands still refuse
        build_registries(get_plugin_manager())


def test_an_unknown_name_with_no_near_match_asks_whether_its_plugin_is_installed():
    registries = testing.registries_for(plugin_module("my_plugin", metrics=[Spread("spread")]))
    with pytest.raises(LensbenchError) as far:
        registries.metrics.get("quantile_from_my_old_plugin", "model.init_args.statistics[0]")
    assert "is that plugin installed?" in str(far.value) and "known:" in str(far.value)
    with pytest.raises(LensbenchError) as near:  # a typo gets the close match only
        registries.metrics.get("sprad", "model.init_args.statistics[0]")
    assert "did you mean 'spread'" in str(near.value) and "installed" not in str(near.value)


def test_plugins_lists_a_named_module_that_cannot_import_and_the_rest(monkeypatch, capsys):
    monkeypatch.setattr("lensbench.plugins._active", [])  # registries kept by earlier tests left aside
    monkeypatch.setenv("LENSBENCH_PLUGINS", "no_such_module_here")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "modules named by LENSBENCH_PLUGINS:" in out and "  activation_norms" in out
    assert ("no_such_module_here    failed to import: ModuleNotFoundError: No module named 'no_such_module_here' "
            "(named by LENSBENCH_PLUGINS)") in out
