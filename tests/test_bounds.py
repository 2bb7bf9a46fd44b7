"""Settings beyond what the model or torch can take: generation bounded by the model's context
(a warning and a clamp, recorded), seeds beyond torch's 64 bits and malformed pipeline sections
refused in one line naming the field."""

from __future__ import annotations

import logging

import pytest
import torch

import lensbench.generation as generation
from lensbench.errors import LensbenchError
from lensbench.generation import GenerationSettings, generate, model_positions, perplexity_state
from lensbench.models.loading import ModelSpec, load_model
from lensbench.perturbations import PerturbationGrid, check_seed
from lensbench.pipeline import load_config
from lensbench.plugins import active_registries

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_model(ModelSpec(str(tiny_model)), padding_side="left")


@pytest.fixture
def warnings_seen(monkeypatch):
    """The console logger's warnings, with the once-per-process memory emptied."""
    monkeypatch.setattr(generation, "_bounded", set())
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("lightning.pytorch.lensbench")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_the_context_comes_from_the_config(tiny):
    from transformers import GPT2Config, GPT2LMHeadModel

    assert model_positions(tiny.model) == (128, "max_position_embeddings")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    assert model_positions(gpt2)[0] == 32  # n_positions, which GPT2Config also answers as max_position_embeddings

    class NoContext(torch.nn.Module):
        config = type("C", (), {"hidden_size": 8})()

    assert model_positions(NoContext()) is None


def test_a_billion_new_tokens_stop_at_the_end_of_the_context(tiny, warnings_seen):
    prompts = ["the capital of france is", "water moss cell in the sea"]
    settings = GenerationSettings(max_new_tokens=10**9, do_sample=False, max_batch_size=2)
    out = generate(tiny.model, tiny.tokenizer, prompts, settings, 0, CPU)
    width = max(len(tiny.tokenizer(p)["input_ids"]) for p in prompts)  # left-padded to the longer prompt
    assert [g.max_new_tokens for g in out] == [128 - width] * 2
    assert all(1 <= g.tokens <= 128 - width for g in out)
    lines = [r.getMessage() for r in warnings_seen]
    assert lines == ["lensbench: model.init_args.generation.max_new_tokens 1000000000 goes beyond the model's context "
                     "(128 tokens, config max_position_embeddings): generation stops where prompt and new tokens "
                     "fill the context"]
    again = generate(tiny.model, tiny.tokenizer, prompts, settings, 0, CPU)  # warned once per process
    assert [g.output for g in again] == [g.output for g in out] and len(warnings_seen) == 1


def test_settings_within_the_context_are_left_alone(tiny, warnings_seen):
    out = generate(tiny.model, tiny.tokenizer, ["a train to the sea"],
                   GenerationSettings(max_new_tokens=3, do_sample=False), 0, CPU)
    assert out[0].max_new_tokens == 3 and out[0].tokens <= 3 and not warnings_seen


def test_a_long_prompt_is_cut_to_leave_room_for_one_token(tiny, warnings_seen):
    prompt = " ".join(["water"] * 400)
    out = generate(tiny.model, tiny.tokenizer, [prompt],
                   GenerationSettings(max_new_tokens=5, do_sample=False, max_input_length=100000), 0, CPU)
    assert out[0].max_new_tokens == 1 and out[0].tokens == 1
    assert any("max_input_length 100000 goes beyond the model's context" in r.getMessage()
               and "prompts longer than 127 tokens are cut there" in r.getMessage() for r in warnings_seen)


def test_the_perplexity_window_is_bounded_by_the_analysis(tiny, warnings_seen):
    """perplexity_state takes the window it is given; the analysis bounds it (perturbation.py)."""
    text = " ".join(["the sun and the moon"] * 60)
    window = generation.within_context(10**8, 128, "model.init_args.perplexity.max_length", (128, "n_positions"),
                                       "windows")
    assert window == 128
    state = perplexity_state(tiny.model, tiny.tokenizer, text, window, CPU)
    assert state["count"] > 128  # several windows, each within the context


@pytest.mark.parametrize("seed, repeats, got", [(2**70, 1, "got 1180591620717411303424"),
                                                (2**64 - 1, 2, "its last repetition uses 18446744073709551616"),
                                                (-(2**63) - 1, 1, "got -9223372036854775809")])
def test_a_seed_beyond_64_bits_is_refused(seed, repeats, got):
    with pytest.raises(LensbenchError) as info:
        check_seed(seed, "model.init_args.perturbation.seed", repeats)
    assert info.value.field == "model.init_args.perturbation.seed"
    assert "a seed must lie in -9223372036854775808..18446744073709551615" in info.value.message and got in info.value.message


def test_seeds_torch_takes_are_accepted():
    for seed in (0, -5, 2**63, 2**64 - 1):
        check_seed(seed, "seed")
        torch.Generator().manual_seed(seed)  # what the check stands for
    with pytest.raises(LensbenchError, match="must be an integer, got True"):
        check_seed(True, "seed")


def test_the_grid_refuses_a_huge_seed_before_any_state():
    grid = PerturbationGrid(levels=[0.1], seed=2**70)
    with pytest.raises(LensbenchError) as info:
        grid.states("tiny", active_registries().perturbations, "model.init_args.perturbation")
    assert info.value.field == "model.init_args.perturbation.seed"


@pytest.mark.parametrize("text, field, fragment", [
    ("param_diff: 5\n", "param_diff", "must be a mapping of settings (tol, max_iter, compute_dtype, include, exclude), "
                                      "got 5"),
    ("activation_norms: [a]\n", "activation_norms", "must be a mapping of settings"),
    ("trainer: gpu\n", "trainer", "got 'gpu'"),
    ("others: tiny\n", "others", "must be a list of models, got 'tiny'"),
    ("others: [{perturbation: mult_gauss, level: 0.1, seed: 1180591620717411303424}]\n", "others[0].seed",
     "got 1180591620717411303424"),
])
def test_a_malformed_pipeline_section_is_one_line(tmp_path, text, field, fragment):
    path = tmp_path / "pipeline.yaml"
    path.write_text("base: tiny\n" + ("" if text.startswith("others") else "others: [tiny]\n") + text)
    with pytest.raises(LensbenchError) as info:
        load_config(path)
    assert info.value.field == field and fragment in info.value.message


def test_empty_pipeline_sections_take_their_defaults(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("base: tiny\nothers: [tiny]\nparam_diff:\ntrainer:\n")
    config = load_config(path)
    assert config.param_diff == {} and config.trainer == {"accelerator": "auto", "devices": 1}


def test_an_analysis_max_length_beyond_the_context_is_the_context(warnings_seen):
    """activation_norms and layer_sweep truncate at ``length_limit``: max_length, or the model's
    context where max_length is null or larger (then with one warning)."""
    from types import SimpleNamespace

    from transformers import LlamaConfig

    from lensbench.generation import length_limit

    loaded = SimpleNamespace(tokenizer=SimpleNamespace(model_max_length=int(1e30)),
                             model=SimpleNamespace(config=LlamaConfig(max_position_embeddings=300)))
    assert length_limit(None, loaded, "model.init_args.max_length") == (300, "context")
    assert length_limit(64, loaded, "model.init_args.max_length") == (64, "max_length")
    assert not warnings_seen
    assert length_limit(10**8, loaded, "model.init_args.max_length") == (300, "context")
    assert [r.getMessage() for r in warnings_seen] == [
        "lensbench: model.init_args.max_length 100000000 goes beyond the model's context (300 tokens, the tokenizer's "
        "model_max_length or config max_position_embeddings): texts are cut at 300 tokens"]
    nothing = SimpleNamespace(tokenizer=None, model=SimpleNamespace(config=None))
    assert length_limit(10**8, nothing, "model.init_args.max_length") == (10**8, "max_length")  # no context: as given
