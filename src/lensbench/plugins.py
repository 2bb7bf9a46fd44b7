"""The plugin manager and the registries built from it.

Nothing happens at import: ``get_plugin_manager()`` builds a fresh manager each call, and
``build_registries()`` turns its hook results into typed registries.

Environment variables:

- ``LENSBENCH_DISABLE_PLUGINS=1``: load only built-in plugins, none from installed packages.
- ``LENSBENCH_BLOCK_PLUGINS=a,b``: skip the installed plugins (entry-point names) listed.
- ``LENSBENCH_TRACE_HOOKS=1``: print every hook call and what each plugin returned to stderr.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from typing import Iterator

import pluggy

from . import hookspecs
from .registry import Registries

ENTRY_POINT_GROUP = "lensbench"

#: Modules holding the built-in hook implementations, registered exactly like third-party ones.
BUILTIN = (
    "lensbench.metrics",
    "lensbench.perturbations",
    "lensbench.data.sources",
    "lensbench.analyses.activation_norms",
    "lensbench.analyses.param_diff",
    "lensbench.analyses.perturbation",
)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def get_plugin_manager(load_installed: bool | None = None) -> pluggy.PluginManager:
    """A new plugin manager with the built-in plugins and, unless disabled, installed ones."""
    pm = pluggy.PluginManager("lensbench")
    pm.add_hookspecs(hookspecs)
    for modname in BUILTIN:
        pm.register(importlib.import_module(modname), name=modname)
    if load_installed is None:
        load_installed = not _truthy(os.environ.get("LENSBENCH_DISABLE_PLUGINS"))
    if load_installed:
        for name in filter(None, os.environ.get("LENSBENCH_BLOCK_PLUGINS", "").split(",")):
            pm.set_blocked(name.strip())
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    try:
        pm.check_pending()  # a misspelled hook in a plugin is an error, not silently ignored
    except pluggy.PluginValidationError as exc:
        from .errors import LensbenchError

        raise LensbenchError(
            f"plugin {pm.get_name(exc.plugin)!r} implements an unknown hook ({str(exc).splitlines()[0]}); "
            "fix the hook name or block the plugin with LENSBENCH_BLOCK_PLUGINS"
        ) from None
    return pm


def plugin_label(pm: pluggy.PluginManager, plugin: object) -> str:
    """The distribution that installed ``plugin`` (``name==version``), else its module name."""
    for registered, dist in pm.list_plugin_distinfo():
        if registered is plugin:
            return f"{dist.project_name}=={dist.version}"
    name = pm.get_name(plugin) or repr(plugin)
    return "lensbench (built-in)" if name.startswith("lensbench.") else name


def build_registries(pm: pluggy.PluginManager) -> Registries:
    """Call every ``lensbench_register_*`` hook and file the results by kind."""
    from .analysis import Analysis
    from .data.sources import DatasetEntry
    from .metrics import TokenStatistic
    from .state import Transform

    reg = Registries()
    reg.analyses.base = Analysis
    reg.perturbations.base = Transform
    reg.metrics.base = TokenStatistic
    reg.datasets.base = DatasetEntry
    trace = _truthy(os.environ.get("LENSBENCH_TRACE_HOOKS"))
    for kind, registry in reg.kinds().items():
        caller = getattr(pm.hook, f"lensbench_register_{kind}")
        for impl in caller.get_hookimpls():  # registration order
            result = impl.function() or []
            label = plugin_label(pm, impl.plugin)
            if trace:
                print(f"[lensbench hook] lensbench_register_{kind} <- {label}: "
                      f"{[getattr(o, 'name', o) for o in result]}", file=sys.stderr)
            for obj in result:
                registry.add(obj, label)
    return reg


_active: list[Registries] = []


@contextlib.contextmanager
def use_registries(registries: Registries) -> Iterator[Registries]:
    """Make ``registries`` the ones ``active_registries()`` returns inside the block."""
    _active.append(registries)
    try:
        yield registries
    finally:
        _active.pop()


def active_registries() -> Registries:
    """The registries in use: those of the innermost ``use_registries`` block, else fresh ones."""
    if not _active:
        _active.append(build_registries(get_plugin_manager()))
    return _active[-1]
