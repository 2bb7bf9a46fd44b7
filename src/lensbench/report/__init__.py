"""Run reports: one self-contained HTML page per run, or for several runs side by side
(``lensbench report``; docs/report.md)."""

from .html import REPORT_FILE, build_report, write_report, write_report_or_warn
from .sections import Section, Table, default_sections

__all__ = ["REPORT_FILE", "Section", "Table", "build_report", "default_sections", "write_report", "write_report_or_warn"]
