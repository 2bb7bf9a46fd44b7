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
    plugin: str  # distribution (package) or module that registered it


class Registry(Generic[T]):
    """Name -> object for one kind of plugin (``kind`` is used in messages)."""

    def __init__(self, kind: str, base: type | None = None, instances: bool = False) -> None:
        self.kind = kind
        self.base = base
        self.instances = instances  # True: entries are instances of ``base``; False: subclasses
        self._entries: dict[str, Entry[T]] = {}

    def add(self, obj: T, plugin: str) -> None:
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
            other = self._entries[name].plugin
            raise LensbenchError(
                f"{self.kind} {name!r} is registered twice (by {other!r} and {plugin!r}); "
                f"uninstall one plugin or block it with LENSBENCH_BLOCK_PLUGINS"
            )
        self._entries[name] = Entry(name, obj, plugin)

    def get(self, name: str, field: str | None = None) -> T:
        try:
            return self._entries[name].obj
        except KeyError:
            hint = did_you_mean(name, list(self._entries))
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

    def kinds(self) -> dict[str, Registry]:
        return {
            "analyses": self.analyses,
            "perturbations": self.perturbations,
            "metrics": self.metrics,
            "datasets": self.datasets,
        }
