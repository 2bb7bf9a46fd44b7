"""Answer masks token by token, padded and packed collators, and packed attention in a tiny Llama."""

from __future__ import annotations

import string
from collections import Counter

import pytest
import torch

from lensbench.errors import LensbenchError
from lensbench.synthetic.collate import PackedCollator, PaddedCollator, block_causal_mask, pack
from lensbench.synthetic.datasets import DigitLookup, HashHop, SyntheticQA, TwoHop
from lensbench.synthetic.masks import MASKS, get_mask, token_labels

IGNORE = -100


def char_tokenizer():
    """One token per printable character (offsets = character positions), with BOS, EOS and pad."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in string.printable:
        if c not in "\n\r\x0b\x0c\t":
            vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def word_tokenizer(words: list[str], splitter: str = "whitespace"):
    """Multi-character tokens: ``WhitespaceSplit`` (``"123456:654321"`` is one token) or
    ``Whitespace`` (words and punctuation runs apart). No BOS, EOS or pad."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit() if splitter == "whitespace" else pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


CHAR = char_tokenizer()


def expected(text: str, marks: str) -> list[int]:
    """Labels of ``text`` under the char tokenizer: ``^`` under a character marks it trained."""
    assert len(marks) <= len(text)
    marks = marks.ljust(len(text))
    return [CHAR.convert_tokens_to_ids(c) if m == "^" else IGNORE for c, m in zip(text, marks)]


@pytest.mark.parametrize("mask,text,marks", [
    ("qa", "123456:654321 ",
           "       ^^^^^^^"),
    ("qa", "What is paired with 123456? 654321",
           "                           ^^^^^^^"),
    ("qa", "Why? Which one is paired with 12? 34 5",
           "                                 ^^^^^"),
    ("qa", "a:b:c",
           "  ^^^"),
    ("digit_lookup", "152435:145344 ",
                     "       ^^^^^^"),
    ("digit_lookup", "762526::753198 ",
                     "        ^^^^^^"),
    ("digit_lookup", "A::C  ",
                     "   ^"),
    ("hashhop", "KmNp = 'QrSt'",
                "        ^^^^"),
    ("hashhop", "hops=3 cot=1 Ab = 'Cd' = 'Ef' = 'Gh'",
                "                   ^^     ^^     ^^"),
    ("hashhop", "hops=2 cot=0 Ab = 'Gh'",
                "                   ^^"),
    ("none", "ab: c?",
             "^^^^^^"),
])
def test_char_labels(mask, text, marks):
    ids, labels = token_labels(CHAR, text, mask)
    assert ids == CHAR.convert_tokens_to_ids(list(text))
    assert labels == expected(text, marks)


@pytest.mark.parametrize("mask,text,eos_trained", [
    ("qa", "123456:654321 ", True),
    ("qa", "What is paired with 1? 2", True),
    ("digit_lookup", "152435:145344 ", True),
    ("hashhop", "KmNp = 'QrSt'", True),
    ("hashhop", "KmNp = 'QrSt' is the link", False),
    ("none", "anything at all", True),
])
def test_eos_rule(mask, text, eos_trained):
    ids, labels = token_labels(CHAR, text, mask, append_eos=True)
    plain_ids, plain_labels = token_labels(CHAR, text, mask)
    assert ids == plain_ids + [CHAR.eos_token_id]
    assert labels == plain_labels + [CHAR.eos_token_id if eos_trained else IGNORE]


def test_bos_and_max_length():
    ids, labels = token_labels(CHAR, "12:34 ", "digit_lookup", append_eos=True, add_bos=True, max_length=8)
    assert ids[0] == CHAR.bos_token_id and labels[0] == IGNORE and len(ids) == 8
    with pytest.raises(LensbenchError, match="raise max_length to at least 8") as err:
        token_labels(CHAR, "12:34 ", "digit_lookup", append_eos=True, add_bos=True, max_length=7,
                     field="data.init_args")
    assert err.value.field == "data.init_args.max_length"
    with pytest.raises(LensbenchError, match="no BOS"):
        token_labels(word_tokenizer(["a"]), "a:b", "qa", add_bos=True)


def test_untrained_text_and_unknown_mask():
    with pytest.raises(LensbenchError, match="mask 'qa' trains no token of the text 'no answer here'") as err:
        token_labels(CHAR, "no answer here", "qa", field="data.init_args")
    assert err.value.field == "data.init_args.mask"
    with pytest.raises(LensbenchError, match="trains no token"):
        token_labels(CHAR, "1234:  ", "digit_lookup")
    with pytest.raises(LensbenchError, match="trains no token"):
        token_labels(CHAR, "KmNp = ''", "hashhop")
    with pytest.raises(LensbenchError, match="did you mean 'hashhop'") as err:
        get_mask("hashop", "data.init_args.mask")
    assert err.value.field == "data.init_args.mask"
    assert set(MASKS) == {"qa", "digit_lookup", "hashhop", "last_word", "none"}
    ids, labels = token_labels(CHAR, "The capital of Kenya is Nairobi.", "last_word")
    assert [CHAR.convert_ids_to_tokens(i) for i, lab in zip(ids, labels) if lab != -100] == list("Nairobi")


def test_overlap_rule_multichar_tokens():
    whole = word_tokenizer(["123456:654321", "KmNp", "=", "'QrSt'", "What", "is", "paired", "with", "12?", "34"])
    ids, labels = token_labels(whole, "123456:654321 ", "qa")
    assert len(ids) == 1 and labels == ids  # the one token straddles ':' and is trained
    ids, labels = token_labels(whole, "KmNp = 'QrSt'", "hashhop")
    assert whole.convert_ids_to_tokens(ids) == ["KmNp", "=", "'QrSt'"] and labels == [IGNORE, IGNORE, ids[2]]
    ids, labels = token_labels(whole, "What is paired with 12? 34", "qa")
    assert labels == [IGNORE] * 5 + [ids[5]]  # "12?" ends at the '?' and is not trained
    split = word_tokenizer(["123456", ":", "654321", "What", "is", "paired", "with", "12", "?", "34"], "punct")
    ids, labels = token_labels(split, "123456:654321 ", "qa")
    assert split.convert_ids_to_tokens(ids) == ["123456", ":", "654321"] and labels == [IGNORE, IGNORE, ids[2]]
    ids, labels = token_labels(split, "What is paired with 12? 34", "qa")
    assert labels == [IGNORE] * 6 + [ids[6]]


@pytest.mark.parametrize("ds,mask", [(SyntheticQA(), "qa"), (DigitLookup(), "digit_lookup"),
                                     (TwoHop(), "digit_lookup"), (HashHop(), "hashhop")])
def test_dataset_answers_are_trained(ds, mask):
    """Under its default mask, every eval row trains exactly the answer's characters (plus the
    space the qa mask keeps after the separator)."""
    assert ds.mask == mask
    small = {"synthetic_qa": {"num_pairs": 8, "format": "question"}, "digit_lookup": {"num_pairs": 5, "test_size": 2},
             "two_hop": {"num_chains": 4}, "hashhop": {"num_chains": 2, "max_hops": 3}}[ds.name]
    splits = ds.generate(0, ds.options(small, "o"))
    for split, rows in splits.items():
        for row in rows:
            ids, labels = token_labels(CHAR, row["text"], mask)
            trained = "".join(c for c, lab in zip(row["text"], labels) if lab != IGNORE)
            answer = row["answer"].replace("' = '", "") if mask == "hashhop" else row["answer"]
            assert trained.strip() == answer, (split, row)


ROWS = [{"text": "12:345 "}, {"text": "9:8 "}, {"text": "KmNp = 'QrSt'"}, {"text": "What is 1? 2"}]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_collator(side):
    collate = PaddedCollator(CHAR, "qa", max_length=32, append_eos=True, pad_side=side)
    batch = collate(ROWS[:2] + ROWS[3:])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (3, 13)
    for i, row in enumerate(ROWS[:2] + ROWS[3:]):
        ids, labels = token_labels(CHAR, row["text"], "qa", append_eos=True)
        pad = 13 - len(ids)
        keep = slice(0, len(ids)) if side == "right" else slice(pad, 13)
        assert batch["input_ids"][i, keep].tolist() == ids
        assert batch["labels"][i, keep].tolist() == labels
        assert batch["attention_mask"][i, keep].tolist() == [1] * len(ids)
        rest = slice(len(ids), 13) if side == "right" else slice(0, pad)
        assert batch["labels"][i, rest].tolist() == [IGNORE] * pad
        assert batch["attention_mask"][i, rest].tolist() == [0] * pad
        assert batch["input_ids"][i, rest].tolist() == [CHAR.pad_token_id] * pad
    with pytest.raises(LensbenchError, match="raise max_length"):
        PaddedCollator(CHAR, "qa", max_length=5)(ROWS[:1])
    with pytest.raises(LensbenchError) as err:
        PaddedCollator(CHAR, "qa", max_length=5, pad_side="middle", field="data.init_args")
    assert err.value.field == "data.init_args.pad_side"


def test_pack_first_fit():
    lengths = [5, 3, 4, 2, 6, 1]
    encoded, start = [], 0
    for n in lengths:
        ids = list(range(start, start + n))
        encoded.append((ids, [i + 1000 for i in ids]))
        start += n
    rows = pack(encoded, 8)
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    assert [r["input_ids"] for r in rows] == [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 20],
                                              [14, 15, 16, 17, 18, 19]]
    assert rows[0]["labels"] == [IGNORE, 1001, 1002, 1003, 1004, IGNORE, 1006, 1007]
    assert rows[1]["labels"] == [IGNORE, 1009, 1010, 1011, IGNORE, 1013, IGNORE]
    all_ids = [t for r in rows for t in r["input_ids"]]
    assert Counter(all_ids) == Counter(range(21))
    with pytest.raises(LensbenchError, match="at least 9"):
        pack([(list(range(9)), list(range(9)))], 8)


def tiny_llama(impl: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(CHAR), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation=impl, pad_token_id=CHAR.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    assert model.config._attn_implementation == impl
    return model


PACK_ROWS = [{"text": t} for t in ("123456:654321 ", "9:8 ", "KmNp = 'QrSt'", "What is 1? 2", "41:7 ",
                                   "hops=2 cot=1 Ab = 'Cd' = 'Ef'")]


def examples_in(batch: dict) -> list[tuple[int, int, int]]:
    """(row, start, end) of every example in a packed batch (padding excluded)."""
    found = []
    for r, (ids, pos) in enumerate(zip(batch["input_ids"].tolist(), batch["position_ids"].tolist())):
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            if b - a > 1 or ids[a] != CHAR.pad_token_id:
                found.append((r, a, b))
    return found


def test_packed_collator_layout():
    collate = PackedCollator(CHAR, "qa", max_length=30, append_eos=True)
    rows = [r for r in PACK_ROWS if ":" in r["text"] or "?" in r["text"]]
    batch = collate(rows)
    assert set(batch) == {"input_ids", "position_ids", "labels", "token_mask"}
    encoded = [token_labels(CHAR, r["text"], "qa", append_eos=True) for r in rows]
    spans = examples_in(batch)
    assert len(spans) == 4 and batch["input_ids"].shape == (2, 26)
    pieces = sorted((batch["input_ids"][r, a:b].tolist(), batch["labels"][r, a:b].tolist()) for r, a, b in spans)
    assert pieces == sorted((ids, [IGNORE] + labels[1:]) for ids, labels in encoded)
    for r, a, b in spans:
        assert batch["position_ids"][r, a:b].tolist() == list(range(b - a))
    ids = batch["input_ids"].tolist()
    used = sum(b - a for _, a, b in spans)
    pad = sum(row.count(CHAR.pad_token_id) for row in ids)
    assert used + pad == batch["input_ids"].numel()
    assert int(batch["token_mask"].sum()) == used  # the padding of short rows is not a token
    for r, a, b in spans:
        assert batch["token_mask"][r, a:b].all()
    with pytest.raises(LensbenchError) as err:
        PackedCollator(CHAR, "qa", max_length=30, block_mask="2d", field="data.init_args")
    assert err.value.field == "data.init_args.block_mask"


def test_block_causal_mask():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    allowed = block_causal_mask(pos)[0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                       [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    additive = block_causal_mask(pos, additive=True)[0, 0]
    assert (additive[torch.tensor(allowed).bool()] == 0).all()
    assert (additive[~torch.tensor(allowed).bool()] == torch.finfo(torch.float32).min).all()


def _check_packed_logits(model, batch: dict, **call) -> None:
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **call).logits
        spans = examples_in(batch)
        assert len(spans) == len(PACK_ROWS)
        for r, a, b in spans:
            alone = model(input_ids=batch["input_ids"][r:r + 1, a:b]).logits[0]
            torch.testing.assert_close(packed[r, a:b], alone, atol=1e-5, rtol=0)
        # packed loss = the loss of the examples run alone (first-token labels exclude cross-example targets)
        ce = torch.nn.functional.cross_entropy
        packed_loss = ce(packed[:, :-1].reshape(-1, packed.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                         ignore_index=IGNORE, reduction="sum")
        alone_loss = sum(ce(model(input_ids=batch["input_ids"][r:r + 1, a:b]).logits[0, :-1],
                            batch["labels"][r, a + 1:b], ignore_index=IGNORE, reduction="sum") for r, a, b in spans)
        torch.testing.assert_close(packed_loss, alone_loss, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_logits_from_position_ids(impl):
    """transformers builds the block-diagonal mask from restarting position_ids (no cache)."""
    model = tiny_llama(impl)
    batch = PackedCollator(CHAR, "none", max_length=40, append_eos=True)(PACK_ROWS)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] < len(PACK_ROWS)
    _check_packed_logits(model, batch, use_cache=False)
    # the check has teeth: without restarting positions the examples see each other
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], use_cache=False).logits
    r, a, b = next(s for s in examples_in(batch) if s[1] > 0)
    with torch.no_grad():
        alone = model(input_ids=batch["input_ids"][r:r + 1, a:b]).logits[0]
    assert (plain[r, a:b] - alone).abs().max() > 1e-3


@pytest.mark.parametrize("impl,kind", [("sdpa", "bool"), ("sdpa", "additive"), ("eager", "additive")])
def test_packed_logits_with_block_mask(impl, kind):
    """The explicit 4-D mask keeps examples apart even with the model's default cache."""
    model = tiny_llama(impl)
    batch = PackedCollator(CHAR, "none", max_length=40, append_eos=True, block_mask=kind)(PACK_ROWS)
    assert batch["attention_mask"].shape == (batch["input_ids"].shape[0], 1) + (batch["input_ids"].shape[1],) * 2
    _check_packed_logits(model, batch, attention_mask=batch["attention_mask"])
