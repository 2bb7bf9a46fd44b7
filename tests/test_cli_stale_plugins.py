"""Rerunning a run folder's config.yaml after the plugin that provided its analysis (or data module,
or callback) was uninstalled: one line naming the class path's field and asking whether the plugin
is installed, the folder untouched. And ``main([...])`` in process (tests, notebooks) without
Lightning's warning about ``args`` beside ``sys.argv``."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest
from helpers_cli import last_line, make_workdir, snapshot

from lensbench.cli import main
from lensbench.testing import use_plugins

PLUGIN = '''\
from lensbench.analyses.activation_norms import ActivationNorms
from lensbench.data.modules import TextDataModule
from lensbench.hookspecs import hookimpl


class StaleNorms(ActivationNorms):
    """activation norms, from a plugin"""

    name = "stale_norms"


class StaleTexts(TextDataModule):
    """text files, from a plugin"""


@hookimpl
def lensbench_register_analyses():
    return [StaleNorms]
'''

#: What the warning of Lightning that ``main([...])`` must not give starts with.
ARGS_WARNING = "LightningCLI's args parameter"
INSTALLED = "is the plugin that provides it installed? (`lensbench plugins` lists what is)"


def args_warnings(record) -> list[str]:
    return [str(w.message) for w in record if ARGS_WARNING in str(w.message)]


@pytest.fixture
def host_argv(monkeypatch):
    """Command-line arguments of the process calling ``main([...])``, as pytest's or a notebook kernel's."""
    argv = ["ipykernel_launcher.py", "-f", "kernel.json"]
    monkeypatch.setattr(sys, "argv", argv)
    return argv


def test_a_run_of_an_uninstalled_plugin_is_refused_in_one_line(tmp_path, tiny_model, monkeypatch, capsys, host_argv):
    folder = make_workdir(tmp_path / "work", tiny_model)
    plugin_dir = tmp_path / "site"
    plugin_dir.mkdir()
    (plugin_dir / "stale_plugin.py").write_text(PLUGIN)
    (folder / "stale.yaml").write_text((folder / "run.yaml").read_text()
                                       .replace("class_path: activation_norms", "class_path: stale_norms")
                                       .replace("lensbench.data.modules.TextDataModule", "stale_plugin.StaleTexts"))
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(plugin_dir))
    plugin = importlib.import_module("stale_plugin")
    with use_plugins(plugin), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert main(["predict", "--config", "stale.yaml"]) == 0
    assert args_warnings(record) == []  # main's own arguments, though the process has others
    assert sys.argv is host_argv and sys.argv == ["ipykernel_launcher.py", "-f", "kernel.json"]
    run_dir = folder / "outputs" / "stale_norms" / "stale"
    stored = (run_dir / "config.yaml").read_text()
    assert "class_path: stale_plugin.StaleNorms" in stored and "class_path: stale_plugin.StaleTexts" in stored

    # The plugin is uninstalled.
    sys.path.remove(str(plugin_dir))
    monkeypatch.delitem(sys.modules, "stale_plugin")
    importlib.invalidate_caches()
    before = snapshot(run_dir)
    capsys.readouterr()
    assert main(["predict", "--config", str(run_dir / "config.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        ("lensbench: error: model.class_path: `stale_plugin.StaleNorms` cannot be imported (No module named "
         f"'stale_plugin'): {INSTALLED}")]
    assert snapshot(run_dir) == before

    # Its data module alone (the analysis edited to a built-in one): the field is data.class_path.
    (folder / "edited.yaml").write_text(stored.replace("stale_plugin.StaleNorms", "activation_norms"))
    assert main(["predict", "--config", "edited.yaml"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        ("lensbench: error: data.class_path: `stale_plugin.StaleTexts` cannot be imported (No module named "
         f"'stale_plugin'): {INSTALLED}")]
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("given, field, class_path, reason", [
    (["--trainer.callbacks", "[{class_path: gone_plugin.Callback}]"], "trainer.callbacks[0].class_path",
     "gone_plugin.Callback", f"No module named 'gone_plugin'): {INSTALLED}"),
    (["--model.init_args.models", "[tiny, {class_path: gone_plugin.Spec}]"], "model.init_args.models[1].class_path",
     "gone_plugin.Spec", f"No module named 'gone_plugin'): {INSTALLED}"),
    (["--data", "json.NoSuchData"], "data.class_path", "json.NoSuchData",
     ("module 'json' has no attribute 'NoSuchData'): is the plugin that provides it installed, in a version that "
      "has it? (`lensbench plugins` lists what is)")),
    (["--data", "lensbench.data.modules.TextDataModul"], "data.class_path", "lensbench.data.modules.TextDataModul",
     ("module 'lensbench.data.modules' has no attribute 'TextDataModul'): lensbench has no such class; check the "
      "class path's spelling")),
])
def test_a_class_path_that_cannot_be_imported_names_its_field(given, field, class_path, reason, workdir, monkeypatch,
                                                              capsys, host_argv):
    monkeypatch.chdir(workdir)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert main(["predict", "--config", "run.yaml", *given]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"lensbench: error: {field}: `{class_path}` cannot be imported ({reason}"]
    assert args_warnings(record) == []
    assert not (workdir / "outputs").exists()


def test_a_plugin_module_missing_a_dependency_says_which(workdir, tmp_path, monkeypatch, capsys):
    (tmp_path / "needy_plugin.py").write_text("import lensbench_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(workdir)
    assert main(["predict", "--config", "run.yaml", "--data", "needy_plugin.Data"]) == 1
    assert last_line(capsys.readouterr().err) == (
        "lensbench: error: data.class_path: `needy_plugin.Data` cannot be imported (No module named "
        "'lensbench_no_such_dependency'): its module needs 'lensbench_no_such_dependency', which is not installed; "
        "install it")
