"""YAML as lensbench reads a user's config: PyYAML's safe loader, refusing a mapping that names one
key twice (PyYAML keeps the last value silently, so ``batch_size: 2`` above ``batch_size: 4`` would
run with 4 and no word). A key repeated over a merge (``<<: *base`` then ``key: ...``) is an override,
not a duplicate."""

from __future__ import annotations

from typing import Any

import yaml

from .errors import LensbenchError


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names ``key`` twice: first at line ``first``, again at line ``line`` (1-based)."""

    def __init__(self, key: Any, line: int, first: int) -> None:
        self.key, self.line, self.first = key, line, first
        super().__init__(self.describe())

    def describe(self, where: str | None = None) -> str:
        """``duplicate key 'k' at line 7 of <where> (first at line 3); keep one``."""
        of = f" of {where}" if where else ""
        first = f" (first at line {self.first})" if self.first != self.line else ""
        return f"duplicate key {self.key!r} at line {self.line}{of}{first}; keep one"


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` raising ``DuplicateKeyError`` for a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:  # the mapping's own keys, before merges are flattened in
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the safe constructor refuses it itself
                continue
            if first is not None:
                raise DuplicateKeyError(key, line, first)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def safe_load(text: str) -> Any:
    """``yaml.safe_load(text)``, raising ``DuplicateKeyError`` for a key given twice in one mapping."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def not_a_mapping(value: Any, where: str, sections: str) -> str | None:
    """The message for a config file ``where`` whose YAML ``value`` is not a mapping (empty, only
    comments, a list, one value), naming the ``sections`` it should hold; None for a mapping."""
    if isinstance(value, dict):
        return None
    held = "nothing (it is empty or only comments)" if value is None else \
        f"{'a list' if isinstance(value, list) else 'a single value'}, not a mapping of sections"
    return f"{where} holds {held}; write a config with its sections ({sections})"


def load_config(text: str, where: str | None, field: str | None = "config", sections: str | None = None) -> Any:
    """``safe_load(text)`` for a config read from ``where`` (a file name, for the message): a
    duplicate key is a ``LensbenchError`` naming the key and its line, and so, when ``sections`` is
    given, is a file that is not a mapping (``not_a_mapping``); other YAML errors pass."""
    try:
        value = safe_load(text)
    except DuplicateKeyError as exc:
        raise LensbenchError(exc.describe(where), field) from None
    problem = not_a_mapping(value, where or "the config", sections) if sections else None
    if problem:
        raise LensbenchError(problem, field)
    return value
