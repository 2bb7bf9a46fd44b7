"""Collators turning synthetic rows (dicts with ``text``) into masked training batches.

``PaddedCollator`` pads a batch to its longest example (``input_ids``, ``attention_mask``,
``labels``). ``PackedCollator`` packs whole examples into rows with ``position_ids`` restarting
at 0 per example and no padding between them (``input_ids``, ``position_ids``, ``labels``).

How a model keeps packed examples apart: transformers (5.x) detects restarting ``position_ids``
when no ``attention_mask`` is given and builds a block-diagonal causal mask (``sdpa`` and
``eager`` attention alike), but ONLY when the forward pass runs without a cache: the model must be
called with ``use_cache=False``. With the default ``use_cache`` (``config.use_cache`` is true for
most models, in training mode too) a cache is created, the detection is skipped, and every example
attends to the ones before it in its row. Where the caller cannot pass ``use_cache=False``, build
the collator with ``block_mask="bool"`` (for ``sdpa``) or ``block_mask="additive"`` (for ``eager``
and ``sdpa`` with a float32 model) to get an explicit 4-D ``attention_mask`` of shape
``[batch, 1, length, length]`` that works with or without a cache. Flash attention needs neither
(it takes packed sequences from ``position_ids`` through its own kwargs) and is not covered here.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import LensbenchError
from .masks import IGNORE, get_mask, row_labels

BLOCK_MASKS = (None, "bool", "additive")


def _sub(prefix: str | None, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def pad_id(tokenizer, field: str | None = None) -> int:
    """The tokenizer's pad token id, else its EOS id (padding is never trained, so either works)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise LensbenchError("the tokenizer has neither a pad nor an EOS token; give it a pad_token",
                         _sub(field, "tokenizer"))


def _check_max_length(max_length: int, field: str | None) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise LensbenchError(f"max_length must be a positive integer, got {max_length!r}; set it to the "
                             f"longest example's token count or more", _sub(field, "max_length"))


class PaddedCollator:
    """Rows -> ``input_ids``, ``attention_mask``, ``labels`` (LongTensors), padded to the longest row.

    Padding tokens have attention 0 and label -100; ``pad_side`` is ``"right"`` or ``"left"``.
    ``mask`` is a mask type name, or a ``DatasetMask`` (its dataset's ``answer_spans`` picks the
    trained characters of each row).
    """

    def __init__(self, tokenizer, mask: str, max_length: int, append_eos: bool = False, pad_side: str = "right",
                 add_bos: bool = False, field: str | None = None) -> None:
        get_mask(mask, _sub(field, "mask"))
        _check_max_length(max_length, field)
        if pad_side not in ("right", "left"):
            raise LensbenchError(f"pad_side must be 'right' or 'left', got {pad_side!r}", _sub(field, "pad_side"))
        self.tokenizer = tokenizer
        self.mask = mask
        self.max_length = max_length
        self.append_eos = append_eos
        self.pad_side = pad_side
        self.add_bos = add_bos
        self.field = field
        self.pad_id = pad_id(tokenizer, field)

    def encode_row(self, row: dict) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one row (``row_labels``)."""
        return row_labels(self.tokenizer, row, self.mask, self.append_eos, self.max_length, self.add_bos, self.field)

    def encode(self, text: str) -> tuple[list[int], list[int]]:
        """``encode_row`` of a row holding only ``text``."""
        return self.encode_row({"text": text})

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        encoded = [self.encode_row(row) for row in rows]
        width = max(len(ids) for ids, _ in encoded)
        input_ids, attention, labels = [], [], []
        for ids, labs in encoded:
            pad = width - len(ids)
            if self.pad_side == "right":
                input_ids.append(ids + [self.pad_id] * pad)
                attention.append([1] * len(ids) + [0] * pad)
                labels.append(labs + [IGNORE] * pad)
            else:
                input_ids.append([self.pad_id] * pad + ids)
                attention.append([0] * pad + [1] * len(ids))
                labels.append([IGNORE] * pad + labs)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }


def pack(encoded: Sequence[tuple[list[int], list[int]]], max_length: int,
         field: str | None = None) -> list[dict[str, list[int]]]:
    """Place whole examples ``(input_ids, labels)`` into rows of at most ``max_length`` tokens.

    First fit, in order: each example goes into the first row with room left, else opens a new
    row; an example is never split (one longer than ``max_length`` is an error). Each row is a dict
    of ``input_ids``, ``position_ids`` (restarting at 0 for each example) and ``labels``, where the
    label of every example's first token is -100: the token before it belongs to another example.
    """
    _check_max_length(max_length, field)
    rows: list[dict[str, list[int]]] = []
    for ids, labels in encoded:
        if len(ids) != len(labels):
            raise ValueError(f"an example has {len(ids)} ids but {len(labels)} labels")
        if not ids:
            continue
        if len(ids) > max_length:
            raise LensbenchError(f"an example has {len(ids)} tokens, more than max_length={max_length}; "
                                 f"raise max_length to at least {len(ids)}", _sub(field, "max_length"))
        row = next((r for r in rows if len(r["input_ids"]) + len(ids) <= max_length), None)
        if row is None:
            row = {"input_ids": [], "position_ids": [], "labels": []}
            rows.append(row)
        row["input_ids"].extend(ids)
        row["position_ids"].extend(range(len(ids)))
        row["labels"].extend([IGNORE, *labels[1:]])
    return rows


def block_causal_mask(position_ids: torch.Tensor, additive: bool = False,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``[batch, 1, length, length]`` causal mask keeping packed examples apart.

    An example starts wherever a position is not the previous one plus 1 (so each padding token
    at position 0 is its own one-token example, attending to itself only). Boolean: True where a
    query may attend to a key (``sdpa``); ``additive``: 0 there and the dtype's minimum elsewhere
    (``eager``, which adds the mask to the attention scores).
    """
    first = position_ids[:, :1] - 1
    starts = torch.diff(position_ids, prepend=first, dim=-1) != 1
    example = starts.cumsum(-1)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (example[:, :, None] == example[:, None, :]) & causal
    allowed = allowed[:, None]
    if not additive:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=position_ids.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class PackedCollator:
    """Rows -> packed ``input_ids``, ``position_ids``, ``labels`` (LongTensors), no ``attention_mask``,
    and ``token_mask`` (bool: True on example tokens, False on the padding of a batch's last rows).

    The rows of one batch are encoded with their answer mask (``mask`` as in ``PaddedCollator``),
    packed by ``pack`` into rows of at most ``max_length`` tokens, and those padded to the longest
    packed row (pad id, position 0, label -100), so a batch of n examples gives between 1 and n
    packed rows. Call the model with ``use_cache=False`` (see the module docstring), or set
    ``block_mask`` to ``"bool"`` or ``"additive"`` to also get an explicit 4-D block-diagonal
    causal ``attention_mask`` (``mask_dtype`` is the additive mask's dtype; match the model's).
    """

    def __init__(self, tokenizer, mask: str, max_length: int, append_eos: bool = False, add_bos: bool = False,
                 block_mask: str | None = None, mask_dtype: torch.dtype = torch.float32,
                 field: str | None = None) -> None:
        get_mask(mask, _sub(field, "mask"))
        _check_max_length(max_length, field)
        if block_mask not in BLOCK_MASKS:
            raise LensbenchError(f"block_mask must be null, 'bool' or 'additive', got {block_mask!r}",
                                 _sub(field, "block_mask"))
        self.tokenizer = tokenizer
        self.mask = mask
        self.max_length = max_length
        self.append_eos = append_eos
        self.add_bos = add_bos
        self.block_mask = block_mask
        self.mask_dtype = mask_dtype
        self.field = field
        self.pad_id = pad_id(tokenizer, field)

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        encoded = [row_labels(self.tokenizer, row, self.mask, self.append_eos, self.max_length, self.add_bos,
                              self.field) for row in rows]
        packed = pack(encoded, self.max_length, self.field)
        width = max(len(r["input_ids"]) for r in packed)
        fill = {"input_ids": self.pad_id, "position_ids": 0, "labels": IGNORE}
        batch = {key: torch.tensor([r[key] + [value] * (width - len(r[key])) for r in packed], dtype=torch.long)
                 for key, value in fill.items()}
        batch["token_mask"] = torch.tensor([[True] * len(r["input_ids"]) + [False] * (width - len(r["input_ids"]))
                                            for r in packed], dtype=torch.bool)
        if self.block_mask is not None:
            batch["attention_mask"] = block_causal_mask(batch["position_ids"], self.block_mask == "additive",
                                                        self.mask_dtype)
        return batch
