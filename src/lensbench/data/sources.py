"""Text datasets: plain text (one example per line) or JSONL with a text field.

Shipped datasets are registered by name through ``lensbench_register_datasets``; a config may
name one of them or give a file path (the dataset is then named after the file's stem).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import LensbenchError
from ..hookspecs import hookimpl
from .textio import read_lines


@dataclass(frozen=True)
class DatasetEntry:
    """A named dataset that plugins register: ``path`` is a .txt or .jsonl file."""

    name: str
    path: Path
    description: str = ""
    text_field: str = "text"


@dataclass
class TextDataset:
    """One dataset in a config: a registered name or a file path, optionally renamed."""

    source: str
    """A registered dataset name (see `lensbench plugins`) or a .txt / .jsonl file."""
    name: str | None = None
    """Label in outputs; default: the registered name or the file's stem."""
    text_field: str = "text"
    """Field holding the text in JSONL files."""


def resolve_dataset(spec: TextDataset, registry, field: str) -> tuple[str, Path, str]:
    """(name, path, text_field) of ``spec``; registered names win over relative paths."""
    if spec.source in registry:
        entry = registry.get(spec.source)
        return spec.name or entry.name, Path(entry.path), entry.text_field
    path = Path(spec.source).expanduser()
    if not path.exists():
        from ..errors import did_you_mean

        raise LensbenchError(
            f"{spec.source!r} is neither a registered dataset nor an existing file; "
            f"give a .txt/.jsonl path or a registered name ({did_you_mean(spec.source, registry.names())})",
            field,
        )
    if path.is_dir():
        raise LensbenchError(f"{spec.source!r} is a folder; give a .txt or .jsonl file", field)
    return spec.name or path.stem, path, spec.text_field


JSONL_SUFFIXES = {".jsonl", ".ndjson"}


def _examples(path: Path, text_field: str, field: str) -> list[tuple[int, dict | None, str]]:
    """(line number, JSONL object or None, text) of every non-blank example of ``path``, read as
    ``textio`` reads text files: a byte-order mark dropped, lines ending at "\\n" only (a form feed
    or U+2028 inside a line is part of it)."""
    jsonl = Path(path).suffix in JSONL_SUFFIXES
    examples: list[tuple[int, dict | None, str]] = []
    for lineno, line in enumerate(read_lines(path, field), 1):
        if not line.strip():
            continue
        if not jsonl:
            examples.append((lineno, None, line))
            continue
        try:
            obj = json.loads(line)
            text = obj[text_field]
        except json.JSONDecodeError:
            raise LensbenchError(f"{path}:{lineno} is not valid JSON; fix that line", field) from None
        except (KeyError, TypeError):
            raise LensbenchError(
                f"{path}:{lineno} has no {text_field!r} field; set text_field to the field holding the text",
                field,
            ) from None
        if not isinstance(text, str):
            raise LensbenchError(f"{path}:{lineno}: {text_field!r} is not a string", field)
        if text.strip():
            examples.append((lineno, obj, text))
    if not examples:
        raise LensbenchError(f"{path} holds no text; add at least one non-empty example", field)
    return examples


def read_texts(path: Path, text_field: str = "text", field: str = "dataset") -> list[str]:
    """The non-empty examples of a .txt (one per line) or .jsonl file, in file order."""
    return [text for _, _, text in _examples(path, text_field, field)]


def read_records(path: Path, text_field: str = "text", field: str = "dataset") -> list[dict]:
    """The examples of a .txt or .jsonl file as dicts: ``text``, ``index`` and, for JSONL, every
    other field of the line (``prompt_id``, ``category``, ...). An ``image`` field (a picture for
    vision-language models) becomes an absolute path, relative names being relative to the file."""
    from .images import resolve_image

    rows = []
    for lineno, row, text in _examples(path, text_field, field):
        if row is None:
            rows.append({"text": text, "index": len(rows)})
            continue
        if row.get("image") is not None:
            row["image"] = resolve_image(row["image"], Path(path).parent, field, f"{path}:{lineno}")
        rows.append({**row, "text": text, "index": len(rows)})
    return rows


def _shipped(name: str, description: str, folder: str = "texts", suffix: str = ".txt",
             text_field: str = "text") -> DatasetEntry:
    path = Path(str(resources.files("lensbench.data") / folder / f"{name}{suffix}"))
    return DatasetEntry(name=name, path=path, description=description, text_field=text_field)


@hookimpl
def lensbench_register_datasets() -> list[DatasetEntry]:
    return [
        _shipped("forget", "Short passages on a narrow technical topic (to be unlearned)"),
        _shipped("retain", "Short everyday and general-knowledge passages (to be retained)"),
        _shipped("dreams", "38 dream-narration prompts", "prompts", ".jsonl", "prompt"),
        _shipped("iq", "65 prompts: math, language, logic, factual, creativity (13 each), with answers",
                 "prompts", ".jsonl", "prompt"),
        _shipped("cookie_theft", "20 picture-description prompts (for kitchen_scene.png)", "prompts", ".jsonl", "prompt"),
    ]
