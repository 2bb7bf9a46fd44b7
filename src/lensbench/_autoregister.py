"""Register lensbench's model classes with transformers' Auto classes as soon as transformers is
imported, without importing it (or torch) ourselves: a one-shot import hook wraps the loading of
the ``transformers`` package and registers once its ``__init__`` has run."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys


def _register() -> None:
    from .memory import model  # noqa: F401  (its import registers memory_llama)


class _AfterTransformers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot; find the real spec without this finder
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Then(spec.loader)
        return spec


class _Then(importlib.abc.Loader):
    """The real loader, then the registration."""

    def __init__(self, real: importlib.abc.Loader) -> None:
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module) -> None:
        self.real.exec_module(module)
        _register()

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self.real, name)


def register_when_transformers_loads() -> None:
    if "transformers" in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformers())
