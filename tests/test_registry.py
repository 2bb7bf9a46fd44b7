"""Registries and the plugin manager: duplicates, types, close matches, installed plugins, env switches."""

from __future__ import annotations

import inspect
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from lensbench import hookspecs
from lensbench.analyses.activation_norms import ActivationNorms
from lensbench.analysis import Analysis
from lensbench.data.sources import DatasetEntry
from lensbench.errors import LensbenchError
from lensbench.hookspecs import hookimpl
from lensbench.metrics import L2Norm, TokenStatistic
from lensbench.plugins import active_registries, build_registries, get_plugin_manager, use_registries
from lensbench.registry import Registries, Registry

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = "lensbench-example==0.1.0"
BUILTIN = "lensbench (built-in)"
#: The memory interventions (lensbench.memory.interventions).
MEMORY = ("ablate_attention_head", "ablate_memory", "ablate_memory_keys", "ablate_memory_values", "ablate_mlp_neurons", "mask_memory_keys",
          "swap_memory_keys", "swap_memory_values")
ENV_VARS = ("LENSBENCH_DISABLE_PLUGINS", "LENSBENCH_BLOCK_PLUGINS", "LENSBENCH_TRACE_HOOKS")


@pytest.fixture(autouse=True)
def _plain_env(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


class Stat(TokenStatistic):
    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, hidden):
        return hidden.sum(-1)


def labels(registry: Registry) -> dict[str, str]:
    return {entry.name: entry.plugin for entry in registry}


# -- Registry ---------------------------------------------------------------------------------------

def test_duplicate_name_is_refused_and_names_both_plugins_and_their_entry_points():
    reg = Registry("metric", base=TokenStatistic, instances=True)
    first = Stat("spread")
    reg.add(first, "pkg-alpha==1.0", "alpha")
    with pytest.raises(LensbenchError) as err:
        reg.add(Stat("spread"), "pkg-beta==2.0", "beta")
    message = str(err.value)
    assert message == ("metric 'spread' is registered twice, by 'pkg-alpha==1.0' (entry point 'alpha') and by "
                       "'pkg-beta==2.0' (entry point 'beta'); rename one, uninstall one, or skip one with "
                       "LENSBENCH_BLOCK_PLUGINS=alpha (the first) or LENSBENCH_BLOCK_PLUGINS=beta (the second)")
    assert reg.get("spread") is first  # the first registration is kept
    assert reg.names() == ["spread"]
    assert [(e.plugin, e.entry_point) for e in reg] == [("pkg-alpha==1.0", "alpha")]


@pytest.mark.parametrize("first, second, fix", [
    ("alpha", None, "rename one, or skip the first with LENSBENCH_BLOCK_PLUGINS=alpha"),
    (None, "beta", "rename one, or skip the second with LENSBENCH_BLOCK_PLUGINS=beta"),
    (None, None, "rename one (neither is an installed entry point, so LENSBENCH_BLOCK_PLUGINS cannot skip it)"),
])
def test_duplicate_error_offers_only_the_blocks_that_work(first, second, fix):
    reg = Registry("metric")
    reg.add(Stat("spread"), "pkg-alpha==1.0", first)
    with pytest.raises(LensbenchError) as err:
        reg.add(Stat("spread"), "pkg-beta==2.0", second)
    message = str(err.value)
    assert message.endswith("; " + fix) and "\n" not in message
    assert ("(entry point 'alpha')" in message) is bool(first)
    assert ("(entry point 'beta')" in message) is bool(second)


def test_objects_not_of_the_base_class_are_refused():
    metrics = Registry("metric", base=TokenStatistic, instances=True)
    with pytest.raises(LensbenchError, match=r"metric 'fake' from plugin 'pkg-x' must be an instance of TokenStatistic"):
        metrics.add(SimpleNamespace(name="fake"), "pkg-x")

    class NotAnAnalysis:
        name = "imposter"

    analyses = Registry("analysis", base=Analysis)
    with pytest.raises(LensbenchError, match="must be a subclass of Analysis"):
        analyses.add(NotAnAnalysis, "pkg-y")
    datasets = Registry("dataset", base=DatasetEntry, instances=True)
    with pytest.raises(LensbenchError, match="must be an instance of DatasetEntry"):
        datasets.add(SimpleNamespace(name="texts", path=Path("x.txt")), "pkg-z")
    assert metrics.names() == analyses.names() == datasets.names() == []


@pytest.mark.parametrize("name", [None, "", 3])
def test_objects_without_a_string_name_are_refused(name):
    reg = Registry("metric")
    with pytest.raises(LensbenchError, match="has no `name` attribute"):
        reg.add(SimpleNamespace(name=name), "pkg")


def test_a_class_is_refused_where_an_instance_is_required(tiny_model):
    reg = Registry("metric", base=TokenStatistic, instances=True)
    with pytest.raises(LensbenchError, match="must be an instance of TokenStatistic"):
        reg.add(L2Norm, "pkg")
    classes = Registry("analysis", base=Analysis)
    with use_registries(active_registries()):
        instance = ActivationNorms(models=[str(tiny_model)])
    with pytest.raises(LensbenchError, match="must be a subclass of Analysis"):
        classes.add(instance, "pkg")


def test_unknown_name_suggests_a_close_match_and_names_the_field():
    reg = Registry("metric")
    reg.add(Stat("norm"), "a")
    reg.add(Stat("max_abs"), "b")
    with pytest.raises(LensbenchError) as err:
        reg.get("nrom", "model.init_args.statistics[0]")
    assert err.value.field == "model.init_args.statistics[0]"
    assert str(err.value).startswith("model.init_args.statistics[0]: unknown metric 'nrom'")
    assert "did you mean 'norm'" in str(err.value)
    with pytest.raises(LensbenchError) as far:
        reg.get("zzzzzz")
    assert "did you mean" not in str(far.value) and "known: max_abs, norm" in str(far.value)
    with pytest.raises(LensbenchError, match="none are registered"):
        Registry("perturbation").get("noise")


def test_iteration_and_names_are_sorted():
    reg = Registry("metric")
    for name in ("zeta", "alpha", "mid"):
        reg.add(Stat(name), "p")
    assert reg.names() == ["alpha", "mid", "zeta"]
    assert [e.name for e in reg] == ["alpha", "mid", "zeta"]
    assert "mid" in reg and "other" not in reg


# -- plugin manager and registries --------------------------------------------------------------------

def test_builtins_only_without_installed_plugins():
    reg = build_registries(get_plugin_manager(load_installed=False))
    assert reg.analyses.names() == ["activation_norms", "layer_sweep", "logit_lens", "loop_identity", "memory_ablation",
                                    "param_diff", "perturbation"]
    assert reg.analyses.get("activation_norms") is ActivationNorms
    assert reg.metrics.names() == ["norm"]
    assert isinstance(reg.metrics.get("norm"), L2Norm)
    assert reg.datasets.names() == ["cookie_theft", "dreams", "forget", "iq", "retain"]
    assert reg.perturbations.names() == sorted(["ablation", "add_gauss", "loop_layers", "mult_gauss", "uni_quant", *MEMORY])
    assert reg.synthetic_datasets.names() == ["digit_lookup", "hashhop", "synthetic_qa", "two_hop"]
    assert reg.mteb_tasks.names() == ["lensbench_sts", "lensbench_topics", "lensbench_topics_clustering"]
    assert "max_abs" not in reg.metrics and "capitals" not in reg.datasets and "low_rank" not in reg.perturbations
    for registry in reg.kinds().values():
        assert set(labels(registry).values()) <= {BUILTIN}
        assert {entry.entry_point for entry in registry} <= {None}
    assert reg.entry_points == {}
    for entry in reg.datasets:
        assert Path(entry.obj.path).is_file() and Path(entry.obj.path).read_text().strip()
    for entry in reg.mteb_tasks:
        assert (Path(entry.obj.path) / "task.json").is_file()


def test_installed_example_plugin_is_found_with_its_distribution_label():
    reg = build_registries(get_plugin_manager(load_installed=True))
    assert labels(reg.metrics) == {"norm": BUILTIN, "max_abs": EXAMPLE}
    assert labels(reg.datasets) == {"forget": BUILTIN, "retain": BUILTIN, "dreams": BUILTIN, "iq": BUILTIN,
                                    "cookie_theft": BUILTIN, "capitals": EXAMPLE}
    assert labels(reg.analyses) == {"activation_norms": BUILTIN, "loop_identity": BUILTIN, "param_diff": BUILTIN,
                                    "perturbation": BUILTIN, "memory_ablation": BUILTIN, "layer_sweep": BUILTIN,
                                    "logit_lens": BUILTIN}
    assert set(labels(reg.mteb_tasks).values()) == {BUILTIN}
    assert labels(reg.perturbations) == {"mult_gauss": BUILTIN, "add_gauss": BUILTIN, "ablation": BUILTIN,
                                         "uni_quant": BUILTIN, "loop_layers": BUILTIN, "low_rank": EXAMPLE,
                                         **{name: BUILTIN for name in MEMORY}}
    for registry in reg.kinds().values():
        for entry in registry:
            assert entry.entry_point == ("example" if entry.plugin == EXAMPLE else None), entry.name
    assert reg.entry_points == {"example": EXAMPLE}
    capitals = reg.datasets.get("capitals")
    assert capitals.text_field == "sentence" and Path(capitals.path).is_file()
    import torch

    hidden = torch.tensor([[3.0, -4.0, 1.0], [0.5, 0.25, -0.75]])
    assert torch.equal(reg.metrics.get("max_abs")(hidden), torch.tensor([4.0, 0.75]))


def test_default_loads_installed_plugins():
    assert "max_abs" in build_registries(get_plugin_manager()).metrics


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_disable_plugins_env_hides_installed_plugins(monkeypatch, value):
    monkeypatch.setenv("LENSBENCH_DISABLE_PLUGINS", value)
    reg = build_registries(get_plugin_manager())
    assert "max_abs" not in reg.metrics and "capitals" not in reg.datasets
    assert "norm" in reg.metrics and "forget" in reg.datasets


def test_disable_plugins_env_zero_keeps_them(monkeypatch):
    monkeypatch.setenv("LENSBENCH_DISABLE_PLUGINS", "0")
    assert "max_abs" in build_registries(get_plugin_manager()).metrics


@pytest.mark.parametrize("blocked, hidden, warned", [
    ("example", True, False), ("lensbench-example", True, False), ("Lensbench_Example", True, False),
    ("other, example", True, True), ("other", False, True), ("", False, False),
])
def test_block_plugins_env(monkeypatch, capsys, blocked, hidden, warned):
    monkeypatch.setenv("LENSBENCH_BLOCK_PLUGINS", blocked)
    reg = build_registries(get_plugin_manager())
    assert ("max_abs" not in reg.metrics) is hidden
    assert ("capitals" not in reg.datasets) is hidden
    assert ("example" not in reg.entry_points) is hidden
    assert "norm" in reg.metrics
    err = capsys.readouterr().err
    assert ("LENSBENCH_BLOCK_PLUGINS names 'other'" in err) is warned


def test_trace_hooks_prints_every_hook_call(monkeypatch, capsys):
    build_registries(get_plugin_manager())
    assert "[lensbench hook]" not in capsys.readouterr().err
    monkeypatch.setenv("LENSBENCH_TRACE_HOOKS", "1")
    build_registries(get_plugin_manager())
    err = capsys.readouterr().err
    assert f"[lensbench hook] lensbench_register_metrics <- {BUILTIN}: ['norm']" in err
    assert f"[lensbench hook] lensbench_register_metrics <- {EXAMPLE}: ['max_abs']" in err
    assert f"[lensbench hook] lensbench_register_datasets <- {EXAMPLE}: ['capitals']" in err
    assert f"[lensbench hook] lensbench_register_analyses <- {BUILTIN}: ['activation_norms']" in err
    assert f"[lensbench hook] lensbench_register_perturbations <- {EXAMPLE}: ['low_rank']" in err
    # One line per implementation: analyses 7 (built-in modules), perturbations 4 (lensbench.perturbations,
    # lensbench.models.looping, lensbench.memory.interventions, the example), metrics 2, datasets 2,
    # synthetic datasets 1, MTEB tasks 1.
    assert f"[lensbench hook] lensbench_register_synthetic_datasets <- {BUILTIN}: ['synthetic_qa', 'digit_lookup', 'two_hop', 'hashhop']" in err
    assert (f"[lensbench hook] lensbench_register_mteb_tasks <- {BUILTIN}: "
            "['lensbench_topics', 'lensbench_topics_clustering', 'lensbench_sts']") in err
    assert err.count("[lensbench hook]") == 17


def test_hook_results_are_filed_in_registration_order(monkeypatch, capsys):
    monkeypatch.setenv("LENSBENCH_TRACE_HOOKS", "1")
    build_registries(get_plugin_manager())
    err = capsys.readouterr().err
    assert err.index(f"metrics <- {BUILTIN}") < err.index(f"metrics <- {EXAMPLE}")


def _third_party(name: str, *metrics: TokenStatistic) -> types.ModuleType:
    module = types.ModuleType(name)

    @hookimpl
    def lensbench_register_metrics():
        return list(metrics)

    @hookimpl
    def lensbench_register_datasets():
        return None  # a hook may return nothing

    module.lensbench_register_metrics = lensbench_register_metrics
    module.lensbench_register_datasets = lensbench_register_datasets
    return module


def test_each_call_gives_a_fresh_plugin_manager():
    pm1, pm2 = get_plugin_manager(load_installed=False), get_plugin_manager(load_installed=False)
    assert pm1 is not pm2
    pm1.register(_third_party("thirdparty", Stat("spread")), name="thirdparty")
    assert "spread" in build_registries(pm1).metrics
    assert "spread" not in build_registries(pm2).metrics
    assert "spread" not in build_registries(get_plugin_manager(load_installed=False)).metrics


def test_in_process_third_party_plugin_is_registered_under_its_name():
    pm = get_plugin_manager(load_installed=False)
    pm.register(_third_party("thirdparty", Stat("spread")), name="thirdparty")
    reg = build_registries(pm)
    assert labels(reg.metrics) == {"norm": BUILTIN, "spread": "thirdparty"}
    assert reg.datasets.names() == ["cookie_theft", "dreams", "forget", "iq", "retain"]


def test_third_party_plugin_duplicating_a_builtin_is_an_error():
    pm = get_plugin_manager(load_installed=False)
    pm.register(_third_party("rogue_plugin", Stat("norm")), name="rogue_plugin")
    with pytest.raises(LensbenchError) as err:
        build_registries(pm)
    message = str(err.value)
    assert "'norm'" in message and BUILTIN in message and "rogue_plugin" in message


def test_third_party_plugin_duplicating_the_installed_plugin_is_an_error():
    pm = get_plugin_manager(load_installed=True)
    pm.register(_third_party("rogue_plugin", Stat("max_abs")), name="rogue_plugin")
    with pytest.raises(LensbenchError) as err:
        build_registries(pm)
    message = str(err.value)
    assert "'max_abs'" in message and "rogue_plugin" in message
    assert f"'{EXAMPLE}' (entry point 'example')" in message
    assert message.endswith("rename one, or skip the first with LENSBENCH_BLOCK_PLUGINS=example")


def test_use_registries_nests_and_restores():
    outer = Registries()
    inner = Registries()
    with use_registries(outer):
        assert active_registries() is outer
        with use_registries(inner):
            assert active_registries() is inner
        assert active_registries() is outer


# -- the hook surface is documented -------------------------------------------------------------------

HOOKS = sorted(name for name, obj in vars(hookspecs).items()
               if inspect.isfunction(obj) and hasattr(obj, "lensbench_spec"))


def test_hookspecs_match_the_registry_kinds():
    assert HOOKS, "no hookspecs found"
    assert set(HOOKS) == {f"lensbench_register_{kind}" for kind in Registries().kinds()}


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hookspec_has_a_docstring_and_is_documented(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook))
    assert doc and len(doc) > 20, f"{hook} has no docstring"
    page = ROOT / "docs" / "plugins.md"
    assert page.is_file(), f"{page} is missing"
    assert hook in page.read_text(encoding="utf-8"), f"{hook} is not documented in docs/plugins.md"


def test_a_plugin_with_a_misspelled_hook_is_refused(monkeypatch):
    import lensbench.plugins as plugins_mod

    class FakeManager:  # load_setuptools_entrypoints would register this module
        pass

    typo = types.ModuleType("typo_plugin")

    @hookimpl
    def lensbench_register_metric():  # missing the final "s"
        return []

    typo.lensbench_register_metric = lensbench_register_metric
    real = plugins_mod.pluggy.PluginManager.load_setuptools_entrypoints

    def fake_load(self, group, name=None):
        self.register(typo, name="typo_plugin")
        return real(self, group, name)

    monkeypatch.setattr(plugins_mod.pluggy.PluginManager, "load_setuptools_entrypoints", fake_load)
    with pytest.raises(LensbenchError) as err:
        get_plugin_manager(load_installed=True)
    message = str(err.value)
    assert "typo_plugin" in message and "lensbench_register_metric" in message and "\n" not in message
    assert "LENSBENCH_BLOCK_PLUGINS" not in message  # registered in-process: no entry point to block


# -- an installed plugin that fails to import ------------------------------------------------------

def write_broken_distribution(site: Path, error: str = "import lensbench_missing_dependency\n") -> Path:
    """``site``, a folder for sys.path holding the distribution ``lensbench-broken`` 0.1: its
    entry point ``broken`` (group ``lensbench``) names a module whose import runs ``error``."""
    info = site / "lensbench_broken-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lensbench-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lensbench]\nbroken = lensbench_broken_plugin\n")
    (site / "lensbench_broken_plugin.py").write_text(error)
    return site


BROKEN_LINE = ("plugin 'broken' (distribution lensbench-broken==0.1) failed to import: ModuleNotFoundError: No module "
               "named 'lensbench_missing_dependency'; fix or uninstall it, or set LENSBENCH_BLOCK_PLUGINS=broken to "
               "run without it")


def test_a_plugin_failing_to_import_is_one_line_naming_the_switch(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(write_broken_distribution(tmp_path)))
    with pytest.raises(LensbenchError) as err:
        get_plugin_manager()
    assert str(err.value) == BROKEN_LINE
    reg = build_registries(get_plugin_manager(keep_going=True))  # the others load
    assert reg.failed == {"broken": "ModuleNotFoundError: No module named 'lensbench_missing_dependency'"}
    assert reg.entry_points == {"example": EXAMPLE} and "max_abs" in reg.metrics
    monkeypatch.setenv("LENSBENCH_BLOCK_PLUGINS", "broken")
    reg = build_registries(get_plugin_manager())
    assert reg.failed == {} and reg.entry_points == {"example": EXAMPLE}


def test_a_plugin_with_a_syntax_error_names_it(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(write_broken_distribution(tmp_path, "def broken(:\n")))
    with pytest.raises(LensbenchError, match=r"plugin 'broken' \(distribution lensbench-broken==0.1\) failed to "
                                             r"import: SyntaxError: .*; fix or uninstall it, or set "
                                             r"LENSBENCH_BLOCK_PLUGINS=broken to run without it$"):
        get_plugin_manager()


def test_the_console_script_with_a_broken_plugin(tmp_path):
    """Through the real console script: ``lensbench plugins`` lists the rest and the failure; any
    other command is the one line; blocking the plugin runs without it."""
    from conftest import clean_env
    from helpers_cli import run_many

    env = clean_env(PYTHONPATH=str(write_broken_distribution(tmp_path / "site")))
    results = run_many({"plugins": (("plugins",), tmp_path, env),
                        "predict": (("predict", "--model", "activation_norms"), tmp_path, env),
                        "blocked": (("plugins",), tmp_path, {**env, "LENSBENCH_BLOCK_PLUGINS": "broken"})})
    listing = results["plugins"]
    assert listing.returncode == 0 and "Traceback" not in listing.stderr, listing.stderr[-2000:]
    rows = {line.split()[0]: line for line in listing.stdout.split("installed plugins")[1].splitlines()[1:]}
    assert "lensbench-broken==0.1" in rows["broken"]
    assert ("failed to import: ModuleNotFoundError: No module named 'lensbench_missing_dependency' "
            "(LENSBENCH_BLOCK_PLUGINS=broken skips it)") in rows["broken"]
    assert rows["example"].endswith("loaded") and "max_abs" in listing.stdout
    predict = results["predict"]
    assert predict.returncode == 1 and predict.stderr.strip() == f"lensbench: error: {BROKEN_LINE}"
    blocked = results["blocked"]
    assert blocked.returncode == 0 and blocked.stderr == "", blocked.stderr[-2000:]
    assert "not loaded (LENSBENCH_BLOCK_PLUGINS)" in blocked.stdout
