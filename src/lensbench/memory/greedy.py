"""Greedy generation of the answers of a batch of question-answer rows, batched, exact.

Each row's prompt is its tokens before its first answer token (the tokens the teacher-forced
pass saw, so both score the same prefix); it generates as many tokens as its answer spans, plus
``extra`` (an end marker the training data appended). Greedy decoding and the teacher-forced pass
agree up to and including the first answer token the model gets wrong: those tokens are taken from
the teacher-forced logits, and only rows with a wrong token before their last one are run on, all
of them together, one forward pass per new token (right padding: no position ids to shift).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Greedy:
    """One row's greedy answer."""

    tokens: list[int]
    """The generated token ids (the answer's span, plus ``extra``)."""
    exact: bool
    """Every answer token (and end marker) generated as in the row."""
    finite: bool
    """Every logit the tokens were chosen from was finite (else ``exact`` means nothing)."""


def greedy_answers(model, input_ids: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, pad_id: int,
                   extra: int = 0, end_ids: set[int] | frozenset[int] = frozenset()) -> list[Greedy]:
    """Greedy answers of the right-padded rows ``input_ids`` (answer tokens: ``labels`` != -100)
    whose teacher-forced ``logits`` (``model(input_ids).logits``, on the model's device) are given;
    ``extra`` tokens more than each answer, which must be one of ``end_ids`` to be exact."""
    device = logits.device
    target = labels[:, 1:]
    results: dict[int, Greedy] = {}
    rows: dict[int, dict] = {}  # row -> its prompt length, tokens so far, truth, width, finite
    for b in range(input_ids.shape[0]):
        pos = (target[b] != -100).nonzero().flatten().tolist()
        if not pos:
            results[b] = Greedy([], True, True)
            continue
        first, last = pos[0], pos[-1]
        scored = logits[b, first:last + 1]
        row = {"prompt": first + 1, "seq": input_ids[b, :first + 1].tolist(), "width": last - first + 1 + extra,
               "truth": input_ids[b, first + 1:last + 2].tolist(), "finite": True}
        finite = torch.isfinite(scored).all(-1).tolist()
        for k, token in enumerate(scored.argmax(-1).tolist()):  # the teacher-forced prefix is the greedy one while right
            row["seq"].append(token)
            row["finite"] = row["finite"] and finite[k]
            if token != row["truth"][k]:
                break
        rows[b] = row

    def unfinished() -> list[int]:
        return [b for b, r in rows.items() if len(r["seq"]) - r["prompt"] < r["width"]]

    todo = unfinished()
    while todo:
        seqs = [rows[b]["seq"] for b in todo]
        ids = torch.full((len(todo), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        with torch.inference_mode():
            step = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        at = step[torch.arange(len(todo), device=step.device), torch.tensor([len(s) - 1 for s in seqs],
                                                                               device=step.device)].float()
        finite = torch.isfinite(at).all(-1).tolist()
        for i, token in enumerate(at.argmax(-1).tolist()):
            rows[todo[i]]["seq"].append(token)
            rows[todo[i]]["finite"] = rows[todo[i]]["finite"] and finite[i]
        todo = unfinished()
    for b, r in rows.items():
        tokens = r["seq"][r["prompt"]:]
        answer = r["width"] - extra
        exact = tokens[:answer] == r["truth"][:answer] and all(t in end_ids for t in tokens[answer:])
        results[b] = Greedy(tokens, exact, r["finite"])
    return [results[b] for b in range(input_ids.shape[0])]
