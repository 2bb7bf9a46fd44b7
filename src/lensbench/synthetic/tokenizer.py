"""``chars``: a tokenizer with one token per printable ASCII character.

Synthetic memorization data is digits, letters and a few symbols; a model trained on it needs no
49k-token vocabulary, whose output layer would cost most of a small model's compute. Offsets are
character positions, so the answer masks (defined on characters) map to tokens one to one.
Token ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, then ``string.printable`` without
tabs and line breaks, in that order (``0`` is id 4).
"""

from __future__ import annotations

import string
from typing import Any

NAME = "chars"


def char_tokenizer() -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in string.printable:
        if c not in "\n\r\x0b\x0c\t":
            vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # decode joins characters as they are (no spaces between tokens)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
