"""The last step of a causal LM as a function of a hidden state: final norm, LM head, and the
scaling the model's own forward applies to the head's output (Granite divides by
``logits_scaling``, Cohere multiplies by ``logit_scale``, Gemma 2/3 soft-cap). Used to score a
looped hidden state (loop_identity) and to read any layer's hidden state as a prediction (the
logit lens)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LensbenchError

# How transformers' *ForCausalLM scales the LM head's output, by model type (the attribute named
# and what forward does with it). Other model types carrying one of these attributes are refused:
# the same name means different things (Granite divides by logits_scaling, HyperCLOVA X multiplies,
# MiniCPM3 scales the hidden state), so it is never applied by name alone.
LOGIT_SCALING = {
    "granite": ("logits_scaling", "divide"),
    "granitemoe": ("logits_scaling", "divide"),
    "granitemoeshared": ("logits_scaling", "divide"),
    "cohere": ("logit_scale", "multiply"),
    "cohere2": ("logit_scale", "multiply"),
}
SCALE_ATTRIBUTES = ("logits_scaling", "logit_scale")


def logit_scale(config) -> tuple[str, float] | None:
    """("divide" | "multiply", value) that the model's forward applies to the LM head's output, or None."""
    known = LOGIT_SCALING.get(getattr(config, "model_type", None))
    if known is None:
        return None
    attr, op = known
    value = getattr(config, attr, None)
    return None if value is None else (op, float(value))


def unsupported_logit_scaling(config, who: str, what: str) -> str | None:
    """Why ``config``'s logits cannot be reproduced from the final norm and LM head (a scale
    attribute on a model type whose use of it is not known here), or None."""
    model_type = getattr(config, "model_type", None)
    if model_type in LOGIT_SCALING:
        return None
    for attr in SCALE_ATTRIBUTES:
        if getattr(config, attr, None) is not None:
            return (f"{type(config).__name__} (model_type {model_type!r}) sets {attr}, which {who} does not "
                    f"know how its forward applies to the logits (it handles {', '.join(sorted(LOGIT_SCALING))}); "
                    f"{what} would be wrong")
    return None


class Unembedding:
    """``model``'s final norm, LM head and logit scaling, applied to hidden states [..., D]."""

    def __init__(self, model: nn.Module, anatomy, field: str, who: str, what: str) -> None:
        """``field`` is the config field naming the model; ``who`` (the analysis) and ``what`` (what
        it computes from the logits) word the one-line refusal of a model it cannot unembed."""
        if anatomy.final_norm_name is None:
            raise LensbenchError(f"cannot find the final norm of {type(model).__name__}; {who} needs a "
                                 "decoder with a final norm before its LM head", field)
        self.norm = model.get_submodule(anatomy.final_norm_name)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise LensbenchError(f"{type(model).__name__} has no LM head; {who} needs a causal LM (set the "
                                 "model's head: causal_lm)", field)
        self.head = head
        config = getattr(model, "config", None)
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        refused = unsupported_logit_scaling(text, who, what)
        if refused:
            raise LensbenchError(refused, field)
        self.softcap = getattr(text, "final_logit_softcapping", None)
        self.logit_scale = logit_scale(text)

    def logits(self, hidden: torch.Tensor, normed: bool = False) -> torch.Tensor:
        """Logits [..., V] of ``hidden``; ``normed``: it has passed the final norm already."""
        logits = self.head(hidden if normed else self.norm(hidden))
        if self.logit_scale is not None:  # as the model's own forward (Granite divides, Cohere multiplies)
            op, value = self.logit_scale
            logits = logits / value if op == "divide" else logits * value
        if self.softcap:  # Gemma 2 / 3 style final logit soft-capping
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
