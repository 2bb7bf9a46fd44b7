"""The layering of src/lensbench: import-linter's contracts in pyproject.toml ([tool.importlinter]),
no import cycle among lensbench modules (function-level imports count), every module placed in a
layer, and docs/architecture.md naming every module in its "Layers" section."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp", reason="pip install import-linter (the test extra)")

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: import-linter brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lensbench"
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` over the package found on ``pythonpath``, with ``cwd``'s pyproject.toml."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=cwd, env=env, capture_output=True,
                          text=True)


def graph():
    return grimp.build_graph("lensbench", cache_dir=None)


def modules() -> list[str]:
    """Every lensbench module that is not a package holding others."""
    g = graph()
    return sorted(m for m in g.modules if m != "lensbench" and not g.find_children(m))


def _named(contract: dict) -> list[str]:
    names = []
    for key in ("layers", "modules", "source_modules", "forbidden_modules"):
        for entry in contract.get(key, []):
            names += [n.strip() for n in re.split(r"[|:]", entry) if n.strip()]
    return names


def test_the_contracts_hold():
    done = lint_imports(ROOT, ROOT / "src")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_a_planted_upward_import_breaks_the_contracts(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "src" / "lensbench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    anatomy = tmp_path / "src" / "lensbench" / "models" / "anatomy.py"
    anatomy.write_text(anatomy.read_text() + "\n\ndef _planted():\n    from lensbench import analysis  # noqa\n")
    done = lint_imports(tmp_path, tmp_path / "src")
    assert done.returncode != 0
    assert "lensbench.models.anatomy -> lensbench.analysis" in done.stdout, done.stdout[-4000:]


def test_every_module_has_a_layer():
    named = {n for contract in CONFIG["contracts"] for n in _named(contract)}
    placed = [m for m in modules() if any(m == n or m.startswith(n.rstrip("*").rstrip(".") + ".") for n in named)]
    assert sorted(set(modules()) - set(placed)) == []


def cycle_edges(g) -> list[str]:
    """Each direct import ``a -> b`` of ``g`` (function-level ones included) from which ``a`` is
    reached again."""
    edges = []
    for a in sorted(g.modules):
        for b in sorted(g.find_modules_directly_imported_by(a)):
            if g.chain_exists(importer=b, imported=a):
                lines = ", ".join(str(d["line_number"]) for d in g.get_import_details(importer=a, imported=b))
                edges.append(f"{a} -> {b} (l.{lines})")
    return edges


def test_no_import_cycle():
    """No import cycle, function-level imports and ``if TYPE_CHECKING:`` imports included."""
    assert cycle_edges(grimp.build_graph("lensbench", cache_dir=None)) == []


def test_a_planted_cycle_is_found():
    g = graph()
    g.add_import(importer="lensbench.errors", imported="lensbench.run_folders")
    assert "lensbench.errors -> lensbench.run_folders (l.)" in cycle_edges(g)


def test_the_architecture_doc_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    found = re.search(r"^## Layers\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert found, "docs/architecture.md has no '## Layers' section"
    files = [m.removeprefix("lensbench.").replace(".", "/") + ".py" for m in modules()]
    assert [f for f in files if f"`{f}`" not in found.group(1)] == []
