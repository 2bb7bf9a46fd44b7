"""Product-key memory layers and the Llama-style model that uses them (``memory_llama``)."""

from .layer import ProductKeyMemory
from .model import MemoryLlamaConfig, MemoryLlamaForCausalLM, register

__all__ = ["ProductKeyMemory", "MemoryLlamaConfig", "MemoryLlamaForCausalLM", "register"]
