"""Batched generation: out-of-memory back-off, kept for the run per (state, length class), and its
logging; memory-aware batch sizes from an injected memory probe (grow, warn, stop); prompts
tokenized once; token counting, seeding and the seeds recorded; perplexity through torchmetrics
and its pooled states. Out-of-memory errors are simulated by a wrapped ``model.generate``."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import lensbench.generation as generation
from lensbench.errors import LensbenchError
from lensbench.generation import (DEFAULT_PERPLEXITY_TEXT, Batching, GenerationSettings, GenerationStopped,
                                  PerplexitySettings, generate, length_class, perplexity, perplexity_state,
                                  pooled_perplexity)
from lensbench.testing import WORDS
from lensbench.models.loading import ModelSpec, load_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_model(ModelSpec(str(tiny_model)), padding_side="left")


PROMPTS = ["the capital of france is", "water moss cell", "the sun and the moon", "a train to the sea",
           "protein in the cell", "it was on the train"]


@pytest.fixture
def messages():
    """The records of lensbench's logger at DEBUG (Lightning's logger does not propagate to the root)."""
    loggers = [logging.getLogger("lightning.pytorch.lensbench"), logging.getLogger("lensbench.run")]
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    yield records
    for logger, level in zip(loggers, before):
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_out_of_memory_halves_the_batch_and_records_it(tiny, monkeypatch, messages):
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
    messages.clear()  # those of the reference
    results = generate(tiny.model, tiny.tokenizer, PROMPTS, settings, [10, 11, 12, 13, 14, 15], torch.device("cpu"))
    assert sizes[:3] == [6, 4, 2]  # all 6 prompts (batch 8), then batches of 4, then of 2
    assert [r.batch_size for r in results] == [2] * 6
    assert [r.output for r in results] == [r.output for r in reference]  # greedy: batching changes nothing
    # The seed each call really used: its first prompt's, in the batches that worked.
    assert [r.seed for r in results] == [10, 10, 12, 12, 14, 14]
    # Each back-off is one INFO line on the console logger; each call that worked one INFO line with
    # its batch size in the run log only.
    info = [m.getMessage() for m in messages if m.name == "lightning.pytorch.lensbench"]
    assert info == ["lensbench: batch size 8 -> 4 after CUDA out-of-memory (6 prompts in the failed call)",
                    "lensbench: batch size 4 -> 2 after CUDA out-of-memory (4 prompts in the failed call)"]
    calls = [m.getMessage() for m in messages if m.name == "lensbench.run" and m.levelno == logging.INFO]
    assert len(calls) == 3 and all("generated 2 prompts (batch size 2)" in m for m in calls), calls
    assert not any("GiB" in m for m in calls)  # memory is reported on CUDA only


def words(n: int, count: int, seed: int = 0) -> list[str]:
    """``count`` prompts of ``n`` words each (``n`` tokens: the tiny tokenizer is word-level)."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(n)) for _ in range(count)]


class Capped:
    """``model.generate`` that raises torch.OutOfMemoryError above a budget: at more than ``cap``
    prompts, or at more than ``tokens`` padded prompt tokens in a call; records each call's size."""

    def __init__(self, model, cap: int = 10**9, tokens: int = 10**9) -> None:
        self.real, self.cap, self.tokens = model.generate, cap, tokens
        self.sizes: list[int] = []
        self.failed: list[int] = []

    def __call__(self, **kwargs):
        n, width = kwargs["input_ids"].shape
        self.sizes.append(n)
        if n > self.cap or n * width > self.tokens:
            self.failed.append(n)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.real(**kwargs)


def steps(prompts: list[str], size: int):
    """The prompts in steps of ``size``, as the perturbation analysis hands them to generate."""
    return [(i, prompts[i : i + size]) for i in range(0, len(prompts), size)]


def test_an_out_of_memory_back_off_is_kept_for_the_rest_of_the_run(tiny, monkeypatch, messages):
    prompts = words(6, 150)  # one length class (6 tokens -> 8)
    seeds = list(range(1000, 1150))
    sampled = GenerationSettings(max_new_tokens=4, do_sample=True, temperature=1.5, max_batch_size=64)
    at16 = GenerationSettings(max_new_tokens=4, do_sample=True, temperature=1.5, max_batch_size=16)
    reference = [r for i, chunk in steps(prompts, 64)
                 for r in generate(tiny.model, tiny.tokenizer, chunk, at16, seeds[i : i + 64], CPU)]
    capped = Capped(tiny.model, cap=16)
    monkeypatch.setattr(tiny.model, "generate", capped)
    messages.clear()
    run = Batching(sampled, CPU)
    results = [r for i, chunk in steps(prompts, 64)
               for r in generate(tiny.model, tiny.tokenizer, chunk, sampled, seeds[i : i + 64], CPU,
                                 batching=run, key="state A")]
    # Two failures in the whole run (64, then 32), not two per step: the three steps of 64 prompts
    # all run at the 16 that worked.
    assert capped.failed == [64, 32] and run.out_of_memory == 2
    assert capped.sizes == [64, 32] + [16] * 4 + [16] * 4 + [16, 6]
    assert [r.batch_size for r in results] == [16] * 144 + [6] * 6
    # ... and the outputs are those of a run at batch size 16 throughout (same batches, same seeds).
    assert [(r.output, r.tokens, r.seed) for r in results] == [(r.output, r.tokens, r.seed) for r in reference]
    backoffs = [m.getMessage() for m in messages if m.name == "lightning.pytorch.lensbench"]
    assert backoffs == ["lensbench: batch size 64 -> 32 after CUDA out-of-memory (64 prompts in the failed call)",
                        "lensbench: batch size 32 -> 16 after CUDA out-of-memory (32 prompts in the failed call)"]
    # Kept per model state: another state learns its own size (a transform may change the memory needed).
    generate(tiny.model, tiny.tokenizer, prompts[:64], sampled, 0, CPU, batching=run, key="state B")
    assert capped.failed == [64, 32, 64, 32]
    generate(tiny.model, tiny.tokenizer, prompts[:64], sampled, 0, CPU, batching=run, key="state A")
    assert capped.failed == [64, 32, 64, 32] and capped.sizes[-4:] == [16] * 4


def test_only_a_shorter_length_class_tries_larger_sizes_again(tiny, monkeypatch):
    assert [length_class(n) for n in (1, 2, 3, 4, 5, 8, 9, 12)] == [1, 2, 4, 4, 8, 8, 16, 16]
    settings = GenerationSettings(max_new_tokens=3, do_sample=False, max_batch_size=8)
    long, short = words(12, 16, seed=1), words(3, 24, seed=2)  # classes 16 and 4
    capped = Capped(tiny.model, tokens=64)  # 8 x 12 fails, 4 x 12 fits; 8 x 3 fits
    monkeypatch.setattr(tiny.model, "generate", capped)
    run = Batching(settings, CPU)  # no memory probe (CPU): grows after every full batch
    generate(tiny.model, tiny.tokenizer, long[:8], settings, 0, CPU, batching=run, key="s")
    assert capped.sizes == [8, 4, 4]
    capped.sizes.clear()
    generate(tiny.model, tiny.tokenizer, short, settings, 0, CPU, batching=run, key="s")
    # shorter prompts: from the 4 that worked for the longer class, doubled up to max_batch_size
    assert capped.sizes == [4, 8, 8, 4]
    capped.sizes.clear()
    generate(tiny.model, tiny.tokenizer, long[8:], settings, 0, CPU, batching=run, key="s")
    assert capped.sizes == [4, 4]  # the longer class keeps its size: no failure again
    assert capped.failed == [8] and run.out_of_memory == 1


def fake_probe(readings: list[float], total: int = 80 * 2**30):
    """A memory probe returning ``(free, total)`` for each used fraction in turn (the last repeated)."""
    calls = []

    def probe():
        used = readings[min(len(calls), len(readings) - 1)]
        calls.append(used)
        return int(total * (1 - used)), total

    probe.calls = calls
    return probe


@pytest.mark.parametrize("used, grows", [(0.10, True), (0.55, False)])
def test_batches_grow_only_while_memory_use_stays_low(tiny, monkeypatch, used, grows):
    settings = GenerationSettings(max_new_tokens=3, do_sample=False, max_batch_size=8)
    long, short = words(12, 8, seed=1), words(3, 24, seed=2)
    capped = Capped(tiny.model, tokens=64)
    monkeypatch.setattr(tiny.model, "generate", capped)
    probe = fake_probe([used])
    run = Batching(settings, CPU, memory_probe=probe)
    generate(tiny.model, tiny.tokenizer, long, settings, 0, CPU, batching=run, key="s")
    capped.sizes.clear()
    generate(tiny.model, tiny.tokenizer, short, settings, 0, CPU, batching=run, key="s")
    # below memory_grow_below (0.40) the batch doubles after each full batch; above, it stays
    assert capped.sizes == ([4, 8, 8, 4] if grows else [4] * 6)
    assert len(probe.calls) == 2 + len(capped.sizes)  # one reading after every call that worked


def test_high_memory_warns_once_and_near_full_memory_stops_with_the_results_so_far(tiny, monkeypatch, messages):
    settings = GenerationSettings(max_new_tokens=3, do_sample=False, max_batch_size=2)
    prompts = words(4, 12)
    reference = generate(tiny.model, tiny.tokenizer, prompts, settings, 0, CPU)
    run = Batching(settings, CPU, memory_probe=fake_probe([0.5, 0.92, 0.93, 0.5, 0.96, 0.5]))
    messages.clear()
    with pytest.raises(GenerationStopped) as stop:
        generate(tiny.model, tiny.tokenizer, prompts, settings, 0, CPU, batching=run, key="s")
    err = stop.value
    assert isinstance(err, LensbenchError) and err.field == "model.init_args.generation.max_batch_size"
    assert "\n" not in str(err) and "96%" in err.message and "80.0 GiB" in err.message
    assert "lower max_batch_size" in err.message and "saved" in err.message
    # the five calls made before the stop, the fifth included: their results, for the caller to store
    assert [r.output for r in err.results] == [r.output for r in reference[:10]]
    warnings = [m.getMessage() for m in messages if m.name == "lensbench.run" and m.levelno == logging.WARNING]
    assert len(warnings) == 1 and "92%" in warnings[0] and "memory_warn_above" in warnings[0]
    calls = [m.getMessage() for m in messages if m.name == "lensbench.run" and m.levelno == logging.INFO]
    assert len(calls) == 5 and "50% of 80.00 GiB in use at its peak" in calls[0], calls
    assert all(r.peak_memory is None for r in err.results)  # peak memory is CUDA's (max_memory_allocated)
    # memory_stop_above: 1 never stops
    never = GenerationSettings(max_new_tokens=3, do_sample=False, max_batch_size=2, memory_stop_above=1.0)
    done = generate(tiny.model, tiny.tokenizer, prompts, never, 0, CPU,
                    batching=Batching(never, CPU, memory_probe=fake_probe([0.99])))
    assert [r.output for r in done] == [r.output for r in reference]


def test_prompts_are_tokenized_once_per_run(tiny, monkeypatch):
    settings = GenerationSettings(max_new_tokens=3, do_sample=False, max_batch_size=4)
    encoded = []
    real = generation.build_inputs
    monkeypatch.setattr(generation, "build_inputs", lambda tok, prompts, *a, **k: encoded.append(len(prompts))
                        or real(tok, prompts, *a, **k))
    capped = Capped(tiny.model, cap=2)
    monkeypatch.setattr(tiny.model, "generate", capped)
    run = Batching(settings, CPU)
    first = generate(tiny.model, tiny.tokenizer, PROMPTS, settings, 0, CPU, batching=run, key="a")
    again = generate(tiny.model, tiny.tokenizer, PROMPTS, settings, 0, CPU, batching=run, key="b")
    assert encoded == [6]  # once, not again after the back-off nor for the second state
    assert [r.output for r in first] == [r.output for r in again]
    # the batch padded from the stored ids is the tokenizer's own left-padded batch
    ours = generation._pad_left(generation._token_rows(tiny.tokenizer, None, PROMPTS, [None] * 6, settings, {}),
                                tiny.tokenizer.pad_token_id)
    theirs = generation._encode(tiny.tokenizer, None, PROMPTS, None, settings, CPU, torch.float32)
    assert ours.keys() == set(theirs.keys()) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_each_result_carries_the_seed_its_generate_call_used(tiny):
    s = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.5, max_batch_size=4)
    seeds = [100, 101, 102, 103, 104, 105]
    results = generate(tiny.model, tiny.tokenizer, PROMPTS, s, seeds, CPU)
    assert [r.seed for r in results] == [100] * 4 + [104] * 2  # a call is seeded with its first prompt's seed
    assert [r.batch_size for r in results] == [4] * 4 + [2] * 2
    # The recorded seed reproduces the sample: the second call again, seeded with what was recorded.
    again = generate(tiny.model, tiny.tokenizer, PROMPTS[4:], s, [results[4].seed] * 2, CPU)
    assert [r.output for r in again] == [r.output for r in results[4:]]
    one = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.5, max_batch_size=1)
    alone = generate(tiny.model, tiny.tokenizer, PROMPTS, one, seeds, CPU)
    assert [r.seed for r in alone] == seeds  # batch size 1: every prompt its own seed
    assert [r.output for r in generate(tiny.model, tiny.tokenizer, PROMPTS[2:3], one, [alone[2].seed], CPU)] == \
        [alone[2].output]
    shifted = generate(tiny.model, tiny.tokenizer, PROMPTS, one, [x + 1 for x in seeds], CPU)
    assert [r.output for r in shifted] != [r.output for r in alone]  # the seed matters


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


def by_hand_nll(model, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (float64 log-softmax) and the number of predicted tokens."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    logp = torch.log_softmax(logits, dim=-1)
    target = ids[0, 1:]
    return -logp[torch.arange(len(target)), target].sum().item(), len(target)


def test_torchmetrics_perplexity_equals_exp_mean_nll_by_hand(tiny):
    from torchmetrics.text import Perplexity

    text = " ".join(PROMPTS * 3)
    ids = tiny.tokenizer(text, return_tensors="pt")["input_ids"]
    total, count = by_hand_nll(tiny.model, ids)
    state = perplexity_state(tiny.model, tiny.tokenizer, text, 10_000, CPU)
    assert state["count"] == count == ids.shape[1] - 1
    assert state["total"] == pytest.approx(total, rel=1e-9)
    value = perplexity(tiny.model, tiny.tokenizer, text, 10_000, CPU)
    assert value == pytest.approx(math.exp(total / count), rel=1e-9)
    # torchmetrics' own module on the same logits gives that value too
    metric = Perplexity()
    with torch.no_grad():
        metric.update(tiny.model(input_ids=ids).logits[:, :-1], ids[:, 1:])
    assert value == pytest.approx(metric.compute().item(), rel=1e-5)
    # and so does transformers' loss (float32)
    with torch.no_grad():
        assert value == pytest.approx(math.exp(tiny.model(input_ids=ids, labels=ids).loss.item()), rel=1e-5)


def test_perplexity_is_token_weighted_over_windows(tiny, monkeypatch):
    text = " ".join(PROMPTS * 3)
    ids = tiny.tokenizer(text, return_tensors="pt")["input_ids"]
    # windows of 8 tokens: the mean NLL over the windows' predicted tokens, weighted by their counts
    total, count = 0.0, 0
    for start in range(0, ids.shape[1], 8):
        w = ids[:, start : start + 8]
        if w.shape[1] < 2:
            continue
        t, c = by_hand_nll(tiny.model, w)
        total, count = total + t, count + c
    state = perplexity_state(tiny.model, tiny.tokenizer, text, 8, CPU)
    assert state["count"] == count < ids.shape[1] - 1  # the first token of each window is not predicted
    assert state["total"] == pytest.approx(total, rel=1e-9)
    assert perplexity(tiny.model, tiny.tokenizer, text, 8, CPU) == pytest.approx(math.exp(total / count), rel=1e-9)
    # Updates in chunks of positions (bounding the float64 logits) change nothing.
    import lensbench.generation as generation

    monkeypatch.setattr(generation, "PERPLEXITY_CHUNK", 3)
    chunked = perplexity_state(tiny.model, tiny.tokenizer, text, 10_000, CPU)
    whole = by_hand_nll(tiny.model, ids)
    assert chunked["count"] == whole[1] and chunked["total"] == pytest.approx(whole[0], rel=1e-9)


def test_a_text_of_one_token_has_no_perplexity(tiny):
    state = perplexity_state(tiny.model, tiny.tokenizer, "moss", 512, CPU)
    assert state == {"total": 0.0, "count": 0}
    assert math.isnan(perplexity(tiny.model, tiny.tokenizer, "moss", 512, CPU))
    assert math.isnan(pooled_perplexity([])) and math.isnan(pooled_perplexity([state]))


def test_pooled_perplexity_merges_the_torchmetrics_states(tiny):
    from torchmetrics.text import Perplexity

    texts = [" ".join(PROMPTS), " ".join(reversed(PROMPTS[:3]))]
    states = [perplexity_state(tiny.model, tiny.tokenizer, t, 512, CPU) for t in texts]
    pooled = pooled_perplexity(states)
    assert pooled == pytest.approx(math.exp(sum(s["total"] for s in states) / sum(s["count"] for s in states)),
                                   rel=1e-12)
    # One metric updated with both texts gives the same: merging states is pooling the tokens.
    metric = Perplexity().set_dtype(torch.float64)
    for t in texts:
        ids = tiny.tokenizer(t, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            metric.update(tiny.model(input_ids=ids).logits[:, :-1].double(), ids[:, 1:])
    assert pooled == pytest.approx(metric.compute().item(), rel=1e-9)
    # Token-weighted: not the mean of the two perplexities (the texts differ in length).
    separate = [pooled_perplexity([s]) for s in states]
    assert states[0]["count"] != states[1]["count"] and pooled != pytest.approx(sum(separate) / 2, rel=1e-6)
    assert min(separate) < pooled < max(separate)


def test_the_default_perplexity_text_is_the_seeds_sentence():
    assert PerplexitySettings().text is None and PerplexitySettings().file is None
    assert DEFAULT_PERPLEXITY_TEXT == "The quick brown fox jumps over the lazy dog."
