"""A Llama-style decoder whose chosen layers read a product-key memory instead of their MLP.

``MemoryLlamaConfig`` (``model_type: memory_llama``) is a ``LlamaConfig`` plus the memory settings;
``MemoryLlamaForCausalLM`` builds ``model.layers[i].memory`` (a ``ProductKeyMemory``) in place of
``model.layers[i].mlp`` for each ``i`` in ``memory_layers``. Both are registered with
transformers' Auto classes when ``lensbench.memory`` is imported (``import lensbench`` does it),
so a saved folder loads with ``AutoModelForCausalLM.from_pretrained(folder)`` as plain safetensors,
without remote code.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

from .layer import ProductKeyMemory, check_memory_shape


class MemoryLlamaConfig(LlamaConfig):
    """``LlamaConfig`` plus: ``memory_layers`` (block indices whose MLP becomes a memory layer),
    ``memory_n_keys`` (half-key table rows; ``n_keys²`` slots), ``memory_heads``, ``memory_topk``
    (slots read per head), ``memory_k_dim`` (query/key size, split in two halves),
    ``memory_v_dim`` (value size; None = hidden size), ``memory_gated`` (memory+: silu gate and
    output projection)."""

    model_type = "memory_llama"

    def __init__(self, memory_layers: list[int] | tuple[int, ...] = (), memory_n_keys: int = 128,
                 memory_heads: int = 4, memory_topk: int = 32, memory_k_dim: int = 128,
                 memory_v_dim: int | None = None, memory_gated: bool = False, memory_query_norm: bool = False,
                 **kwargs: Any) -> None:
        self.memory_layers = [int(i) for i in memory_layers]
        self.memory_n_keys = int(memory_n_keys)
        self.memory_heads = int(memory_heads)
        self.memory_topk = int(memory_topk)
        self.memory_k_dim = int(memory_k_dim)
        self.memory_v_dim = None if memory_v_dim is None else int(memory_v_dim)
        self.memory_gated = bool(memory_gated)
        self.memory_query_norm = bool(memory_query_norm)
        super().__init__(**kwargs)
        check_memory_shape(self.hidden_size, self.memory_n_keys, self.memory_heads, self.memory_topk,
                           self.memory_k_dim, self.memory_v_dim)
        bad = [i for i in self.memory_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"memory_layers {bad} are outside the model; it has layers 0..{self.num_hidden_layers - 1}")
        if len(set(self.memory_layers)) != len(self.memory_layers):
            raise ValueError(f"memory_layers {self.memory_layers} lists a layer twice; list each once")


def memory_from_config(config: MemoryLlamaConfig) -> ProductKeyMemory:
    return ProductKeyMemory(config.hidden_size, n_keys=config.memory_n_keys, heads=config.memory_heads,
                            topk=config.memory_topk, k_dim=config.memory_k_dim, v_dim=config.memory_v_dim,
                            gated=config.memory_gated, query_norm=getattr(config, "memory_query_norm", False))


class MemoryDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer whose feed-forward part is ``self.memory`` (no ``mlp``)."""

    def __init__(self, config: MemoryLlamaConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        del self.mlp
        self.memory = memory_from_config(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, cache=None,
                use_cache: bool | None = False, position_embeddings=None, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                          position_ids=position_ids, cache=cache, use_cache=use_cache,
                                          position_embeddings=position_embeddings, **kwargs)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.memory(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class _MemoryInit:
    """``_init_weights`` that knows ``ProductKeyMemory`` (transformers' own skips loaded tensors)."""

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        if isinstance(module, ProductKeyMemory):
            from transformers import initialization

            module.reset_parameters(self.config.initializer_range, init=initialization)
        else:
            super()._init_weights(module)


class MemoryLlamaModel(_MemoryInit, LlamaModel):
    config_class = MemoryLlamaConfig

    def __init__(self, config: MemoryLlamaConfig) -> None:
        super().__init__(config)
        for i in config.memory_layers:
            self.layers[i] = MemoryDecoderLayer(config, i)
        self.post_init()


class MemoryLlamaForCausalLM(_MemoryInit, LlamaForCausalLM):
    """Llama causal LM with product-key memory layers (``config.memory_layers``)."""

    config_class = MemoryLlamaConfig

    def __init__(self, config: MemoryLlamaConfig) -> None:
        super(LlamaForCausalLM, self).__init__(config)
        self.model = MemoryLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def memory_layers(self) -> dict[int, ProductKeyMemory]:
        """Block index -> its memory layer."""
        return {i: self.model.layers[i].memory for i in self.config.memory_layers}


def register() -> None:
    """Make ``memory_llama`` known to ``AutoConfig`` and ``AutoModelForCausalLM`` (idempotent)."""
    try:
        AutoConfig.register(MemoryLlamaConfig.model_type, MemoryLlamaConfig)
    except ValueError:  # already registered
        pass
    try:
        AutoModelForCausalLM.register(MemoryLlamaConfig, MemoryLlamaForCausalLM)
    except ValueError:
        pass


register()
