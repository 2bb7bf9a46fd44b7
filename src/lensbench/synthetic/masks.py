"""Answer masks: which characters of a synthetic example a model is trained to predict.

A mask type maps a text to character spans ``[(start, end), ...]`` (end exclusive); the tokens
overlapping a span are trained, every other token gets the label ``-100`` (ignored by the loss).
The types, registered by name in ``MASKS``:

- ``qa``: everything after the LAST ``?`` of the text; when the text has no ``?``, everything after
  its FIRST ``:`` (the pair format ``"123456:654321 "`` trains ``"654321 "``; the question
  ``"What is paired with 123456? 654321"`` trains ``" 654321"``).
- ``digit_lookup``: only the value after the LAST ``:``, up to (not including) trailing whitespace
  (``"152435:145344 "`` trains ``"145344"``; the two-hop fact ``"A::C "`` trains ``"C"``).
- ``hashhop``: only the characters between the quotes of every ``= '...'`` (``"KmNp = 'QrSt'"``
  trains ``"QrSt"``; the chain of thought ``"hops=2 cot=1 Ab = 'Cd' = 'Ef'"`` trains ``"Cd"`` and
  ``"Ef"``; the ``=`` of ``hops=2`` is not followed by a quote and trains nothing).
- ``last_word``: the last word of the text, without trailing punctuation or whitespace (a fact
  such as ``"The capital of France is Paris."`` trains ``"Paris"``).
- ``none``: the whole text (plain causal language modelling).

A synthetic dataset can say itself where the answer of a row is: its ``answer_spans(row, mask)``
method (``lensbench.synthetic.datasets.SyntheticDataset``; by default the mask type's spans of
``row["text"]``). ``DatasetMask`` binds a mask type name to such a dataset, and ``row_spans`` asks
the dataset when a mask is bound, so the collators of ``lensbench fit`` and memory_ablation's
scored answer positions use the same spans.

``token_labels`` turns a text and a mask type into ``(input_ids, labels)``. The overlap rule: a
token whose character span ``[s, e)`` shares at least one character with a trained span is
trained (so a multi-character token such as ``":654321"`` straddling the boundary is trained).

End of sequence: with ``append_eos=True`` the tokenizer's EOS token is appended, and it is trained
exactly when the text after the end of the last trained span holds no letter or digit (only
whitespace or punctuation such as a closing quote): the answer then ends the example, and the
model learns to stop after it. An answer followed by more words leaves the EOS untrained.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from ..errors import LensbenchError, did_you_mean

Span = tuple[int, int]
IGNORE = -100
"""The label of a token the loss ignores."""


def qa_spans(text: str) -> list[Span]:
    """After the last ``?``; else after the first ``:``; else nothing."""
    question = text.rfind("?")
    if question >= 0:
        start = question + 1
    else:
        colon = text.find(":")
        if colon < 0:
            return []
        start = colon + 1
    return [(start, len(text))] if start < len(text) else []


def digit_lookup_spans(text: str) -> list[Span]:
    """The value after the last ``:``, trailing whitespace excluded."""
    colon = text.rfind(":")
    if colon < 0:
        return []
    start, end = colon + 1, len(text.rstrip())
    return [(start, end)] if start < end else []


_QUOTED = re.compile(r"= '([^']*)'")


def hashhop_spans(text: str) -> list[Span]:
    """The inside of every ``= '...'``."""
    return [m.span(1) for m in _QUOTED.finditer(text) if m.end(1) > m.start(1)]


def none_spans(text: str) -> list[Span]:
    """The whole text."""
    return [(0, len(text))] if text else []


def last_word_spans(text: str) -> list[Span]:
    """The last run of word characters (letters, digits, ``-``, ``'``) with its trailing punctuation dropped."""
    match = None
    for match in re.finditer(r"[\w'-]+", text):
        pass
    return [(match.start(), match.end())] if match else []


MASKS: dict[str, Callable[[str], list[Span]]] = {
    "qa": qa_spans,
    "last_word": last_word_spans,
    "digit_lookup": digit_lookup_spans,
    "hashhop": hashhop_spans,
    "none": none_spans,
}
"""Mask type name -> ``spans(text)``, the trained character spans of ``text``."""


def get_mask(name: str, field: str | None = "mask") -> Callable[[str], list[Span]]:
    """The span function of mask type ``name``; else ``LensbenchError`` with close matches."""
    try:
        return MASKS[name]
    except (KeyError, TypeError):
        raise LensbenchError(f"unknown mask type {name!r}; {did_you_mean(str(name), list(MASKS))}", field) from None


class DatasetMask(str):
    """A mask type name bound to the synthetic dataset whose rows it masks.

    It is the ``str`` of the name (configs, messages and comparisons see ``"qa"`` and the like);
    ``row_spans`` asks ``dataset.answer_spans(row, name)`` for the trained spans of a row.
    """

    dataset: Any

    def __new__(cls, name: str, dataset: Any) -> DatasetMask:
        obj = super().__new__(cls, name)
        obj.dataset = dataset
        return obj

    def __reduce__(self):
        return DatasetMask, (str(self), self.dataset)


def row_spans(mask: str, row: dict, field: str | None = None) -> list[Span]:
    """The trained character spans of ``row["text"]``: the bound dataset's ``answer_spans(row, mask)``
    when ``mask`` is a ``DatasetMask``, else the spans of mask type ``mask``. Spans a dataset gives
    must be ``(start, end)`` integers with ``0 <= start <= end <= len(text)``, else
    ``LensbenchError`` naming ``<field>.dataset``."""
    dataset = getattr(mask, "dataset", None)
    if dataset is None:
        return get_mask(mask, _sub(field, "mask"))(row["text"])
    spans = dataset.answer_spans(row, str(mask))
    text = row["text"]
    try:
        spans = [(int(a), int(b)) for a, b in spans]
        ok = all(0 <= a <= b <= len(text) for a, b in spans)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise LensbenchError(f"the answer_spans of synthetic dataset {dataset.name!r} gave {spans!r} for the text "
                             f"{text[:60]!r}; it must return (start, end) character offsets with 0 <= start <= end "
                             f"<= len(text): fix the dataset's answer_spans", _sub(field, "dataset"))
    return spans


def eos_trained(text: str, spans: list[Span]) -> bool:
    """Whether an EOS appended to ``text`` is trained: the text after the last span has no letter or digit."""
    if not spans:
        return False
    end = max(e for _, e in spans)
    return not any(c.isalnum() for c in text[end:])


def _sub(prefix: str | None, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def token_labels(tokenizer, text: str, mask: str, append_eos: bool = False, max_length: int | None = None,
                 add_bos: bool = False, field: str | None = None,
                 spans: list[Span] | None = None) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of ``text`` under mask type ``mask`` (or the trained character
    ``spans`` when given: ``row_labels`` passes a dataset's own).

    The text is tokenized without special tokens; ``add_bos`` prepends the tokenizer's BOS (never
    trained) and ``append_eos`` appends its EOS (trained by the rule of the module docstring). A
    token's label is its id when it overlaps a trained span, else ``-100``. A text longer than
    ``max_length`` tokens (BOS and EOS included) or with no trained token is an error, never cut
    or skipped silently. ``field`` prefixes the config fields named in errors (``data.init_args``).
    """
    if spans is None:
        spans = get_mask(mask, _sub(field, "mask"))(text)
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = list(encoded["input_ids"])
    labels = [
        tok if any(s < b and a < e for a, b in spans) else IGNORE
        for tok, (s, e) in zip(ids, encoded["offset_mapping"])
    ]
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise LensbenchError("the tokenizer has no BOS token; set add_bos to false", _sub(field, "add_bos"))
        ids.insert(0, tokenizer.bos_token_id)
        labels.insert(0, IGNORE)
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise LensbenchError("the tokenizer has no EOS token; set append_eos to false",
                                 _sub(field, "append_eos"))
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id if eos_trained(text, spans) else IGNORE)
    if all(label == IGNORE for label in labels):
        dataset = getattr(mask, "dataset", None)
        if dataset is not None and _own_answer_spans(dataset):
            raise LensbenchError(f"the answer_spans of synthetic dataset {dataset.name!r} trains no token of the "
                                 f"text {text!r}; give every row a non-empty answer", _sub(field, "dataset"))
        raise LensbenchError(
            f"mask {mask!r} trains no token of the text {text!r}; use a mask type matching the dataset's "
            f"format ({', '.join(MASKS)})",
            _sub(field, "mask"),
        )
    if max_length is not None and len(ids) > max_length:
        raise LensbenchError(
            f"a text has {len(ids)} tokens, more than max_length={max_length} ({text[:60]!r}...); "
            f"raise max_length to at least {len(ids)}",
            _sub(field, "max_length"),
        )
    return ids, labels


def _own_answer_spans(dataset: Any) -> bool:
    """Whether ``dataset`` overrides ``SyntheticDataset.answer_spans`` (errors then name its hook),
    whose default is marked ``default``."""
    return not getattr(type(dataset).answer_spans, "default", False)


def row_labels(tokenizer, row: dict, mask: str, append_eos: bool = False, max_length: int | None = None,
               add_bos: bool = False, field: str | None = None) -> tuple[list[int], list[int]]:
    """``token_labels`` of ``row["text"]`` with the spans ``row_spans`` gives (a bound dataset's own)."""
    return token_labels(tokenizer, row["text"], mask, append_eos, max_length, add_bos, field,
                        row_spans(mask, row, field))
