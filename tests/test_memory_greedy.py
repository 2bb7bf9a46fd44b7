"""lensbench.memory.greedy on a model whose greedy answer is known: it always predicts the token
after the last one (t -> t + 1). A row whose answer follows its prompt generates it exactly, and
without a forward pass of its own; a row whose answer does not generates the counting sequence (not
the teacher-forced predictions, which restart from each true token); ``extra`` tokens past the
answer are exact only when they are end tokens; rows of different lengths pad on the right."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lensbench.memory.greedy import greedy_answers

VOCAB = 32
PAD = 0


class Counting:
    """Logits whose argmax is the input token plus one, at every position; counts its calls."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, input_ids, attention_mask=None, use_cache=False):
        self.calls.append(input_ids.shape[0])
        return SimpleNamespace(logits=torch.nn.functional.one_hot((input_ids + 1) % VOCAB, VOCAB).float() * 5)


def batch(rows: list[tuple[list[int], int]]):
    """Right-padded ``input_ids`` and ``labels`` (the last ``n`` tokens of each row are its answer)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), PAD)
    labels = torch.full((len(rows), width), -100)
    for b, (ids, n) in enumerate(rows):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        labels[b, len(ids) - n:len(ids)] = torch.tensor(ids[-n:])
    return input_ids, labels


def test_greedy_answers_follow_the_model_not_the_true_prefix():
    model = Counting()
    input_ids, labels = batch([([1, 2, 3, 4, 5], 3), ([1, 2, 7, 8, 9], 3), ([10, 11, 12], 1)])
    logits = model(input_ids).logits[:, :-1]
    got = greedy_answers(model, input_ids, labels, logits, PAD)
    assert [g.tokens for g in got] == [[3, 4, 5], [3, 4, 5], [12]]
    assert [g.exact for g in got] == [True, False, True] and all(g.finite for g in got)
    # teacher-forced, row 1 predicts 3, 8, 9 (each after a true token); greedy continues from its own 3
    assert logits[1, 1:4].argmax(-1).tolist() == [3, 8, 9]
    assert model.calls == [3, 1, 1]  # only row 1, wrong at its first token, runs on: two more tokens


def test_an_end_marker_is_generated_after_the_answer_and_must_be_an_end_token():
    model = Counting()
    input_ids, labels = batch([([1, 2, 3, 4, 5], 3), ([20, 21], 1)])
    logits = model(input_ids).logits[:, :-1]
    got = greedy_answers(model, input_ids, labels, logits, PAD, extra=1, end_ids={6})
    assert [g.tokens for g in got] == [[3, 4, 5, 6], [21, 22]]
    assert [g.exact for g in got] == [True, False]  # 22 is no end token
    assert model.calls == [2, 2]  # both rows run on for the end marker, together


def test_a_non_finite_logit_marks_the_answer():
    model = Counting()
    input_ids, labels = batch([([1, 2, 3, 4, 5], 3), ([1, 2, 3], 1)])
    logits = model(input_ids).logits[:, :-1].clone()
    logits[0, 2, 7] = float("nan")
    got = greedy_answers(model, input_ids, labels, logits, PAD)
    assert [g.finite for g in got] == [False, True]
