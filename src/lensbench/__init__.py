"""lensbench: analyses of language-model internals, run by one command.

    lensbench predict --config configs/<analysis>/<experiment>.yaml
"""

__version__ = "0.1.0"
