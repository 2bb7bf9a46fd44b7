"""docs/plugins.md's ``pyproject.toml`` snippet installs: a package built from it and the doc's
``plugin.py`` is pip-installed (offline, into a target folder) with its entry point and data file."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

from conftest import ROOT

DOC = ROOT / "docs" / "plugins.md"
EXAMPLE = ROOT / "plugins" / "lensbench-example" / "pyproject.toml"


def doc_block(caption: str, language: str) -> str:
    """The code block that follows the line starting with the backticked ``caption``."""
    text = DOC.read_text(encoding="utf-8")
    found = re.search(rf"^`{re.escape(caption)}`[^\n]*\n(?:[^\n]+\n)*?\n```{language}\n(.*?)^```$", text, re.M | re.S)
    assert found, f"docs/plugins.md has no {language} block captioned {caption}"
    return found.group(1)


def build(tmp_path, pyproject: str):
    """A source tree from ``pyproject`` and the doc's plugin.py (plus a data file), pip-installed
    into a target folder with no index and no build isolation (no network): the target."""
    src = tmp_path / "src_tree"
    package = src / "src" / "lensbench_example"
    package.mkdir(parents=True)
    (src / "pyproject.toml").write_text(pyproject, encoding="utf-8")
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "plugin.py").write_text(doc_block("src/lensbench_example/plugin.py", "python"), encoding="utf-8")
    (package / "capitals.jsonl").write_text('{"text": "Paris is the capital of France."}\n', encoding="utf-8")
    target = tmp_path / "target"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation",
                             "--quiet", "--target", str(target), str(src)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return target


def test_the_snippet_is_the_example_packages_pyproject():
    assert tomllib.loads(doc_block("pyproject.toml", "toml")) == tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))


def test_the_snippet_installs_with_its_entry_point_and_data(tmp_path):
    target = build(tmp_path, doc_block("pyproject.toml", "toml"))
    assert (target / "lensbench_example" / "plugin.py").is_file()
    assert (target / "lensbench_example" / "capitals.jsonl").is_file()
    # what lensbench's plugin manager reads: the lensbench entry-point group of the installed distribution
    probe = ("import sys; from importlib.metadata import distribution; "
             f"sys.path.insert(0, {str(target)!r}); d = distribution('lensbench-example'); "
             "print(d.version); print([(e.group, e.name, e.value) for e in d.entry_points])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "0.1.0"
    assert "('lensbench', 'example', 'lensbench_example.plugin')" in out[1]
    # the installed plugin module imports and registers the doc's statistic
    probe = (f"import sys; sys.path.insert(0, {str(target)!r}); import lensbench_example.plugin as p; "
             "print([m.name for m in p.lensbench_register_metrics()])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "max_abs" in out


def test_without_package_data_the_dataset_is_not_installed(tmp_path):
    """The doc says the package-data table is what ships a .jsonl: without it the file is missing."""
    snippet = doc_block("pyproject.toml", "toml")
    bare = re.sub(r"\[tool\.setuptools\.package-data\]\n[^\[]*", "", snippet)
    assert bare != snippet
    target = build(tmp_path, bare)
    assert (target / "lensbench_example" / "plugin.py").is_file()
    assert not (target / "lensbench_example" / "capitals.jsonl").exists()


def test_the_snippet_without_a_version_does_not_install(tmp_path):
    """The failure the old snippet had: setuptools needs ``project.version``."""
    snippet = re.sub(r"^version = .*\n", "", doc_block("pyproject.toml", "toml"), flags=re.M)
    src = tmp_path / "bare"
    (src / "src" / "lensbench_example").mkdir(parents=True)
    (src / "pyproject.toml").write_text(snippet, encoding="utf-8")
    (src / "src" / "lensbench_example" / "__init__.py").write_text("", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation",
                             "--quiet", "--target", str(tmp_path / "t"), str(src)], capture_output=True, text=True)
    assert result.returncode != 0 and "version" in (result.stderr + result.stdout)
