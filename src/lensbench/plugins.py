"""The plugin manager and the registries built from it.

Nothing happens at import: ``get_plugin_manager()`` builds a fresh manager each call, and
``build_registries()`` turns its hook results into typed registries.

Environment variables:

- ``LENSBENCH_DISABLE_PLUGIN_AUTOLOAD=1`` (like pytest's ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``), or its
  older name ``LENSBENCH_DISABLE_PLUGINS=1``: load only built-in plugins, none from installed
  packages' entry points; ``lensbench plugins`` says which variable turned loading off.
- ``LENSBENCH_BLOCK_PLUGINS=a,b``: skip the installed plugins listed, each by its entry-point name
  or its distribution name (a name matching neither is reported on stderr).

An installed plugin that fails to import (a missing dependency, a syntax error) stops every command
with one line naming it and the ``LENSBENCH_BLOCK_PLUGINS`` value that skips it; ``lensbench
plugins`` lists the others and shows it as "failed to import".
- ``LENSBENCH_TRACE_HOOKS=1``: print every hook call and what each plugin returned to stderr.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from typing import Iterator

import pluggy

from . import hookspecs
from .errors import LensbenchError
from .registry import Registries

ENTRY_POINT_GROUP = "lensbench"

#: Modules holding the built-in hook implementations, registered exactly like third-party ones.
BUILTIN = (
    "lensbench.metrics",
    "lensbench.perturbations",
    "lensbench.models.looping",
    "lensbench.memory.interventions",
    "lensbench.data.sources",
    "lensbench.synthetic.datasets",
    "lensbench.layer_sweep.tasks",
    "lensbench.analyses.activation_norms",
    "lensbench.analyses.param_diff",
    "lensbench.analyses.perturbation",
    "lensbench.analyses.loop_identity",
    "lensbench.analyses.memory_ablation",
    "lensbench.analyses.layer_sweep",
    "lensbench.analyses.logit_lens",
)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


#: Environment variables that turn off loading installed plugins from entry points (either).
AUTOLOAD_OFF = ("LENSBENCH_DISABLE_PLUGIN_AUTOLOAD", "LENSBENCH_DISABLE_PLUGINS")


def autoload_disabled_by() -> str | None:
    """The variable of ``AUTOLOAD_OFF`` set (to 1, true, yes or on) in the environment, else None."""
    return next((name for name in AUTOLOAD_OFF if _truthy(os.environ.get(name))), None)


#: Importable modules to load as plugins in every process of a run (DDP ranks inherit the
#: environment), comma-separated, like pytest's ``-p``: a plugin tried before it is packaged.
MODULES_VAR = "LENSBENCH_PLUGINS"


def requested_modules() -> list[str]:
    """The module names ``LENSBENCH_PLUGINS`` lists, in order, without repeats."""
    names = (n.strip() for n in os.environ.get(MODULES_VAR, "").split(","))
    return list(dict.fromkeys(n for n in names if n))


def _load_requested(pm: pluggy.PluginManager, keep_going: bool = False) -> None:
    """Register each module ``LENSBENCH_PLUGINS`` names (unless already registered, from its entry
    point say); one that cannot be imported is one line naming it (with ``keep_going``, left in
    ``pm.lensbench_failed`` for ``lensbench plugins`` to list, the others loaded)."""
    from .errors import LensbenchError

    for name in requested_modules():
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any error raised while importing the plugin
            if keep_going:
                pm.lensbench_failed[name] = f"{_first_line(exc)} (named by {MODULES_VAR})"
                continue
            raise LensbenchError(f"{MODULES_VAR} names {name!r}, which cannot be imported ({_first_line(exc)}); put "
                                 f"its folder on PYTHONPATH, or remove it from {MODULES_VAR}") from None
        if not pm.is_registered(module):
            pm.register(module, name=name)


def installed_plugins() -> dict[str, str]:
    """Entry-point name -> distribution (``name==version``) of every installed plugin (group ``lensbench``)."""
    from importlib.metadata import entry_points

    found: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        found.setdefault(ep.name, f"{dist.name}=={dist.version}" if dist is not None else "?")
    return found


def _canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): case and runs of -_. do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def blocked_plugins(value: str, installed: dict[str, str]) -> tuple[list[str], list[str]]:
    """The entry-point names that ``LENSBENCH_BLOCK_PLUGINS=value`` blocks, and the listed names
    matching no installed entry point or distribution. ``installed`` is ``installed_plugins()``."""
    blocked: list[str] = []
    unknown: list[str] = []
    for name in (n.strip() for n in value.split(",")):
        if not name:
            continue
        hits = [ep for ep, dist in installed.items()
                if ep == name or _canonical(dist.split("==")[0]) == _canonical(name)]
        blocked += [ep for ep in hits if ep not in blocked]
        if not hits:
            unknown.append(name)
    return blocked, unknown


def describe_installed(installed: dict[str, str]) -> str:
    """``example (lensbench-example==0.1.0), ...``, or ``none``."""
    return ", ".join(f"{ep} ({dist})" for ep, dist in sorted(installed.items())) or "none"


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def failed_plugin_message(name: str, dist: str, reason: str) -> str:
    """The one line for an installed plugin whose import failed, naming the switch that skips it."""
    return (f"plugin {name!r} (distribution {dist}) failed to import: {reason}; fix or uninstall it, or set "
            f"LENSBENCH_BLOCK_PLUGINS={name} to run without it")


def _load_installed(pm: pluggy.PluginManager, installed: dict[str, str]) -> dict[str, str]:
    """Load every installed plugin not blocked, one entry point at a time, so that one failing to
    import (a missing dependency, a syntax error) leaves the others loaded; returns entry-point
    name -> the first line of each failure."""
    from importlib.metadata import entry_points

    failed: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in failed or pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            ep.load()  # what pluggy's loading does first; a failure here is the plugin's own
        except Exception as exc:  # noqa: BLE001 - any error raised while importing the plugin
            failed[ep.name] = _first_line(exc)
            continue
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep.name)  # registered with its distribution
    return failed


def get_plugin_manager(load_installed: bool | None = None, keep_going: bool = False) -> pluggy.PluginManager:
    """A new plugin manager with the built-in plugins and, unless disabled, installed ones.

    An installed plugin that fails to import is a ``LensbenchError`` naming it and the
    ``LENSBENCH_BLOCK_PLUGINS`` value that skips it; with ``keep_going`` the others are loaded and the
    failures are left in ``pm.lensbench_failed`` (entry-point name -> first line of the error), for
    ``lensbench plugins`` to list."""
    pm = pluggy.PluginManager("lensbench")
    pm.lensbench_failed = {}
    pm.add_hookspecs(hookspecs)
    for modname in BUILTIN:
        pm.register(importlib.import_module(modname), name=modname)
    if load_installed is None:
        load_installed = autoload_disabled_by() is None
    if load_installed:
        installed = installed_plugins()
        blocked, unknown = blocked_plugins(os.environ.get("LENSBENCH_BLOCK_PLUGINS", ""), installed)
        for name in blocked:
            pm.set_blocked(name)
        if unknown:
            which = "which matches" if len(unknown) == 1 else "which match"
            print(f"lensbench: warning: LENSBENCH_BLOCK_PLUGINS names {', '.join(map(repr, unknown))}, {which} no "
                  f"installed plugin's entry point or distribution; installed: {describe_installed(installed)}",
                  file=sys.stderr)
        pm.lensbench_failed = _load_installed(pm, installed)
        if pm.lensbench_failed and not keep_going:
            from .errors import LensbenchError

            name, reason = next(iter(pm.lensbench_failed.items()))
            raise LensbenchError(failed_plugin_message(name, installed.get(name, "?"), reason))
    _load_requested(pm, keep_going)
    try:
        pm.check_pending()  # a misspelled hook in a plugin is an error, not silently ignored
    except pluggy.PluginValidationError as exc:
        from .errors import LensbenchError

        entry_point = entry_point_name(pm, exc.plugin)
        block = f" or block the plugin with LENSBENCH_BLOCK_PLUGINS={entry_point}" if entry_point else ""
        raise LensbenchError(
            f"plugin {pm.get_name(exc.plugin)!r} implements an unknown hook ({str(exc).splitlines()[0]}); "
            f"fix the hook name{block}"
        ) from None
    return pm


def plugin_label(pm: pluggy.PluginManager, plugin: object) -> str:
    """The distribution that installed ``plugin`` (``name==version``), else its module name."""
    for registered, dist in pm.list_plugin_distinfo():
        if registered is plugin:
            return f"{dist.project_name}=={dist.version}"
    name = pm.get_name(plugin) or repr(plugin)
    return "lensbench (built-in)" if name.startswith("lensbench.") else name


def entry_point_name(pm: pluggy.PluginManager, plugin: object) -> str | None:
    """The entry-point name ``plugin`` was loaded under (what blocks it), else None (built-in or
    registered in-process)."""
    if any(registered is plugin for registered, _ in pm.list_plugin_distinfo()):
        return pm.get_name(plugin)
    return None


def build_registries(pm: pluggy.PluginManager, keep_going: bool = False) -> Registries:
    """Call every ``lensbench_register_*`` hook and file the results by kind. ``keep_going``: a
    name registered twice keeps its first registration and is listed in ``clashes`` (for
    ``lensbench plugins``) instead of refused."""
    from .analysis import Analysis
    from .data.sources import DatasetEntry
    from .layer_sweep.tasks import TaskEntry
    from .metrics import TokenStatistic
    from .state import Transform
    from .synthetic.datasets import SyntheticDataset

    reg = Registries()
    reg.entry_points = {pm.get_name(plugin): f"{dist.project_name}=={dist.version}"
                        for plugin, dist in pm.list_plugin_distinfo()}
    reg.failed = dict(getattr(pm, "lensbench_failed", {}))
    reg.analyses.base = Analysis
    reg.perturbations.base = Transform
    reg.metrics.base = TokenStatistic
    reg.datasets.base = DatasetEntry
    reg.synthetic_datasets.base = SyntheticDataset
    reg.mteb_tasks.base = TaskEntry
    trace = _truthy(os.environ.get("LENSBENCH_TRACE_HOOKS"))
    for kind, registry in reg.kinds().items():
        caller = getattr(pm.hook, f"lensbench_register_{kind}")
        for impl in caller.get_hookimpls():  # registration order
            result = impl.function() or []
            label = plugin_label(pm, impl.plugin)
            entry_point = entry_point_name(pm, impl.plugin)
            if trace:
                print(f"[lensbench hook] lensbench_register_{kind} <- {label}: "
                      f"{[getattr(o, 'name', o) for o in result]}", file=sys.stderr)
            for obj in result:
                name = getattr(obj, "name", None)
                if keep_going and isinstance(name, str) and name in registry:
                    try:
                        registry.add(obj, label, entry_point)
                    except LensbenchError as exc:
                        reg.clashes.append((kind, name, exc.message))
                    continue
                registry.add(obj, label, entry_point)
    return reg


_active: list[Registries] = []


@contextlib.contextmanager
def use_registries(registries: Registries) -> Iterator[Registries]:
    """Make ``registries`` the ones ``active_registries()`` returns inside the block, and the ones
    every analysis built inside it holds (``lensbench.analysis.hand_registries``)."""
    from .analysis import hand_registries

    _active.append(registries)
    try:
        with hand_registries(registries):
            yield registries
    finally:
        _active.pop()


def active_registries(keep_going: bool = False) -> Registries:
    """The registries in use: those of the innermost ``use_registries`` block, else fresh ones.
    ``keep_going``: an installed plugin failing to import is left out and listed in ``failed``,
    and a name registered twice is listed in ``clashes`` (for ``lensbench plugins``), instead of refused; such registries are not kept as the active ones."""
    if not _active and keep_going:
        return build_registries(get_plugin_manager(keep_going=True), keep_going=True)
    if not _active:
        _active.append(build_registries(get_plugin_manager()))
    return _active[-1]
