"""lensbench: analyses of language-model internals, run by one command.

    lensbench predict --config configs/<analysis>/<experiment>.yaml

Importing lensbench registers its model classes (``memory_llama``, see ``lensbench.memory``)
with transformers' Auto classes, so their saved folders load with ``from_pretrained``. The
import stays light: when transformers is not imported yet, the registration runs right after it
is (``_autoregister``), so ``import lensbench`` alone imports neither torch nor transformers.
"""

__version__ = "0.1.0"

from ._autoregister import register_when_transformers_loads as _register

_register()
