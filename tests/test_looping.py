"""loop_layers: a structural transform (blocks start..end run `passes` times), undone by the manager.

Tiny random models of five architectures built from configs: Llama, Qwen2 (sliding and full
attention mixed), GPT-NeoX, GPT-2 (attention scaled by 1 / (layer_idx + 1)) and Gemma 3 text
(sliding and full attention mixed, a window of 4 tokens). The reference applies the plain model's
own blocks one by one, in the looped order, with the arguments each block got in a plain forward.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import clean_env, lensbench
from tiny import save_tiny_llama, tiny_tokenizer, write_texts
from torch import nn

from lensbench.data.sources import read_texts
from lensbench.errors import LensbenchError
from lensbench.models.loading import ModelSpec, load_model, resolve_source
from lensbench.models.looping import LoopedLayers, LoopLayers
from lensbench.plugins import active_registries
from lensbench.state import State, SubjectManager, TransformSpec

ARCHS = ("llama", "qwen2", "gpt_neox", "gpt2", "gemma3")
START, END = 1, 2  # of 4 blocks
TEXTS = ["the a of and to in is was on for with as by at", "paris france capital"]  # left padding for the 2nd
IDS = dict(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MIXED = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]


def _build(arch: str):
    import transformers as tf

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=128, **IDS)
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **common))
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                                                  layer_types=MIXED, **common))
    if arch == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**common))
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=128,
                                                scale_attn_by_inverse_layer_idx=True, **IDS))
    return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, sliding_window=4,
                                                    layer_types=MIXED[::-1], **common))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("looping")
    folders = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        folders[arch] = root / arch
        _build(arch).save_pretrained(folders[arch])
        tiny_tokenizer().save_pretrained(folders[arch])
    return folders


def manager(folder: Path) -> SubjectManager:
    return SubjectManager({"m": ModelSpec(str(folder))}, torch.device("cpu"), active_registries().perturbations,
                          padding_side="left")


def loop(passes: int, start: int = START, end: int = END) -> TransformSpec:
    return TransformSpec("loop_layers", (("end", end), ("passes", passes), ("start", start)))


def order(passes: int, n: int = 4, start: int = START, end: int = END) -> list[int]:
    return [*range(start), *list(range(start, end + 1)) * passes, *range(end + 1, n)]


def _out(x):
    return x[0] if isinstance(x, tuple) else x


def reference(loaded, batch, block_order: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Hidden states and logits of the plain model's blocks applied by hand in ``block_order``."""
    model, anatomy = loaded.model, loaded.anatomy
    blocks = anatomy.blocks(model)
    calls: dict[int, tuple] = {}
    handles = [b.register_forward_pre_hook(lambda m, a, k, i=i: calls.setdefault(i, (a, k)), with_kwargs=True)
               for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    args0, kwargs0 = calls[0]
    hidden = [args0[0] if args0 else kwargs0["hidden_states"]]
    with torch.no_grad():
        for i in block_order:
            args, kwargs = calls[i]
            if args:
                out = blocks[i](hidden[-1], *args[1:], **kwargs)
            else:
                out = blocks[i](**{**kwargs, "hidden_states": hidden[-1]})
            hidden.append(_out(out))
        hidden[-1] = model.get_submodule(anatomy.final_norm_name)(hidden[-1])
        logits = model.get_output_embeddings()(hidden[-1])
    return hidden, logits


# -- 1. the looped forward equals the blocks applied by hand ----------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_looped_forward_equals_the_blocks_applied_by_hand(models, arch):
    subjects = manager(models[arch])
    loaded = subjects.activate(State("m"))
    batch = loaded.tokenizer(TEXTS, return_tensors="pt", padding=True)
    reference_plain = reference(loaded, batch, order(1))
    with torch.no_grad():
        plain = loaded.model(**batch, output_hidden_states=True)
    torch.testing.assert_close(plain.logits, reference_plain[1], rtol=0, atol=0)  # the reference is right
    for passes in (0, 1, 2, 3):
        hidden, logits = reference(subjects.activate(State("m")), batch, order(passes))
        looped = subjects.activate(State("m", (loop(passes),)))
        container = looped.model.get_submodule(looped.anatomy.block_names[0].rpartition(".")[0])
        assert len(container) == len(order(passes)) and len(container._modules) == 4
        with torch.no_grad():
            out = looped.model(**batch, output_hidden_states=True)
        assert len(out.hidden_states) == 1 + 4 + (passes - 1) * (END - START + 1)
        for k, (got, want) in enumerate(zip(out.hidden_states, hidden, strict=True)):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{arch} passes={passes} hidden state {k}")
        torch.testing.assert_close(out.logits, logits, rtol=0, atol=0)
        if passes != 1:
            assert not torch.allclose(out.logits, plain.logits)  # looping changed the model


def test_repeats_share_weights_and_keep_their_layer_type(models):
    loaded = manager(models["gemma3"]).activate(State("m", (loop(3),)))
    layers = loaded.model.model.layers
    originals = list(layers._modules.values())
    assert isinstance(layers, LoopedLayers) and len(originals) == 4 and len(layers) == 8
    positions = order(3)
    assert loaded.model.config.num_hidden_layers == 8
    assert loaded.model.config.layer_types == [MIXED[::-1][i] for i in positions]
    for position, (block, i) in enumerate(zip(layers, positions, strict=True)):
        assert block.self_attn.layer_idx == position and block.layer_idx == position  # its own cache slot
        assert block.self_attn.is_sliding == originals[i].self_attn.is_sliding  # its original type
        assert block.self_attn.q_proj.weight is originals[i].self_attn.q_proj.weight  # no weight copied
        assert (block is originals[i]) == (position == i)
    # Parameter names and the state dict are those of the plain model.
    plain = load_model(ModelSpec(str(models["gemma3"]))).model
    assert [n for n, _ in loaded.model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(loaded.model.state_dict()) == list(plain.state_dict())
    gpt2 = manager(models["gpt2"]).activate(State("m", (loop(2),)))
    h = gpt2.model.transformer.h
    assert [b.attn.layer_idx for b in h] == list(range(6)) and gpt2.model.config.n_layer == 6
    # GPT-2 scales attention by 1 / (layer_idx + 1) of the original layer, also in a repeat.
    assert [b.attn.scaling for b in h] == [h._modules[str(i)].attn.scaling for i in order(2)]


# -- 2. cached generation equals uncached generation ------------------------------------------------


def _generate(model, batch, use_cache: bool) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=10, min_new_tokens=10, do_sample=False, use_cache=use_cache)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_generation_equals_uncached(models, arch):
    subjects = manager(models[arch])
    outputs = {}
    for passes in (0, 2, 3):
        loaded = subjects.activate(State("m", (loop(passes),)))
        batch = loaded.tokenizer(TEXTS, return_tensors="pt", padding=True)
        assert batch["attention_mask"][1, 0] == 0  # left padding
        cached, uncached = _generate(loaded.model, batch, True), _generate(loaded.model, batch, False)
        assert cached.shape[1] == batch["input_ids"].shape[1] + 10
        assert torch.equal(cached, uncached), f"{arch} passes={passes}"
        outputs[passes] = cached
    assert not torch.equal(outputs[2], outputs[3])  # the loops are really different models


def test_a_naive_loop_sharing_layer_idx_breaks_cached_generation(models):
    """Listing the same block objects again (one cache slot per block) is what the test above catches."""
    loaded = load_model(ModelSpec(str(models["llama"])), padding_side="left")
    layers = list(loaded.model.model.layers)
    loaded.model.model.layers = nn.ModuleList([layers[i] for i in order(3)])
    loaded.model.config.num_hidden_layers = len(order(3))
    batch = loaded.tokenizer(TEXTS, return_tensors="pt", padding=True)
    try:
        broken = not torch.equal(_generate(loaded.model, batch, True), _generate(loaded.model, batch, False))
    except (RuntimeError, IndexError, ValueError):
        broken = True
    assert broken


# -- 3. undo, and composition with a weight perturbation --------------------------------------------


def _snapshot(loaded, batch) -> dict:
    model = loaded.model
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return {
        "modules": [(n, id(m)) for n, m in model.named_modules(remove_duplicate=False)],
        "config": model.config.to_dict(),
        "config_vars": {k: v for k, v in vars(model.config).items()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "logits": out.logits,
        "hidden": out.hidden_states,
    }


def _assert_identical(now: dict, before: dict) -> None:
    assert now["modules"] == before["modules"]
    assert now["config"] == before["config"] and now["config_vars"] == before["config_vars"]
    assert now["state"].keys() == before["state"].keys()
    assert all(torch.equal(now["state"][k], v) for k, v in before["state"].items())
    assert torch.equal(now["logits"], before["logits"])
    assert len(now["hidden"]) == len(before["hidden"])
    assert all(torch.equal(a, b) for a, b in zip(now["hidden"], before["hidden"]))


@pytest.mark.parametrize("arch", ["gemma3", "gpt2"])
def test_a_plain_state_after_a_looped_one_is_bit_identical(models, arch):
    subjects = manager(models[arch])
    loaded = subjects.activate(State("m"))
    batch = loaded.tokenizer(TEXTS, return_tensors="pt", padding=True)
    before = _snapshot(loaded, batch)
    types = getattr(loaded.model.config, "layer_types", None)
    for passes in (3, 0, 2):
        looped = subjects.activate(State("m", (loop(passes),)))
        assert looped.model.config.num_hidden_layers == len(order(passes))
        if types is not None:
            assert looped.model.config.layer_types == [types[i] for i in order(passes)]
        _snapshot(looped, batch)  # a forward with hidden states while looped (installs transformers' hooks)
        _assert_identical(_snapshot(subjects.activate(State("m")), batch), before)
    # Two loops in one state compose (the second indexes the blocks as the first runs them); undone too.
    both = subjects.activate(State("m", (loop(2), loop(2, start=0, end=0))))
    assert len(list(both.model.modules())) > 0 and both.model.config.num_hidden_layers == 7
    _assert_identical(_snapshot(subjects.activate(State("m")), batch), before)
    assert subjects.loads == 1


def test_a_failed_state_leaves_the_plain_structure(models):
    subjects = manager(models["llama"])
    loaded = subjects.activate(State("m"))
    batch = loaded.tokenizer(TEXTS, return_tensors="pt", padding=True)
    before = _snapshot(loaded, batch)
    with pytest.raises(LensbenchError, match="unknown perturbation 'nope'"):
        subjects.activate(State("m", (loop(3), TransformSpec("nope"))))
    assert not isinstance(loaded.model.model.layers, LoopedLayers)
    _assert_identical(_snapshot(subjects.activate(State("m")), batch), before)
    # A model entry's loop is applied again after a failed state, also to the state without transforms.
    entry = {"name": "loop_layers", "params": {"start": START, "end": END, "passes": 3}}
    subjects = SubjectManager({"m": ModelSpec(str(models["llama"]), transforms=[entry])}, torch.device("cpu"),
                              active_registries().perturbations)
    assert len(subjects.activate(State("m")).model.model.layers) == 8
    with pytest.raises(LensbenchError, match="unknown perturbation 'nope'"):
        subjects.activate(State("m", (TransformSpec("nope"),)))
    assert len(subjects.loaded.model.model.layers) == 4  # nothing applied, not even the entry's loop
    assert len(subjects.activate(State("m")).model.model.layers) == 8 and subjects.loads == 1


def test_perturbations_of_a_looped_model_keep_their_clean_copies_across_states(models, monkeypatch):
    """A loop shares the blocks' parameters: what a perturbation changes under it is a parameter of
    the plain model, copied once and restored by name after the loop is undone, not copied again
    at every state change."""
    import lensbench.state as state_module

    entry = {"name": "loop_layers", "params": {"start": START, "end": END, "passes": 3}}
    subjects = SubjectManager({"m": ModelSpec(str(models["llama"]), transforms=[entry])}, torch.device("cpu"),
                              active_registries().perturbations)
    plain = {n: p.detach().clone() for n, p in subjects.activate(State("m")).model.named_parameters()}
    copies = []
    real = state_module._keep_copy
    monkeypatch.setattr(state_module, "_keep_copy", lambda t: copies.append(t.shape) or real(t))
    for seed in (1, 2, 1, 3):
        noisy = State("m", (TransformSpec("mult_gauss", (("group", "mlp_only"), ("level", 0.2)), seed),))
        assert len(subjects.activate(noisy).model.model.layers) == 8
    assert len(copies) == len(subjects.touched_names()) > 0  # made by the first state only
    assert subjects._structured == {} and set(subjects._originals) == set(subjects.touched_names())
    restored = subjects.activate(State("m")).model
    assert all(torch.equal(plain[n], p) for n, p in restored.named_parameters())


ZEROED = "model.layers.{1-2}.{self_attn.o_proj,mlp.down_proj}.weight"


@pytest.mark.parametrize("first", ["ablation", "loop"])
def test_zeroed_output_projections_make_the_looped_blocks_an_identity(models, first):
    subjects = manager(models["llama"])
    loaded = subjects.activate(State("m"))
    batch = loaded.tokenizer(TEXTS, return_tensors="pt", padding=True)
    plain = _snapshot(loaded, batch)
    ablation = TransformSpec("ablation", (("group", ZEROED), ("level", 1.0)), 0)
    logits = {}
    for passes in (0, 1, 2, 3):
        transforms = (ablation, loop(passes)) if first == "ablation" else (loop(passes), ablation)
        looped = subjects.activate(State("m", transforms))
        assert all(looped.model.get_parameter(n).abs().sum() == 0 for n in subjects.touched_names())
        assert len(subjects.touched_names()) == 4
        with torch.no_grad():
            out = looped.model(**batch, output_hidden_states=True)
        hidden, logits[passes] = out.hidden_states, out.logits
        entering = hidden[START]
        runs = passes * (END - START + 1)
        assert len(hidden) == 1 + START + runs + (4 - END - 1)
        for k in range(START + 1, START + runs + 1):  # after every run of a looped block
            assert torch.equal(hidden[k], entering), (passes, k)
        assert not torch.equal(hidden[START], hidden[START - 1])  # block 0 is not zeroed: not a trivial identity
    # An identity repeated any number of times: the same model, bit for bit.
    assert all(torch.equal(logits[p], logits[1]) for p in (0, 2, 3))
    assert not torch.equal(logits[1], plain["logits"])
    _assert_identical(_snapshot(subjects.activate(State("m")), batch), plain)


# -- validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("params, field, message", [
    ({"start": 2, "end": 1, "passes": 2}, "start", "start (2) is after end (1)"),
    ({"start": 0, "end": 1, "passes": -1}, "passes", "passes must be >= 0"),
    ({"start": 0, "end": 1.5, "passes": 2}, "end", "end must be an integer, got 1.5"),
    ({"start": "0", "end": 1, "passes": 2}, "start", "start must be an integer, got '0'"),
    ({"start": 0, "end": 1, "passes": True}, "passes", "passes must be an integer, got True"),
    ({"start": -1, "end": 1, "passes": 2}, "start", "start must be a block index >= 0"),
    ({"start": 0, "end": 1}, "", "loop_layers does not take these parameters"),
])
def test_bad_parameters_are_refused_before_any_model_is_loaded(tiny_model, params, field, message):
    spec = ModelSpec(str(tiny_model), transforms=[{"name": "loop_layers", "params": params}])
    with pytest.raises(LensbenchError) as err:
        resolve_source(spec, "model.init_args.models[1]", active_registries().perturbations)
    assert err.value.field == "model.init_args.models[1].transforms[0].params" + (f".{field}" if field else "")
    assert message in err.value.message and "\n" not in str(err.value)
    with pytest.raises(LensbenchError) as err:
        resolve_source(ModelSpec(str(tiny_model), transforms=[{"name": "loop_layer"}]), "model.init_args.model",
                       active_registries().perturbations)
    assert err.value.field == "model.init_args.model.transforms[0].name" and "did you mean 'loop_layers'" in str(err.value)


@pytest.mark.parametrize("params, field, message", [
    ((0, 2, 2), "end", "loop_layers end=2 is outside the model's blocks (0-1) (model 'm')"),
    ((0, 1, 0), "passes", "passes=0 over every block would leave the model with no block; keep at least one (model 'm')"),
])
def test_a_block_outside_the_model_is_refused_on_load(tiny_model, params, field, message):
    start, end, passes = params
    entry = {"name": "loop_layers", "params": {"start": start, "end": end, "passes": passes}}
    subjects = SubjectManager({"m": ModelSpec(str(tiny_model), transforms=[entry])}, torch.device("cpu"),
                              active_registries().perturbations)
    with pytest.raises(LensbenchError) as err:
        subjects.activate(State("m"))
    assert err.value.field == f"transforms[0].params.{field}" and message in err.value.message
    with pytest.raises(LensbenchError, match=r"end=2 is outside"):  # named in a state, the same check
        manager(tiny_model).activate(State("m", (loop(2, start=0, end=2),)))
    # a manager that knows the model's config field (an analysis's subject_fields) names the whole path
    subjects = SubjectManager({"m": ModelSpec(str(tiny_model), transforms=[entry])}, torch.device("cpu"),
                              active_registries().perturbations, fields={"m": "model.init_args.models[1]"})
    with pytest.raises(LensbenchError) as err:
        subjects.activate(State("m"))
    assert err.value.field == f"model.init_args.models[1].transforms[0].params.{field}"


def test_errors_of_a_loaded_model_name_its_config_field(tiny_model):
    """The anatomy of a model loaded for one config entry is blamed on that entry."""
    from lensbench.models.anatomy import AnatomyOverrides

    loaded = load_model(ModelSpec(str(tiny_model), anatomy=AnatomyOverrides(blocks="nothing.*")),
                        field="model.init_args.models[1]")
    with pytest.raises(LensbenchError) as err:
        loaded.anatomy
    assert err.value.field == "model.init_args.models[1].anatomy" and "fix anatomy.blocks" in err.value.message


def test_param_diff_refuses_a_model_entry_with_transforms(tiny_model):
    from lensbench.models.checkpoint import open_checkpoint

    spec = ModelSpec(str(tiny_model), transforms=[{"name": "loop_layers", "params": {"start": 0, "end": 0, "passes": 2}}])
    with pytest.raises(LensbenchError) as err:
        open_checkpoint(spec, "data.init_args.others[0]")
    assert err.value.field == "data.init_args.others[0].transforms"


def test_looping_is_a_registered_builtin_transform():
    entry = {e.name: e for e in active_registries().perturbations}["loop_layers"]
    assert entry.obj is LoopLayers and entry.plugin == "lensbench (built-in)" and LoopLayers.structural
    from lensbench.perturbations import PerturbationGrid

    with pytest.raises(LensbenchError) as err:  # not a perturbation grid's method: it has no level
        PerturbationGrid(method="loop_layers").states("m", active_registries().perturbations, "model.init_args.perturbation")
    assert err.value.field == "model.init_args.perturbation.method" and "a model's transforms" in err.value.message


# -- 4. activation_norms of looped models, end to end -----------------------------------------------

LOOP_YAML = """\
model:
  class_path: activation_norms
  init_args:
    models:
      - tiny
{looped}
    experiment: loops
data:
  class_path: lensbench.data.modules.TextDataModule
  init_args:
    datasets: [alpha.txt]
    batch_size: 4
trainer: {{accelerator: cpu, devices: 1}}
"""
ENTRY = "      - {{source: tiny, name: loop{p}, transforms: [{{name: loop_layers, params: {{start: 1, end: 2, passes: {p}}}}}]}}"
PASSES = (0, 2, 3)


def _direct(folder: Path, texts: list[str], passes: int | None) -> tuple[int, torch.Tensor]:
    """Token count and mean L2 norm per layer of the (looped) model, batches of 4 as the run makes them."""
    subjects = SubjectManager({"m": ModelSpec(str(folder))}, torch.device("cpu"), active_registries().perturbations)
    loaded = subjects.activate(State("m", () if passes is None else (loop(passes),)))
    norms = []
    for i in range(0, len(texts), 4):
        batch = loaded.tokenizer(texts[i:i + 4], return_tensors="pt", padding=True, truncation=True, max_length=512)
        with torch.no_grad():
            hidden = loaded.model.model(**batch, output_hidden_states=True).hidden_states
        mask = batch["attention_mask"].bool()
        norms.append(torch.stack([h[mask].double().norm(dim=-1) for h in hidden]))  # [L+1, N]
    everything = torch.cat(norms, dim=1)
    return everything.shape[1], everything.mean(dim=1)


def test_activation_norms_of_looped_models_through_the_console_script(tmp_path):
    model = save_tiny_llama(tmp_path / "tiny", layers=4)
    write_texts(tmp_path / "alpha.txt", 10, seed=3)
    looped = "\n".join(ENTRY.format(p=p) for p in PASSES)
    (tmp_path / "run.yaml").write_text(LOOP_YAML.format(looped=looped))
    result = lensbench("predict", "--config", "run.yaml", cwd=tmp_path, env=clean_env(OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(tmp_path / "outputs" / "loops" / "activation_norms.csv")
    texts = read_texts(tmp_path / "alpha.txt")
    for label, passes in [("tiny", None), *((f"loop{p}", p) for p in PASSES)]:
        rows = table[table["model"] == label].sort_values("layer")
        layers = 1 + 4 + (0 if passes is None else (passes - 1) * 2)  # embedding + N + (passes-1)(end-start+1)
        assert list(rows["layer"]) == list(range(layers)), label
        n, mean = _direct(model, texts, passes)
        assert (rows["n_tokens"] == n).all()
        assert torch.allclose(torch.tensor(rows["mean_norm"].values), mean, rtol=1e-5), label
    # A bad loop is one line naming the field, before any work.
    (tmp_path / "bad.yaml").write_text(LOOP_YAML.format(looped=ENTRY.format(p=-1)).replace("loops", "bad"))
    bad = lensbench("predict", "--config", "bad.yaml", cwd=tmp_path, env=clean_env(OMP_NUM_THREADS="1"))
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == (
        "lensbench: error: model.init_args.models[1].transforms[0].params.passes: loop_layers passes must be >= 0 "
        "(1: the plain model, 0: the blocks skipped), got -1")
    assert not (tmp_path / "outputs" / "bad" / "shards").exists()


# -- a perturbation run (generation with the KV cache, perplexity) on a looped model ----------------

PERTURBATION_YAML = """\
model:
  class_path: perturbation
  init_args:
    model: {source: tiny, name: looped, transforms: [{name: loop_layers, params: {start: 1, end: 2, passes: 3}}]}
    perturbation: {method: mult_gauss, param_group: mlp_only, levels: [0.5], seed: 42}
    generation: {do_sample: false, max_new_tokens: 6, max_batch_size: 3}
    perplexity: {text: "the capital of france is paris"}
    experiment: looped
data:
  class_path: lensbench.data.modules.PromptDataModule
  init_args:
    prompts: [prompts.txt]
trainer: {accelerator: cpu, devices: 1}
"""


def test_a_perturbation_run_on_a_looped_model(tmp_path, monkeypatch):
    import json
    import math

    from lensbench.cli import main
    from lensbench.perturbations import PerturbationGrid

    folder = save_tiny_llama(tmp_path / "tiny", layers=4)
    write_texts(tmp_path / "prompts.txt", 4, seed=5)
    (tmp_path / "run.yaml").write_text(PERTURBATION_YAML)
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--config", "run.yaml"]) == 0
    records = json.loads((tmp_path / "outputs" / "looped" / "outputs_mult_gauss_tiny.json").read_text())
    assert {r["level_value"] for r in records} == {0.0, 0.5} and len(records) == 8
    # The same states reached by hand: the loop, then the grid's perturbation (baseline: none).
    spec = ModelSpec(str(folder), name="looped",
                     transforms=[{"name": "loop_layers", "params": {"start": 1, "end": 2, "passes": 3}}])
    registry = active_registries().perturbations
    subjects = SubjectManager({"looped": spec}, torch.device("cpu"), registry, padding_side="left")
    for state in PerturbationGrid(method="mult_gauss", param_group="mlp_only", levels=[0.5]).states("looped", registry, "p"):
        loaded = subjects.activate(state)
        assert len(loaded.model.model.layers) == 8
        ids = loaded.tokenizer("the capital of france is paris", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ppl = math.exp(loaded.model(input_ids=ids, labels=ids).loss.item())
        level = dict(state.labels)["level_value"]
        mine = [r for r in records if r["level_value"] == level]
        assert all(r["perplexity"] == pytest.approx(ppl, rel=1e-5) for r in mine)
        if level == 0:  # the plain model scores otherwise: the run really looped
            plain = load_model(ModelSpec(str(folder))).model
            with torch.no_grad():
                assert math.exp(plain(input_ids=ids, labels=ids).loss.item()) != pytest.approx(ppl, rel=1e-3)
        for r in mine:
            batch = loaded.tokenizer(r["prompt_text"], return_tensors="pt")
            with torch.no_grad():
                seq = loaded.model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
            new = seq[0, batch["input_ids"].shape[1]:].tolist()
            new = new[: new.index(2) + 1] if 2 in new else new
            assert r["output"] == loaded.tokenizer.decode(new, skip_special_tokens=True)
