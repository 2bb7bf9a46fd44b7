"""Pictures that prompts show to vision-language models: located, checked and decoded once."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from ..errors import LensbenchError


def resolve_image(name: str, base: Path, field: str, where: str) -> str:
    """The absolute path of picture ``name`` (relative names are relative to ``base``)."""
    if not isinstance(name, str) or not name.strip():
        raise LensbenchError(f"{where}: image must be a file name, got {name!r}", field)
    path = Path(name).expanduser()
    path = path if path.is_absolute() else Path(base) / path
    if not path.is_file():
        raise LensbenchError(f"{where}: image {str(path)!r} does not exist; give a picture file (relative names "
                             f"are relative to the prompt file's folder)", field)
    return str(path.resolve())


@functools.lru_cache(maxsize=16)
def load_image(path: str, field: str = "image"):
    """The picture at ``path`` as an RGB PIL image, decoded once per process."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise LensbenchError(f"{path} is not a readable picture ({type(exc).__name__}); give a PNG or JPEG file",
                             field) from None


def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
