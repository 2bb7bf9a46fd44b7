"""What a report shows of one analysis's run folder: sections of figures and tables.

``Analysis.report_sections(run_dir)`` returns a list of ``Section``; its default,
``default_sections``, needs no code from the analysis: one section holding every figure
(``*.png``) and every table (``*.csv``) of the folder, each table's columns described by the
analysis's doc (``docs/<analysis>.md``) where one is found (``doc_columns``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

#: Columns that identify a row (joined on when runs are compared), besides text columns.
KEY_HINTS = ("layer", "level_value", "repeat_index", "seed", "is_baseline", "step", "checkpoint", "index",
             "first", "end", "loop_count", "passes", "layer_index", "prompt_id", "position", "rank")


@dataclass
class Table:
    """One table of a section: a CSV file, what it holds, what its columns mean, and the columns
    that identify a row (``None``: guessed from the values, see ``key_columns``)."""

    path: Path
    description: str = ""
    columns: dict[str, str] = field(default_factory=dict)
    keys: list[str] | None = None

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class Section:
    title: str
    figures: list[Path] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    text: str = ""


def default_sections(run_dir: Path, analysis: str, search_from: str | Path | None = None) -> list[Section]:
    """One section holding every ``*.png`` and ``*.csv`` of ``run_dir`` (sorted by name), its
    tables described by the doc of ``analysis`` found by ``find_doc``; where none is found, by the
    copy of the built-in analyses' descriptions in ``doc_columns`` (else none)."""
    run_dir = Path(run_dir)
    doc = find_doc(analysis, search_from)
    if doc is not None:
        described = doc_columns(doc.read_text(encoding="utf-8"))
    else:  # an installed wheel carries no docs: the built-in analyses' descriptions ship in the package
        from .doc_columns import COLUMNS

        described = COLUMNS.get(analysis, {})
    tables = []
    for path in sorted(run_dir.glob("*.csv")):
        info = described.get(path.name, {})
        tables.append(Table(path, info.get("", ""), {k: v for k, v in info.items() if k}))
    return [Section(analysis, sorted(run_dir.glob("*.png")), tables)]


def find_doc(analysis: str, search_from: str | Path | None = None) -> Path | None:
    """``docs/<analysis>.md`` in a folder above ``search_from`` (the analysis's module; default:
    lensbench's own), as in a source checkout or an editable install; None where there is none."""
    start = Path(search_from or __file__).resolve()
    for parent in list(start.parents)[:4]:
        doc = parent / "docs" / f"{analysis}.md"
        if doc.is_file():
            return doc
    return None


_CODE = re.compile(r"`([^`]+)`")
_CSV = re.compile(r"`([^`/]+\.csv)`")


def doc_columns(markdown: str) -> dict[str, dict[str, str]]:
    """Table name -> {column: meaning} from a doc's markdown tables: a ``| column | meaning |``
    table describes the CSV named last in the text above it; a row whose first cell names a CSV
    (``| `x.csv` | ... |``) gives that table's description (key ``""``), as does the paragraph
    that names the CSV just before its column table. A cell naming several columns
    (```min_<stat>`, `max_<stat>```) describes each; ``<...>`` matches any text (see ``describe``)."""
    out: dict[str, dict[str, str]] = {}
    current: str | None = None
    paragraph = ""
    header: list[str] | None = None
    for line in markdown.splitlines():
        stripped = line.strip()
        if not stripped.startswith("|"):
            header = None
            if stripped:
                named = _CSV.findall(stripped)
                if named:
                    current, paragraph = named[-1], stripped
            continue
        cells = [c.strip() for c in stripped.strip("|").split("|")]
        if header is None:
            header = [c.lower() for c in cells]
            if header[0] == "column" and current:
                out.setdefault(current, {}).setdefault("", _plain(paragraph).rstrip(":"))
            continue
        if set("".join(cells)) <= set("-: "):
            continue
        meaning = _plain(cells[-1]) if len(cells) > 1 else ""
        first = _CODE.findall(cells[0])
        if len(first) == 1 and first[0].endswith(".csv") and header[0] != "column":
            out.setdefault(first[0], {})[""] = meaning
        elif header[0] == "column" and current:
            for name in first:
                out[current][name] = meaning
    return out


def describe(columns: dict[str, str], name: str) -> str:
    """The meaning of column ``name``: its own entry, else one whose ``<...>`` parts match it."""
    if name in columns:
        return columns[name]
    for pattern, meaning in columns.items():
        if "<" in pattern and re.fullmatch(re.sub(r"<[^>]*>", ".+", re.escape(pattern).replace(r"\<", "<")
                                                  .replace(r"\>", ">")), name):
            return meaning
    return ""


def _plain(text: str) -> str:
    return _CODE.sub(r"\1", text).strip()


def key_columns(frame, hints: tuple[str, ...] = KEY_HINTS) -> list[str]:
    """Columns that identify a row of ``frame``: text and boolean columns, and those named in
    ``hints``; empty when they do not identify each row once."""
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    keys = [c for c in frame.columns if c in hints or is_bool_dtype(frame[c]) or not is_numeric_dtype(frame[c])]
    if not keys or frame.duplicated(subset=keys).any():
        return []
    return keys


def write_snapshot(docs: Path, names: list[str], out: Path = Path(__file__).with_name("doc_columns.py")) -> Path:
    """Write ``doc_columns.py``: ``doc_columns`` of ``docs/<name>.md`` for each of ``names`` (the
    built-in analyses), so that an installed wheel, which has no docs, still describes their
    columns. tests/test_report.py checks that it matches the docs."""
    import pprint

    columns = {name: doc_columns((Path(docs) / f"{name}.md").read_text(encoding="utf-8")) for name in sorted(names)}
    out.write_text('"""The column descriptions of the built-in analyses\' docs (``sections.doc_columns`` of\n'
                   "``docs/<analysis>.md``), for installs without the docs. Written by ``sections.write_snapshot``;\n"
                   'do not edit by hand."""\n\n'
                   f"COLUMNS = {pprint.pformat(columns, width=110, sort_dicts=False)}\n", encoding="utf-8")
    return out
