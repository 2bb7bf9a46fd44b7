"""lensbench: analyses of language-model internals, run by one command.

    lensbench predict --config configs/<analysis>/<experiment>.yaml

Importing lensbench registers its model classes (``memory_llama``, see ``lensbench.memory``)
with transformers' Auto classes, so their saved folders load with ``from_pretrained``.
"""

__version__ = "0.1.0"

from . import memory as _memory  # noqa: E402,F401  (registers memory_llama with the Auto classes)
