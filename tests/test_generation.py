"""Batched generation: out-of-memory back-off, token counting, seeding, perplexity."""

from __future__ import annotations

import math

import pytest
import torch

from lensbench.generation import GenerationSettings, generate, perplexity
from lensbench.models.loading import ModelSpec, load_model


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_model(ModelSpec(str(tiny_model)), padding_side="left")


PROMPTS = ["the capital of france is", "water moss cell", "the sun and the moon", "a train to the sea",
           "protein in the cell", "it was on the train"]


def test_out_of_memory_halves_the_batch_and_records_it(tiny, monkeypatch):
    settings = GenerationSettings(max_new_tokens=5, do_sample=False, max_batch_size=8)
    reference = generate(tiny.model, tiny.tokenizer, PROMPTS, GenerationSettings(max_new_tokens=5, do_sample=False,
                                                                                  max_batch_size=1), 0, torch.device("cpu"))
    real = tiny.model.generate
    sizes = []

    def limited(**kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(**kwargs)

    monkeypatch.setattr(tiny.model, "generate", limited)
    results = generate(tiny.model, tiny.tokenizer, PROMPTS, settings, 0, torch.device("cpu"))
    assert sizes[:3] == [6, 4, 2]  # all 6 prompts (batch 8), then batches of 4, then of 2
    assert [r.batch_size for r in results] == [2] * 6
    assert [r.output for r in results] == [r.output for r in reference]  # greedy: batching changes nothing


def test_out_of_memory_at_batch_one_is_raised(tiny, monkeypatch):
    def always(**kwargs):
        raise torch.cuda.OutOfMemoryError("simulated")

    monkeypatch.setattr(tiny.model, "generate", always)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        generate(tiny.model, tiny.tokenizer, PROMPTS[:2], GenerationSettings(max_batch_size=4), 0, torch.device("cpu"))


def test_tokens_count_up_to_the_first_end_of_sequence(tiny):
    results = generate(tiny.model, tiny.tokenizer, PROMPTS, GenerationSettings(max_new_tokens=7, do_sample=False),
                       0, torch.device("cpu"))
    for r in results:
        assert 1 <= r.tokens <= 7
        decoded = tiny.tokenizer(r.output, add_special_tokens=False)["input_ids"]
        assert len(decoded) <= r.tokens


def test_sampling_is_reproducible_with_a_seed_and_differs_across_seeds(tiny):
    s = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=1.5, max_batch_size=6)
    a = [r.output for r in generate(tiny.model, tiny.tokenizer, PROMPTS, s, 42, torch.device("cpu"))]
    b = [r.output for r in generate(tiny.model, tiny.tokenizer, PROMPTS, s, 42, torch.device("cpu"))]
    c = [r.output for r in generate(tiny.model, tiny.tokenizer, PROMPTS, s, 43, torch.device("cpu"))]
    assert a == b and a != c


def test_perplexity_is_token_weighted_over_windows(tiny):
    text = " ".join(PROMPTS * 3)
    ids = tiny.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        whole = tiny.model(input_ids=ids, labels=ids).loss.item()
    assert perplexity(tiny.model, tiny.tokenizer, text, 10_000, torch.device("cpu")) == pytest.approx(math.exp(whole), rel=1e-5)
    # windows of 8 tokens: the mean NLL over the windows' predicted tokens, weighted by their counts
    total, count = 0.0, 0
    for start in range(0, ids.shape[1], 8):
        w = ids[:, start : start + 8]
        if w.shape[1] < 2:
            continue
        with torch.no_grad():
            total += tiny.model(input_ids=w, labels=w).loss.item() * (w.shape[1] - 1)
        count += w.shape[1] - 1
    assert perplexity(tiny.model, tiny.tokenizer, text, 8, torch.device("cpu")) == pytest.approx(math.exp(total / count), rel=1e-5)
