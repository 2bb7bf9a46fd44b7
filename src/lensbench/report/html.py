"""One self-contained HTML page for one or several run folders (``lensbench report``).

Figures are embedded as base64 PNG data URIs, tables as JSON read by the page's own script
(sorting, filtering, paging), so the file opens offline with no server. Runs of one analysis
stand side by side: their figures in a row, their tables joined on the key columns (two runs: a
difference column per numeric value); runs of different analyses get a section each.
"""

from __future__ import annotations

import base64
import html
import json
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from ..run_folders import atomic_write
from .assets import CSS, JS
from .runinfo import RunInfo, read_run
from .sections import Section, Table, default_sections, describe, key_columns

REPORT_FILE = "report.html"


def write_report(run_dirs: Sequence[Path], classes: Sequence[Any] | None = None, out: Path | None = None) -> Path:
    """Write the page of ``run_dirs`` (``classes``: each run's Analysis class, or None for the
    default sections) to ``out`` (default: ``<run>/report.html`` for one run, ``report.html`` for
    several), atomically; return its path."""
    run_dirs = [Path(d) for d in run_dirs]
    out = Path(out) if out is not None else (run_dirs[0] / REPORT_FILE if len(run_dirs) == 1 else Path(REPORT_FILE))
    text = build_report(run_dirs, classes)
    atomic_write(out, text)
    return out


def write_report_or_warn(run_dir: Path, cls: Any = None) -> list[Path]:
    """``<run_dir>/report.html`` at the end of a run, after every table and figure. The page is a
    view of results already written: a failure to build it (a plugin's ``report_sections``, a full
    disk) is one warning line, not a failed run. Returns the path written, or nothing."""
    try:
        return [write_report([run_dir], [cls])]
    except Exception as exc:  # noqa: BLE001 - the results stand
        from ..logs import console

        reason = (str(exc).splitlines() or [""])[0]
        console.warning(f"lensbench: the results are written, but not report.html ({type(exc).__name__}: "
                        f"{reason}); `lensbench report {run_dir}` tries again")
        return []


def analysis_name(info: RunInfo, cls: Any) -> str:
    if cls is not None and getattr(cls, "name", ""):
        return cls.name
    return info.class_path.rsplit(".", 1)[-1] or "run"


def run_sections(run_dir: Path, cls: Any, name: str) -> list[Section]:
    """The run's sections: its Analysis class's ``report_sections``, else the default ones."""
    if cls is not None and hasattr(cls, "report_sections"):
        return cls.report_sections(run_dir)
    return default_sections(run_dir, name)


def build_report(run_dirs: Sequence[Path], classes: Sequence[Any] | None = None) -> str:
    classes = list(classes) if classes is not None else [None] * len(run_dirs)
    infos = [read_run(d) for d in run_dirs]
    labels = _labels(run_dirs)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (info, cls) in enumerate(zip(infos, classes)):
        groups[analysis_name(info, cls)].append(i)
    tables = _Tables()
    body = []
    for name, members in groups.items():
        sections = {i: run_sections(run_dirs[i], classes[i], name) for i in members}
        body.append(f'<section id="{_id(name)}"><h2>{_e(name)}</h2>')
        cards = "".join(_card(infos[i], labels[i]) for i in members)
        if len(members) > 1 or not any(s.figures for s in sections[members[0]]):  # the headers in a row
            body.append(f'<div class="lb-row">{cards}</div>')
            cards = ""
        # else one run: its header stands beside its first figure
        if len(members) > 1:
            body.append(_shared_axes([run_dirs[i] for i in members], [labels[i] for i in members],
                                     [classes[i] for i in members]))
        titles = list(dict.fromkeys(s.title for i in members for s in sections[i]))
        for title in titles:
            parts = {i: s for i in members for s in sections[i] if s.title == title}
            if title != name:
                body.append(f"<h3>{_e(title)}</h3>")
            body += [f"<p>{_e(s.text)}</p>" for s in parts.values() if s.text][:1]
            body.append(_figures({labels[i]: s.figures for i, s in parts.items()}, cards))
            cards = cards if not any(s.figures for s in parts.values()) else ""
            body.append(_tables({labels[i]: s.tables for i, s in parts.items()}, tables))
        body.append("</section>")
    from .. import __version__

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = " · ".join(f'<a href="#{_id(n)}">{_e(n)}</a>' for n in groups)
    title = " vs ".join(labels) if len(labels) > 1 else labels[0]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>lensbench report: {_e(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>lensbench report</h1><p class=\"lb-note\">{len(run_dirs)} run(s): {_e(', '.join(map(str, run_dirs)))}; "
            f"written by lensbench {__version__} on {when}. Analyses: {nav}</p>"
            + "\n".join(body) + "\n" + "\n".join(tables.scripts)
            + f"<script>{JS}</script></body></html>\n")


# -- the header of one run ---------------------------------------------------------------------
def _card(info: RunInfo, label: str) -> str:
    rows: list[tuple[str, str]] = [("analysis", _e(info.class_path or "?"))]
    command = "predict" if info.class_path else "fit"  # a fit run's config names no analysis class
    rows.append(("repeat it", f"<code>lensbench {command} --config {_e(str(info.run_dir / 'config.yaml'))}</code>"))
    state_class = "lb-ok" if info.complete else "lb-partial"
    state = f'<span class="{state_class}">{_e(info.state())}</span>'
    if info.missing:
        shown = info.missing[:20]
        state += "<br>missing: " + ", ".join(f"<code>{_e(k)}</code>" for k in shown)
        if len(info.missing) > len(shown):
            state += f" and {len(info.missing) - len(shown)} more"
    rows.append(("state", state))
    models = {k.split(".", 1)[1]: v for k, v in info.identity.items() if k.startswith("model_fingerprint.")}
    if models:
        rows.append(("models", "<br>".join(f"{_e(m)}: weights <code>{_e(str(v))}</code>" for m, v in models.items())))
    version = info.identity.get("lensbench_version")
    if version:
        rows.append(("lensbench", _e(str(version))))
    trainer = info.config.get("trainer") if isinstance(info.config.get("trainer"), dict) else {}
    asked = ", ".join(f"{k} {trainer[k]}" for k in ("accelerator", "devices", "num_nodes", "strategy")
                      if k in trainer and not isinstance(trainer[k], dict))
    ranks = (f"{info.world_size} rank(s): " + ", ".join(f"{r} on {d}" for r, d in sorted(info.ranks.items()))
             if info.ranks else "none logged")
    rows.append(("devices", _e(f"{ranks}" + (f" (config: {asked})" if asked else ""))))
    if info.wall_s is not None:
        rows.append(("wall time", _e(f"{info.wall_s:.1f} s over {max(info.sessions, 1)} session(s)")))
    if info.peak_gib:
        rows.append(("peak memory", _e(", ".join(f"{k} {v:.2f} GiB" for k, v in info.peak_gib.items()))))
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    warnings = ""
    if info.warnings:
        items = "".join(f"<li>{_e(w)}</li>" for w in info.warnings[:50])
        more = f"<li>and {len(info.warnings) - 50} more in logs/</li>" if len(info.warnings) > 50 else ""
        warnings = f'<details class="lb-warn" open><summary>{len(info.warnings)} warning(s) in the logs</summary><ul>{items}{more}</ul></details>'
    config = (f"<details><summary>resolved config (config.yaml)</summary><pre>{_e(info.config_text)}</pre></details>"
              if info.config_text else "")
    identity = (f"<details><summary>run identity (run.json)</summary><pre>{_e(json.dumps(info.identity, indent=1))}</pre></details>"
                if info.identity else "")
    return f'<div class="lb-card"><h3>{_e(label)}</h3><dl>{dl}</dl>{warnings}{config}{identity}</div>'


# -- figures and tables ------------------------------------------------------------------------
def _figures(by_run: dict[str, list[Path]], lead: str = "") -> str:
    """A row per figure name, the runs' figures of that name side by side; ``lead`` opens the first row."""
    names = list(dict.fromkeys(p.name for figures in by_run.values() for p in figures))
    out = []
    several = len(by_run) > 1
    for name in names:
        cells = []
        for label, figures in by_run.items():
            path = next((p for p in figures if p.name == name), None)
            if path is None:
                continue
            cells.append(_figure(path, f"{label}: {name}" if several else name))
        out.append('<div class="lb-row">' + lead + "".join(cells) + "</div>")
        lead = ""
    return "\n".join(out)


def _shared_axes(run_dirs: list[Path], labels: list[str], classes: list[Any]) -> str:
    """The figures the runs' analysis draws of them all on shared axes (``compare_figures``), in
    a row; nothing when it draws none. A failure to draw them is a note on the page."""
    import tempfile

    cls = classes[0]
    if cls is None or any(c is not cls for c in classes) or not hasattr(cls, "compare_figures"):
        return ""
    with tempfile.TemporaryDirectory(prefix="lensbench-report-") as tmp:
        try:
            figures = cls.compare_figures(run_dirs, labels, Path(tmp))
        except Exception as exc:  # noqa: BLE001 - the runs' own figures and tables still make the page
            reason = (str(exc).splitlines() or [""])[0]
            return f'<p class="lb-note">The runs could not be drawn on shared axes ({_e(type(exc).__name__)}: {_e(reason)}).</p>'
        if not figures:
            return ""
        cells = "".join(_figure(path, f"{' vs '.join(labels)}: {path.name}") for path in figures)
    return f'<h3>On shared axes</h3><div class="lb-row">{cells}</div>'


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


class _Tables:
    """The JSON of every table on the page, each in its own ``<script type="application/json">``."""

    def __init__(self) -> None:
        self.scripts: list[str] = []

    def add(self, frame: pd.DataFrame, desc: dict[str, str], diff: list[str] = ()) -> str:
        ident = f"lb-data-{len(self.scripts)}"
        payload = json.loads(frame.to_json(orient="split", index=False, double_precision=15))
        spec = {"columns": [str(c) for c in frame.columns], "data": payload["data"],
                "desc": {k: v for k, v in desc.items() if v},
                "diff": [list(frame.columns).index(c) for c in diff]}
        text = json.dumps(spec, ensure_ascii=False).replace("<", "\\u003c")  # no </script> or <!-- in the data
        self.scripts.append(f'<script type="application/json" id="{ident}">{text}</script>')
        return ident


def _tables(by_run: dict[str, list[Table]], store: _Tables) -> str:
    names = list(dict.fromkeys(t.name for tables in by_run.values() for t in tables))
    out = []
    for name in names:
        present = {label: t for label, tables in by_run.items() for t in tables if t.name == name}
        first = next(iter(present.values()))
        frames = {label: _read(t.path) for label, t in present.items()}
        desc = {c: describe(first.columns, c) for f in frames.values() for c in f.columns}
        note = ""
        if len(frames) == 1:
            label, frame = next(iter(frames.items()))
            heading = name if len(by_run) == 1 else f"{name} ({label} only)"
            ident = store.add(frame, desc)
        else:
            heading = f"{name}: " + " vs ".join(frames)
            frame, keys, diff, desc = compare(frames, first.keys, desc)
            note = (f"joined on {', '.join(keys)}" + ("; Δ columns: the second run minus the first" if diff else "")
                    if keys else "no key columns identify each row once: the runs' rows are stacked, with a run column")
            ident = store.add(frame, desc, diff)
        columns = "".join(f"<li><code>{_e(c)}</code>: {_e(d)}</li>" for c, d in desc.items() if d)
        out.append(f'<div class="lb-block"><h4>{_e(heading)}</h4>'
                   + (f"<p>{_e(first.description)}</p>" if first.description else "")
                   + (f'<p class="lb-note">{_e(note)}</p>' if note else "")
                   + (f"<details><summary>column descriptions</summary><ul>{columns}</ul></details>" if columns else "")
                   + f'<div class="lb-table" data-src="{ident}" data-name="{_e(name)}"></div></div>')
    return "\n".join(out)


def compare(frames: dict[str, pd.DataFrame], keys: list[str] | None,
            desc: dict[str, str]) -> tuple[pd.DataFrame, list[str], list[str], dict[str, str]]:
    """One table of several runs' versions of a table: for two runs joined (outer) on ``keys``
    (default: ``key_columns`` of each) with, per value column ``c``, ``c [A]``, ``c [B]`` and, when
    numeric in both, ``Δ c`` = B - A; for more runs, or no keys, the rows stacked with a ``run``
    column. Returns the table, the keys joined on ([] when stacked), the difference columns and
    the column descriptions."""
    if keys is None:
        found = [key_columns(f) for f in frames.values()]
        keys = found[0] if all(k == found[0] for k in found) else []
    if len(frames) != 2 or not keys or any(not set(keys) <= set(f.columns) for f in frames.values()):
        stacked = pd.concat([f.assign(run=label) for label, f in frames.items()], ignore_index=True)
        stacked = stacked[["run", *[c for c in stacked.columns if c != "run"]]]
        return stacked, [], [], {**desc, "run": "the run folder the row comes from"}
    (la, a), (lb, b) = frames.items()
    for key in keys:  # a key read as integers in one run and as floats in the other joins as floats
        kinds = {pd.api.types.is_integer_dtype(a[key]), pd.api.types.is_integer_dtype(b[key])}
        if kinds == {True, False} and all(pd.api.types.is_numeric_dtype(f[key]) for f in (a, b)):
            a, b = a.astype({key: float}), b.astype({key: float})
    joined = a.merge(b, on=keys, how="outer", suffixes=(f" [{la}]", f" [{lb}]"), indicator=False, sort=True)
    columns, diff, out_desc = list(keys), [], {k: desc.get(k, "") for k in keys}
    for c in [c for c in a.columns if c not in keys] + [c for c in b.columns if c not in keys and c not in a.columns]:
        mine = [name for name in (f"{c} [{la}]", f"{c} [{lb}]") if name in joined.columns] or [c]
        columns += mine
        for name, run in zip(mine, (la, lb)):
            out_desc[name] = f"{desc.get(c, '')} ({run})".strip() if len(mine) == 2 else desc.get(c, "")
        if len(mine) == 2 and all(pd.api.types.is_numeric_dtype(joined[m]) and not pd.api.types.is_bool_dtype(joined[m])
                                  for m in mine):
            name = f"Δ {c}"
            joined[name] = joined[mine[1]] - joined[mine[0]]
            columns.append(name)
            diff.append(name)
            out_desc[name] = f"{c} of {lb} minus {c} of {la}"
    return joined[columns], list(keys), diff, out_desc


def _read(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    """Short unique names of the runs: the folder name, with parents added where two share it."""
    labels = []
    for depth in range(1, 6):
        labels = ["/".join(Path(d).resolve().parts[-depth:]) for d in run_dirs]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label} ({i + 1})" for i, label in enumerate(labels)]


def _id(name: str) -> str:
    return "a-" + "".join(ch if ch.isalnum() else "-" for ch in name)


def _e(text: str) -> str:
    return html.escape(text, quote=True)
