"""Typed registries built from hook results: no duplicates, close-match hints for unknown names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, Iterator, TypeVar

from .errors import LensbenchError, did_you_mean

T = TypeVar("T")


@dataclass
class Entry(Generic[T]):
    name: str
    obj: T
    plugin: str  # distribution (``name==version``) or module that registered it
    entry_point: str | None = None  # the installed plugin's entry-point name (what LENSBENCH_BLOCK_PLUGINS takes)


def _who(plugin: str, entry_point: str | None) -> str:
    return f"{plugin!r} (entry point {entry_point!r})" if entry_point else repr(plugin)


def _duplicate_fix(first: str | None, second: str | None) -> str:
    """How to resolve a name clash between two plugins, given their entry-point names (None: not blockable)."""
    if first and second:
        return (f"rename one, uninstall one, or skip one with LENSBENCH_BLOCK_PLUGINS={first} (the first) "
                f"or LENSBENCH_BLOCK_PLUGINS={second} (the second)")
    if first or second:
        which = "first" if first else "second"
        return f"rename one, or skip the {which} with LENSBENCH_BLOCK_PLUGINS={first or second}"
    return "rename one (neither is an installed entry point, so LENSBENCH_BLOCK_PLUGINS cannot skip it)"


class Registry(Generic[T]):
    """Name -> object for one kind of plugin (``kind`` is used in messages).

    ``get(name, field)`` returns the object or raises ``LensbenchError`` (close matches, ``field``
    the config path); ``name in registry``; ``names()`` and iteration (``Entry``: ``name``, ``obj``,
    ``plugin``, ``entry_point``) are sorted by name; ``add`` refuses duplicates and wrong types.
    """

    def __init__(self, kind: str, base: type | None = None, instances: bool = False) -> None:
        self.kind = kind
        self.base = base
        self.instances = instances  # True: entries are instances of ``base``; False: subclasses
        self._entries: dict[str, Entry[T]] = {}

    def add(self, obj: T, plugin: str, entry_point: str | None = None) -> None:
        """File ``obj`` under its ``name``; ``plugin`` labels it in messages and listings, and
        ``entry_point`` (an installed plugin's entry-point name) is what blocks it."""
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not name:
            raise LensbenchError(f"{self.kind} {obj!r} from plugin {plugin!r} has no `name` attribute")
        if self.base is not None:
            if self.instances:
                ok, what = isinstance(obj, self.base), f"an instance of {self.base.__name__}"
            else:
                ok, what = isinstance(obj, type) and issubclass(obj, self.base), f"a subclass of {self.base.__name__}"
            if not ok:
                raise LensbenchError(f"{self.kind} {name!r} from plugin {plugin!r} must be {what}")
        if name in self._entries:
            other = self._entries[name]
            raise LensbenchError(
                f"{self.kind} {name!r} is registered twice, by {_who(other.plugin, other.entry_point)} and by "
                f"{_who(plugin, entry_point)}; {_duplicate_fix(other.entry_point, entry_point)}"
            )
        self._entries[name] = Entry(name, obj, plugin, entry_point)

    def get(self, name: str, field: str | None = None) -> T:
        """The object registered as ``name``; else ``LensbenchError`` naming ``field`` (a config path)."""
        try:
            return self._entries[name].obj
        except KeyError:
            hint = did_you_mean(name, list(self._entries))
            if not hint.startswith("did you mean"):  # no near name: maybe its plugin is gone
                hint += "; if a plugin provides it, is that plugin installed? (`lensbench plugins` lists what is)"
            raise LensbenchError(f"unknown {self.kind} {name!r}; {hint}", field) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        return sorted(self._entries)


@dataclass
class Registries:
    """Every registry, built from one plugin manager by ``lensbench.plugins.build_registries``."""

    analyses: Registry[type] = field(default_factory=lambda: Registry("analysis"))
    perturbations: Registry[type] = field(default_factory=lambda: Registry("perturbation"))
    metrics: Registry[Any] = field(default_factory=lambda: Registry("metric", instances=True))
    datasets: Registry[Any] = field(default_factory=lambda: Registry("dataset", instances=True))
    synthetic_datasets: Registry[Any] = field(default_factory=lambda: Registry("synthetic dataset", instances=True))
    mteb_tasks: Registry[Any] = field(default_factory=lambda: Registry("MTEB task", instances=True))
    entry_points: dict[str, str] = field(default_factory=dict)
    """The installed plugins loaded into these registries: entry-point name -> ``distribution==version``."""
    failed: dict[str, str] = field(default_factory=dict)
    """Installed plugins left out because their import failed: entry-point name -> the first line of the error."""
    clashes: list[tuple[str, str, str]] = field(default_factory=list)
    """Names registered twice, kept out (``build_registries(keep_going=True)``, for ``lensbench
    plugins``): (kind, name, the one-line error every other command gives)."""

    def kinds(self) -> dict[str, Registry]:
        return {
            "analyses": self.analyses,
            "perturbations": self.perturbations,
            "metrics": self.metrics,
            "datasets": self.datasets,
            "synthetic_datasets": self.synthetic_datasets,
            "mteb_tasks": self.mteb_tasks,
        }
