"""Tiny random models and text files for tests: now ``lensbench.testing``, re-exported here so
``from tiny import ...`` keeps working."""

from lensbench.testing import *  # noqa: F401,F403
from lensbench.testing import (  # noqa: F401
    GEMMA3_TEMPLATE,
    LLAVA_TEMPLATE,
    WORDS,
    save_tiny_gemma3,
    save_tiny_llama,
    save_tiny_llava,
    tiny_tokenizer,
    write_texts,
)
