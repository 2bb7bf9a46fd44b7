"""Replaying a range of a decoder's blocks on new hidden states.

One ordinary forward pass of the model's backbone, with forward pre-hooks on every block from
``start`` on, records what each block was called with (positional arguments and keyword
arguments: attention masks, position embeddings, ...). Gemma 3 gives its sliding-window and
full-attention layers different masks, so the calls are kept per block. Afterwards any block can
be run again on another hidden state with exactly the arguments it had, which is how looping
blocks ``start..end`` k times costs one forward pass plus one block-range pass per extra loop:

    replay = BlockReplay(model, anatomy, start, end)
    capture = replay.capture(batch)          # one backbone forward; hooks removed in ``finally``
    h = capture.h_in                         # [B, T, D] entering block ``start``
    h = replay.loop(capture, h)              # one more pass through blocks start..end
    logits = replay.logits_after(capture, h) # blocks end+1..N-1, final norm, LM head

The hidden state leaving block ``end`` is the block's own output (never passed through the final
norm, also when ``end`` is the last block).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


def unsupported_logit_scaling(config) -> str | None:
    """Why ``config``'s logits cannot be reproduced from the final norm and LM head (a scale
    attribute on a model type whose use of it is not known here), or None."""
    model_type = getattr(config, "model_type", None)
    if model_type in LOGIT_SCALING:
        return None
    for attr in SCALE_ATTRIBUTES:
        if getattr(config, attr, None) is not None:
            return (f"{type(config).__name__} (model_type {model_type!r}) sets {attr}, which loop_identity does not "
                    f"know how its forward applies to the logits (it handles {', '.join(sorted(LOGIT_SCALING))}); "
                    "its perplexity would be wrong")
    return None


def block_output(out: Any) -> torch.Tensor:
    """A block's hidden-state output: the tensor itself, or the first element of a tuple."""
    if isinstance(out, (tuple, list)):
        return out[0]
    hidden = getattr(out, "last_hidden_state", None)  # a ModelOutput
    return out if hidden is None else hidden


@dataclass
class Capture:
    """What one forward pass recorded."""

    calls: dict[int, tuple[tuple, dict]] = field(default_factory=dict)  # block -> (args, kwargs)
    h_in: torch.Tensor | None = None  # [B, T, D] entering block ``start``
    h_out: torch.Tensor | None = None  # [B, T, D] leaving block ``end`` (one pass)
    normed: torch.Tensor | None = None  # [B, T, D] the final norm's output of that same forward


class BlockReplay:
    """Runs blocks of ``model`` again with the arguments a captured forward gave them."""

    def __init__(self, model: nn.Module, anatomy, start: int, end: int) -> None:
        self.model = model
        self.blocks = anatomy.blocks(model)
        n = len(self.blocks)
        if not 0 <= start <= end < n:
            raise LensbenchError(f"block range {start}..{end} is outside the model's blocks 0..{n - 1}",
                                 "model.init_args.end")
        self.start, self.end = start, end
        if anatomy.final_norm_name is None:
            raise LensbenchError(f"cannot find the final norm of {type(model).__name__}; loop_identity needs a "
                                 "decoder with a final norm before its LM head", "model.init_args.baseline")
        self.norm = model.get_submodule(anatomy.final_norm_name)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise LensbenchError(f"{type(model).__name__} has no LM head; loop_identity scores perplexity and needs a "
                                 "causal LM (set the model's head: causal_lm)", "model.init_args.baseline")
        self.head = head
        config = getattr(model, "config", None)
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        refused = unsupported_logit_scaling(text)
        if refused:
            raise LensbenchError(refused, "model.init_args.baseline")
        self.softcap = getattr(text, "final_logit_softcapping", None)
        self.logit_scale = logit_scale(text)
        self.backbone = getattr(model, "base_model", model)

    def capture(self, batch: dict[str, torch.Tensor]) -> Capture:
        """One forward pass of the backbone (no cache) recording every block call from ``start`` on."""
        cap = Capture()
        hooks = []
        calls: dict[int, int] = {}

        def pre(index: int):
            def hook(module, args, kwargs):
                calls[index] = calls.get(index, 0) + 1
                if index not in cap.calls:  # the first call only
                    cap.calls[index] = (tuple(args), dict(kwargs))
                    if index == self.start:
                        cap.h_in = args[0] if args else kwargs["hidden_states"]
            return hook

        def after_end(module, args, output):
            if cap.h_out is None:
                cap.h_out = block_output(output)

        def after_norm(module, args, output):
            if cap.normed is None:
                cap.normed = output

        try:
            for i in range(self.start, len(self.blocks)):
                hooks.append(self.blocks[i].register_forward_pre_hook(pre(i), with_kwargs=True))
            hooks.append(self.blocks[self.end].register_forward_hook(after_end))
            hooks.append(self.norm.register_forward_hook(after_norm))
            self.backbone(**batch, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        missing = [i for i in range(self.start, len(self.blocks)) if i not in cap.calls]
        if missing or cap.h_out is None or cap.normed is None:
            raise LensbenchError(f"the forward pass of {type(self.model).__name__} did not call blocks {missing} or its "
                                 "final norm; loop_identity cannot replay this architecture", "model.init_args.baseline")
        again = sorted(i for i, n in calls.items() if n > 1)
        if again:
            raise LensbenchError(f"the forward pass of {type(self.model).__name__} calls blocks {again} more than once "
                                 "(a looped architecture); load the checkpoint as its plain architecture (each block "
                                 "once): loop_identity does the looping", "model.init_args.checkpoints")
        return cap

    def run_block(self, cap: Capture, index: int, hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = cap.calls[index]
        if args:
            out = self.blocks[index](hidden, *args[1:], **kwargs)
        else:
            out = self.blocks[index](**{**kwargs, "hidden_states": hidden})
        return block_output(out)

    def loop(self, cap: Capture, hidden: torch.Tensor) -> torch.Tensor:
        """One more pass through blocks start..end."""
        for i in range(self.start, self.end + 1):
            hidden = self.run_block(cap, i, hidden)
        return hidden

    def logits_after(self, cap: Capture, hidden: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, T, V] of the remaining blocks end+1..N-1, the final norm and the LM head applied
        to ``hidden``; ``None`` means the captured forward's own (one pass)."""
        if hidden is None:
            normed = cap.normed
        else:
            for i in range(self.end + 1, len(self.blocks)):
                hidden = self.run_block(cap, i, hidden)
            normed = self.norm(hidden)
        logits = self.head(normed)
        if self.logit_scale is not None:  # as the model's own forward (Granite divides, Cohere multiplies)
            op, value = self.logit_scale
            logits = logits / value if op == "divide" else logits * value
        if self.softcap:  # Gemma 2 / 3 style final logit soft-capping
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
