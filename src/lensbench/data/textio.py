"""Reading text and JSONL files, the same way for every reader of user files (datasets, local MTEB
task folders, synthetic splits).

- A UTF-8 byte-order mark at the start is dropped (an editor's marker, not text): it would be
  measured as a token of the first example, and ``json.loads`` refuses a line starting with it. A
  file holding only a BOM is empty.
- Lines end at ``"\\n"`` only, a ``"\\r"`` before it dropped (Windows line ends). ``str.splitlines``
  also splits on form feeds, vertical tabs, ``\\x1c``-``\\x1e``, ``\\x85``, ``\\u2028`` and
  ``\\u2029``: a text holding one would become two examples, and a valid JSONL line holding a raw
  U+2028 inside a string (``json.dumps(..., ensure_ascii=False)`` writes it so) two invalid ones.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LensbenchError

BOM = "\ufeff"


def decode(data: bytes, path: Path | str, field: str | None) -> str:
    """``data`` as UTF-8 text without a leading byte-order mark; anything else is one line naming
    ``path`` and the first invalid byte."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LensbenchError(f"{path} is not UTF-8 text (byte {exc.start} is invalid); re-encode it as UTF-8",
                             field) from None
    return text[1:] if text.startswith(BOM) else text


def read_text(path: Path | str, field: str | None, missing: str = "") -> str:
    """The text of the file ``path`` (``decode``). A file that is not there, or a folder, is one line
    naming it, followed by ``missing`` (what is needed there) when given."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LensbenchError(f"{path} is missing" + (f"; {missing}" if missing else ""), field) from None
    except IsADirectoryError:
        raise LensbenchError(f"{path} is a folder; " + (missing or "give a file"), field) from None
    except OSError as exc:
        raise LensbenchError(f"cannot read {path}: {exc.strerror}", field) from None
    return decode(data, path, field)


def split_lines(text: str) -> list[str]:
    """The lines of ``text``, split on ``"\\n"`` only, each without a trailing ``"\\r"``; a final line
    end makes no empty last line. Line ``n`` of the file is item ``n - 1``."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_lines(path: Path | str, field: str | None, missing: str = "") -> list[str]:
    """``split_lines(read_text(path, field, missing))``."""
    return split_lines(read_text(path, field, missing))
