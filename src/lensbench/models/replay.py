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
from .unembed import Unembedding


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
        self.unembed = Unembedding(model, anatomy, "model.init_args.baseline", "loop_identity", "its perplexity")
        self.norm = self.unembed.norm
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
        logits = self.unembed.logits(normed, normed=True)
        return logits
