"""loop_identity: replayed loops against real forwards on five architectures, and runs of the real
console script (tables, plots, extension, DDP, kill and resume, an exact identity, bad input)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import lensbench
from helpers_cli import last_line, run_many, sigkill_when_stored, snapshot
from tiny import save_tiny_llama, tiny_tokenizer, write_texts
from transformers import AutoModelForCausalLM

from lensbench.analyses.loop_identity import LoopIdentity
from lensbench.data.modules import TextBatch
from lensbench.models.anatomy import find_anatomy
from lensbench.plugins import active_registries
from lensbench.state import State, SubjectManager

TEXTS = ("the capital of france is paris and the sea is on the moon",
         "a cell",
         "water in the moss of the tardigrade is a protein from the sun by train")
COMMON = dict(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def build(arch: str, folder: Path) -> Path:
    """A 4-layer, width-32 random decoder of the given architecture."""
    import transformers as tf

    torch.manual_seed(7)
    if arch == "llama":
        return save_tiny_llama(folder, seed=7, layers=4)
    if arch == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, **COMMON)
        return _save(tf.Qwen2ForCausalLM(cfg), folder)
    if arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                               max_position_embeddings=128, **COMMON)
        return _save(tf.GPTNeoXForCausalLM(cfg), folder)
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=128, **COMMON)
        return _save(tf.GPT2LMHeadModel(cfg), folder)
    if arch == "gemma3":  # sliding (window 3) and full attention layers mixed; soft-capped logits
        cfg = tf.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=3,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                                  final_logit_softcapping=3.0, **COMMON)
        return _save(tf.Gemma3ForCausalLM(cfg), folder)
    if arch == "granite":  # logits divided by logits_scaling (and its own embedding/residual multipliers)
        cfg = tf.GraniteConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=128, logits_scaling=4.0,
                               embedding_multiplier=2.0, residual_multiplier=0.5, **COMMON)
        return _save(tf.GraniteForCausalLM(cfg), folder)
    if arch == "cohere":  # logits multiplied by logit_scale
        cfg = tf.CohereConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=128, logit_scale=3.0, **COMMON)
        return _save(tf.CohereForCausalLM(cfg), folder)
    raise ValueError(arch)


ARCHS = ("llama", "qwen2", "gpt_neox", "gpt2", "gemma3", "granite", "cohere")


@pytest.fixture(scope="module")
def arch_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    return {arch: build(arch, root / arch) for arch in ARCHS}


def _measure(folder: Path, start: int, end: int, counts: list[int]):
    analysis = LoopIdentity(baseline=str(folder), start=start, end=end, loop_counts=counts, max_length=64)
    analysis.subjects = SubjectManager(analysis.specs, torch.device("cpu"), active_registries().perturbations)
    loaded = analysis.subjects.activate(State("baseline"))
    enc = loaded.tokenizer(list(TEXTS), return_tensors="pt", padding=True, truncation=True, max_length=64)
    return analysis._measure(State("baseline"), TextBatch("t", TEXTS), counts), enc


def _looped_forward(folder: Path, start: int, end: int, k: int, enc) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A model whose block list repeats blocks start..end k times (the plain model for k = 1), run
    once: the output of every block call in order (before any final norm), and the logits."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    anatomy = find_anatomy(model)
    parent, _ = anatomy.block_names[0].rsplit(".", 1)
    owner, attr = parent.rsplit(".", 1) if "." in parent else ("", parent)
    blocks = list(model.get_submodule(parent))
    if k != 1:
        order = [*range(start), *[i for _ in range(k) for i in range(start, end + 1)], *range(end + 1, len(blocks))]
        setattr(model.get_submodule(owner), attr, torch.nn.ModuleList([blocks[i] for i in order]))
        text = model.config.get_text_config(decoder=True)
        if getattr(text, "layer_types", None):
            text.layer_types = [text.layer_types[i] for i in order]
        text.num_hidden_layers = len(order)
    outputs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o)) for b in blocks]
    try:
        with torch.no_grad():
            logits = model(**enc, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return outputs, logits


def _expected(h_in, h_out, prev, logits, enc) -> dict[str, float]:
    mask = enc["attention_mask"].bool()
    a, b = h_in[mask].double(), h_out[mask].double()
    out = {"cosine": ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean().item(),
           "mse": ((a - b) ** 2).mean(-1).mean().item(),
           "norm_diff": (b.norm(dim=-1) - a.norm(dim=-1)).mean().item()}
    if prev is not None:
        p = prev[mask].double()
        out["step_cosine"] = ((b * p).sum(-1) / (b.norm(dim=-1) * p.norm(dim=-1))).mean().item()
        out["step_rel_change"] = ((b - p).norm(dim=-1) / p.norm(dim=-1)).mean().item()
    valid = mask[:, :-1] & mask[:, 1:]
    nll = F.cross_entropy(logits[:, :-1][valid].double(), enc["input_ids"][:, 1:][valid], reduction="sum")
    out["nll"], out["count"] = nll.item(), int(valid.sum())
    return out


def _check(measured: dict, expected: dict, what: str) -> None:
    assert set(measured["stats"]) == {k for k in expected if k not in ("nll", "count")}, what
    for name, (mean, _m2) in measured["stats"].items():
        assert mean == pytest.approx(expected[name], rel=1e-6, abs=1e-9), f"{what}: {name}"
    assert measured["perplexity"]["count"] == expected["count"], what
    assert measured["perplexity"]["total"] == pytest.approx(expected["nll"], rel=1e-6), f"{what}: perplexity"


@pytest.mark.parametrize("arch", ARCHS)
def test_replayed_loops_match_output_hidden_states_and_a_looped_model(arch_models, arch):
    folder, start, end = arch_models[arch], 1, 2
    measured, enc = _measure(folder, start, end, [0, 1, 2, 3])
    assert all(m["n_tokens"] == int(enc["attention_mask"].sum()) for m in measured.values())
    width = end - start + 1
    # k = 1: the plain model's output_hidden_states (h_in = hidden_states[start], h_out = [end + 1])
    # and its perplexity.
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        plain = model(**enc, output_hidden_states=True, use_cache=False)
    hs = plain.hidden_states
    _check(measured[1], _expected(hs[start], hs[end + 1], hs[start], plain.logits, enc), f"{arch} k=1")
    # k = 0, 2, 3: a model whose block list really repeats the range (no replay, no hooks but outputs).
    for k in (0, 2, 3):
        outputs, logits = _looped_forward(folder, start, end, k, enc)
        h_out = hs[start] if k == 0 else outputs[start + k * width - 1]
        prev = None if k == 0 else hs[start] if k == 1 else outputs[start + (k - 1) * width - 1]
        _check(measured[k], _expected(hs[start], h_out, prev, logits, enc), f"{arch} k={k}")
    assert measured[0]["stats"]["cosine"][0] == pytest.approx(1.0) and measured[0]["stats"]["mse"][0] == 0.0
    assert measured[2]["stats"]["cosine"][0] < 0.999  # the random block changes h


def test_the_range_may_end_at_the_last_block(arch_models):
    """h_out is then the last block's own output, before the final norm (output_hidden_states' last
    entry has passed through it)."""
    folder = arch_models["llama"]
    measured, enc = _measure(folder, 2, 3, [1, 2])
    for k in (1, 2):
        outputs, logits = _looped_forward(folder, 2, 3, k, enc)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
        prev = hs[2] if k == 1 else outputs[3]
        _check(measured[k], _expected(hs[2], outputs[-1], prev, logits, enc), f"end=last k={k}")
        if k == 1:  # the last hidden state is normed: not what h_out is
            assert not torch.allclose(outputs[-1], hs[-1])


# -- runs of the real console script ----------------------------------------------------------------

RUN_YAML = """\
model:
  class_path: loop_identity
  init_args:
    baseline: base
    checkpoints: ckpts/checkpoint-{100,200}
    start: 1
    end: 2
    loop_counts: [0, 1, 2, 4]
    max_length: 32
data:
  class_path: lensbench.data.modules.TextDataModule
  init_args:
    datasets: [alpha.txt, beta.txt]
    batch_size: 4
trainer:
  accelerator: cpu
  devices: 1
"""


@pytest.fixture(scope="module")
def model_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loop_models")
    save_tiny_llama(root / "base", seed=0, layers=4)
    for seed, step in enumerate((100, 200, 300), start=1):
        save_tiny_llama(root / "ckpts" / f"checkpoint-{step}", seed=seed, layers=4)
    save_tiny_llama(root / "three" / "checkpoint-5", seed=9, layers=3)
    import transformers as tf

    torch.manual_seed(3)  # an encoder of the same shape (4 layers, width 32)
    bert = tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         max_position_embeddings=128, **COMMON)
    _save(tf.BertModel(bert), root / "bert")
    # A Llama whose config carries a logits_scaling its forward never applies: refused, since that
    # name means other things in other models (divide in Granite, multiply in HyperCLOVA X).
    save_tiny_llama(root / "scaled", seed=0, layers=4)
    config = json.loads((root / "scaled" / "config.json").read_text())
    (root / "scaled" / "config.json").write_text(json.dumps({**config, "logits_scaling": 2.0}))
    return root


@pytest.fixture
def loopdir(tmp_path, model_root) -> Path:
    for name in ("base", "ckpts", "three", "bert", "scaled"):
        (tmp_path / name).symlink_to(model_root / name)
    write_texts(tmp_path / "alpha.txt", 23, seed=1)
    write_texts(tmp_path / "beta.txt", 9, seed=2)
    (tmp_path / "run.yaml").write_text(RUN_YAML)
    return tmp_path


def _table(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "loop_metrics.csv")


def _keys(run_dir: Path) -> list[str]:
    return [json.loads(line)["key"] for p in sorted((run_dir / "shards").glob("*.jsonl"))
            for line in p.read_text().splitlines() if line.strip()]


def _close(a: pd.DataFrame, b: pd.DataFrame, rel: float = 1e-9) -> None:
    assert list(a.columns) == list(b.columns)
    ident = ["model", "dataset", "loop_count", "n_tokens", "perplexity_tokens"]
    assert a[ident].equals(b[ident])
    for col in [c for c in a.columns if c.endswith(("_mean", "_std")) or c == "perplexity"]:
        diff = (a[col] - b[col]).abs()
        assert ((diff <= rel * b[col].abs() + 1e-12) | (a[col].isna() & b[col].isna())).all(), col


def test_a_run_writes_the_tables_and_plots_then_extends_and_refuses(loopdir):
    run_dir = loopdir / "outputs" / "loop_identity" / "run"
    first = lensbench("predict", "--config", "run.yaml", cwd=loopdir)
    assert first.returncode == 0, first.stderr[-3000:]
    table = _table(run_dir)
    for column in ("model", "step", "loop_count", "cosine_mean", "cosine_std", "mse_mean", "mse_std",
                   "norm_diff_mean", "norm_diff_std", "step_cosine_mean", "step_rel_change_mean",
                   "perplexity", "n_tokens"):
        assert column in table.columns, column
    assert list(dict.fromkeys(table["model"])) == ["baseline", "checkpoint-100", "checkpoint-200"]
    assert table.loc[table["model"] == "baseline", "step"].isna().all()
    assert sorted(table["step"].dropna().unique()) == [100, 200]
    assert sorted(table["loop_count"].unique()) == [0, 1, 2, 4]
    zero = table[table["loop_count"] == 0]
    assert (zero["cosine_mean"] - 1).abs().max() < 1e-12 and (zero["mse_mean"] == 0).all()
    assert zero["step_cosine_mean"].isna().all()
    one = table[table["loop_count"] == 1]
    assert (one["step_cosine_mean"] - one["cosine_mean"]).abs().max() < 1e-12  # k=1 steps from h_in
    assert (table["perplexity"] > 1).all()
    for name in ("baseline", "checkpoint-100", "checkpoint-200"):  # the seed's per-model files
        part = pd.read_csv(run_dir / f"{name}_metrics.csv")
        pd.testing.assert_frame_equal(part, table[table["model"] == name].reset_index(drop=True), check_dtype=False)
    for png in ("cosine_similarity_vs_loop_count", "mse_vs_loop_count", "norm_diff_vs_loop_count",
                "convergence_vs_loop_count", "perplexity_vs_loop_count"):
        assert (run_dir / f"{png}.png").stat().st_size > 5000, png
    # The baseline's alpha rows against the analysis computed in-process over the same batches.
    analysis = LoopIdentity(baseline=str(loopdir / "base"), start=1, end=2, loop_counts=[0, 1, 2, 4], max_length=32)
    analysis.subjects = SubjectManager(analysis.specs, torch.device("cpu"), active_registries().perturbations)
    texts = [t for t in (loopdir / "alpha.txt").read_text().splitlines() if t.strip()]
    records = []
    for b in range(0, len(texts), 4):
        measured = analysis._measure(State("baseline"), TextBatch("alpha", tuple(texts[b:b + 4])), [0, 1, 2, 4])
        records += [{"model": "baseline", "role": "baseline", "step": None, "dataset": "alpha", "labels": {},
                     "loop_count": k, **m} for k, m in measured.items()]
    records.sort(key=lambda r: r["loop_count"])
    direct = pd.read_csv(LoopIdentity.merge(records, loopdir)[0])
    got = table[(table["model"] == "baseline") & (table["dataset"] == "alpha")].reset_index(drop=True)
    _close(got, direct.reset_index(drop=True), rel=1e-9)

    # Rerun: nothing to do. More loop counts and a third checkpoint extend the run.
    again = lensbench("predict", "--config", "run.yaml", cwd=loopdir)
    assert again.returncode == 0 and "0 to do" in again.stdout + again.stderr
    stored = _keys(run_dir)
    assert len(stored) == 3 * (6 + 3) * 4
    more = lensbench("predict", "--config", "run.yaml", "--model.init_args.loop_counts", "[0, 1, 2, 4, 8]",
                     "--model.init_args.checkpoints", "ckpts/checkpoint-{100,200,300}", cwd=loopdir)
    assert more.returncode == 0, more.stderr[-3000:]
    assert f"{4 * 9 * 5} work items, {len(stored)} already stored" in more.stdout + more.stderr
    assert _keys(run_dir)[:len(stored)] == stored
    extended = _table(run_dir)
    assert list(dict.fromkeys(extended["model"])) == ["baseline", "checkpoint-100", "checkpoint-200", "checkpoint-300"]
    old = extended[(extended["loop_count"] != 8) & (extended["model"] != "checkpoint-300")].reset_index(drop=True)
    _close(old, table.reset_index(drop=True), rel=0)

    # Refused, naming the setting: another block range; changed weights of a stored checkpoint.
    before = snapshot(run_dir)
    moved = lensbench("predict", "--config", "run.yaml", "--model.init_args.start", "0", cwd=loopdir)
    assert moved.returncode != 0 and "model.init_args.start" in last_line(moved.stderr), last_line(moved.stderr)
    assert snapshot(run_dir) == before
    (loopdir / "ckpts2").mkdir()
    save_tiny_llama(loopdir / "ckpts2" / "checkpoint-100", seed=42, layers=4)
    swapped = lensbench("predict", "--config", "run.yaml", "--model.init_args.checkpoints", "[ckpts2/checkpoint-100]",
                        cwd=loopdir)
    assert swapped.returncode != 0
    line = last_line(swapped.stderr)
    assert line.startswith("lensbench: error: model.init_args.checkpoints[0]:"), line
    assert "checkpoint 'checkpoint-100'" in line and "other weights" in line, line
    assert snapshot(run_dir) == before


def test_a_zeroed_block_is_an_exact_identity_at_every_loop_count(loopdir):
    """Block 1 with its attention output and MLP down projections zeroed (a perturbation state)
    adds nothing to the residual stream: cos 1 and MSE 0 at every k."""
    glob = "model.layers.1.{self_attn.o_proj,mlp.down_proj}.weight"
    proc = lensbench("predict", "--config", "run.yaml", "--model.init_args.checkpoints", "null",
                     "--model.init_args.end", "1", "--model.init_args.loop_counts", "[0, 1, 3, 8]",
                     "--model.init_args.perturbation",
                     json.dumps({"method": "ablation", "param_group": glob, "levels": [1.0], "include_baseline": True}),
                     "--model.init_args.experiment", "zeroed", cwd=loopdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = _table(loopdir / "outputs" / "zeroed")
    assert sorted(table["level_value"].unique()) == [0.0, 1.0]
    zeroed = table[table["level_value"] == 1.0]
    assert len(zeroed) == 2 * 4
    assert ((zeroed["cosine_mean"] - 1).abs() < 1e-12).all() and (zeroed["mse_mean"] == 0).all()
    assert (zeroed["norm_diff_mean"].abs() < 1e-12).all()
    assert (zeroed.loc[zeroed["loop_count"] > 0, "step_rel_change_mean"] == 0).all()
    assert zeroed.groupby("dataset")["perplexity"].nunique().eq(1).all()  # every k: the same model
    intact = table[(table["level_value"] == 0.0) & (table["loop_count"] == 8)]
    assert (intact["cosine_mean"] < 0.999).all()  # the same block unperturbed does change h


def test_two_ddp_processes_match_one(loopdir):
    runs = run_many({
        "one": (("predict", "--config", "run.yaml", "--model.init_args.experiment", "one"), loopdir, None),
        "two": (("predict", "--config", "run.yaml", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                 "--model.init_args.experiment", "two"), loopdir, None),
    })
    for name, proc in runs.items():
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    shards = sorted((loopdir / "outputs" / "two" / "shards").glob("*.jsonl"))
    assert len(shards) == 2 and all(p.stat().st_size > 0 for p in shards)  # both ranks worked
    # Two processes split the CPU threads: float32 sums may round differently.
    _close(_table(loopdir / "outputs" / "two"), _table(loopdir / "outputs" / "one"), rel=1e-6)
    for name in ("baseline", "checkpoint-100", "checkpoint-200"):
        assert (loopdir / "outputs" / "two" / f"{name}_metrics.csv").is_file()


def test_sigkill_then_resume_equals_an_uninterrupted_run(loopdir):
    write_texts(loopdir / "long.txt", 40, seed=3)  # seconds per run, even on two busy cores
    args = ["predict", "--config", "run.yaml", "--data.init_args.datasets", "[long.txt]",
            "--data.init_args.batch_size", "1", "--model.init_args.checkpoints", "[ckpts/checkpoint-100]"]
    full = lensbench(*args, "--model.init_args.experiment", "full", cwd=loopdir)
    assert full.returncode == 0, full.stderr[-3000:]
    run_dir = loopdir / "outputs" / "killed"
    shard = run_dir / "shards" / "rank00000.jsonl"
    stored = sigkill_when_stored([*args, "--model.init_args.experiment", "killed"], loopdir, shard, 30)
    total = 2 * 40 * 4
    assert 30 <= stored < total, "the kill must land mid-run"
    assert not (run_dir / "loop_metrics.csv").exists()
    resumed = lensbench(*args, "--model.init_args.experiment", "killed", cwd=loopdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    keys = _keys(run_dir)
    assert len(keys) == len(set(keys)) == total  # nothing duplicated, nothing missing
    _close(_table(run_dir), _table(loopdir / "outputs" / "full"), rel=1e-9)


@pytest.mark.parametrize("overrides, field, words", [
    (("--model.init_args.start", "3", "--model.init_args.end", "2"), "model.init_args.start", "start <= end"),
    (("--model.init_args.end", "4",), "model.init_args.end", "0..3"),
    (("--model.init_args.loop_counts", "[0, 2, -1]",), "model.init_args.loop_counts[2]", ">= 0"),
    (("--model.init_args.checkpoints", "[ckpts/checkpoint-100, three/checkpoint-5]",),
     "model.init_args.checkpoints[1]", "3 layers"),
    (("--model.init_args.checkpoints", "ckpts/checkpoint-{100,400}",), "model.init_args.checkpoints", "does not exist"),
    # Inputs that used to pass __init__ and fail after work started.
    (("--model.init_args.checkpoints", "[ckpts/checkpoint-100, {source: ckpts/checkpoint-200, transforms: [{name: loop_layers, params: {start: 1, end: 2, passes: 2}}]}]"),
     "model.init_args.checkpoints[1].transforms", "loops blocks start..end itself"),
    (("--model.init_args.baseline", "{source: base, transforms: [{name: gaussian_noise, params: {std: 0.1}}]}"),
     "model.init_args.baseline.transforms", "remove the transforms"),
    (("--model.init_args.baseline", "{source: base, head: base}"), "model.init_args.baseline.head", "causal_lm"),
    (("--model.init_args.baseline", "bert"), "model.init_args.baseline.source", "not a decoder"),
    (("--model.init_args.checkpoints", "[bert]"), "model.init_args.checkpoints[0].source", "'bert'"),
    (("--model.init_args.checkpoints", "[scaled]"), "model.init_args.checkpoints[0].source", "logits_scaling"),
    (("--model.init_args.checkpoints", "[{source: ckpts/checkpoint-100, name: loop}]"),
     "model.init_args.checkpoints[0].name", "loop_metrics.csv"),
    (("--model.init_args.baseline", "{source: base, name: loop}"), "model.init_args.baseline.name", "reserved"),
])
def test_bad_input_is_one_line_naming_the_field(loopdir, overrides, field, words):
    proc = lensbench("predict", "--config", "run.yaml", *overrides, cwd=loopdir)
    assert proc.returncode != 0
    line = last_line(proc.stderr)
    assert line.startswith(f"lensbench: error: {field}:"), line
    assert words in line, line
    assert not (loopdir / "outputs").exists()  # refused before any work


def test_checkpoint_patterns_expand_in_step_order(tmp_path):
    from lensbench.analyses.loop_identity import expand_checkpoints, trailing_step
    from lensbench.errors import LensbenchError

    for step in (1000, 200, 100):
        (tmp_path / f"checkpoint-{step}").mkdir()
    field = "model.init_args.checkpoints"
    found = [Path(p).name for p, _ in expand_checkpoints(str(tmp_path / "checkpoint-*"), field)]
    assert found == ["checkpoint-100", "checkpoint-200", "checkpoint-1000"]
    braces = [Path(p).name for p, _ in expand_checkpoints(str(tmp_path / "checkpoint-{1000,100}"), field)]
    assert braces == ["checkpoint-1000", "checkpoint-100"]  # as written
    assert [w for _, w in expand_checkpoints(["a", "b"], field)] == [f"{field}[0]", f"{field}[1]"]
    with pytest.raises(LensbenchError, match="matches no folder"):
        expand_checkpoints(str(tmp_path / "ckpt-*"), field)
    assert trailing_step("checkpoint-300") == 300 and trailing_step("final") is None


def test_a_checkpoint_folder_has_one_weights_digest_however_its_path_is_written(loopdir, monkeypatch):
    """The source string is not in the digest (the fingerprint covers the weights' content):
    ./ckpts/x, ckpts/x and /abs/ckpts/x resume one run; other settings still change it."""
    monkeypatch.chdir(loopdir)
    digests = set()
    for path in ("ckpts/checkpoint-100", "./ckpts/checkpoint-100", str(loopdir / "ckpts" / "checkpoint-100")):
        analysis = LoopIdentity(baseline="base", checkpoints=[path], start=1, end=2)
        digests.add(analysis._weights_of("checkpoint-100"))
    assert len(digests) == 1
    from lensbench.models.loading import ModelSpec

    other = LoopIdentity(baseline="base", checkpoints=[ModelSpec("ckpts/checkpoint-100", dtype="bfloat16")],
                         start=1, end=2)
    assert other._weights_of("checkpoint-100") not in digests
    swapped = LoopIdentity(baseline="base", checkpoints=["ckpts/checkpoint-200"], start=1, end=2)
    assert swapped._weights_of("checkpoint-200") not in digests


def test_checkpoint_folders_take_the_baselines_dtype_and_attention(loopdir, monkeypatch):
    from lensbench.models.loading import ModelSpec

    monkeypatch.chdir(loopdir)
    base = ModelSpec("base", dtype="bfloat16", attn_implementation="eager")
    analysis = LoopIdentity(baseline=base, start=1, end=2,
                            checkpoints="ckpts/checkpoint-{100,200}")
    for label in ("checkpoint-100", "checkpoint-200"):
        assert (analysis.specs[label].dtype, analysis.specs[label].attn_implementation) == ("bfloat16", "eager")
    listed = LoopIdentity(baseline=base, start=1, end=2,
                          checkpoints=["ckpts/checkpoint-100", ModelSpec("ckpts/checkpoint-200", dtype="float32")])
    assert listed.specs["checkpoint-100"].dtype == "bfloat16"
    assert (listed.specs["checkpoint-200"].dtype, listed.specs["checkpoint-200"].attn_implementation) == ("float32", None)


def test_one_capture_per_batch_also_after_resuming_from_a_partial_store(loopdir, monkeypatch):
    """The loop counts of a batch share one captured forward: a fresh run and a run resuming from a
    store that holds some of a batch's loop counts each capture every (state, batch) they compute once
    (the core cuts steps where ``step_group`` changes; without it the resumed steps straddle batches)."""
    from lensbench.cli import main
    from lensbench.models.replay import BlockReplay

    monkeypatch.chdir(loopdir)
    captures: list[tuple] = []
    current: list[tuple] = []
    measure, capture = LoopIdentity._measure, BlockReplay.capture

    def spy_measure(self, state, batch, counts):
        current[:] = [(state.id, batch.dataset, tuple(batch.texts))]
        return measure(self, state, batch, counts)

    def spy_capture(self, batch):
        captures.append(current[0])
        return capture(self, batch)

    monkeypatch.setattr(LoopIdentity, "_measure", spy_measure)
    monkeypatch.setattr(BlockReplay, "capture", spy_capture)
    args = ["predict", "--config", "run.yaml", "--data.init_args.datasets", "[beta.txt]",
            "--model.init_args.checkpoints", "[ckpts/checkpoint-100]", "--model.init_args.experiment", "spy"]
    assert main(args) == 0
    batches = 2 * 3  # 2 models x 9 texts in batches of 4
    assert len(captures) == len(set(captures)) == batches
    # Keep the records of the first batch but one loop count (a kill between two of its records)
    # and drop the rest: the resumed steps must not straddle two batches.
    shard = loopdir / "outputs" / "spy" / "shards" / "rank00000.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    assert len(lines) == batches * 4
    shard.write_text("".join(lines[:1] + lines[2:4]))
    captures.clear()
    assert main(args) == 0
    assert len(captures) == len(set(captures)) == batches, captures
    assert len(_keys(loopdir / "outputs" / "spy")) == batches * 4
    # What the core groups by: the item's key without its loop count.
    analysis = LoopIdentity(baseline="base", start=1, end=2, loop_counts=[0, 2])
    assert analysis.items_per_step == 2
    assert analysis.step_group(type("Item", (), {"key": ("s", "d", (0, 1), 2)})()) == ("s", "d", (0, 1))


def test_without_perplexity_the_metrics_are_the_same_and_no_tail_runs(loopdir):
    args = ("predict", "--config", "run.yaml", "--model.init_args.checkpoints", "null",
            "--model.init_args.loop_counts", "[0, 1, 3]")
    runs = {name: lensbench(*args, *extra, "--model.init_args.experiment", name, cwd=loopdir)
            for name, extra in (("with_ppl", ()), ("no_ppl", ("--model.init_args.perplexity", "false")))}
    for proc in runs.values():
        assert proc.returncode == 0, proc.stderr[-3000:]
    with_ppl, no_ppl = _table(loopdir / "outputs" / "with_ppl"), _table(loopdir / "outputs" / "no_ppl")
    metrics = [c for c in with_ppl.columns if c.endswith(("_mean", "_std")) or c in ("n_tokens", "loop_count")]
    pd.testing.assert_frame_equal(no_ppl[metrics], with_ppl[metrics])
    assert with_ppl["perplexity"].notna().all() and no_ppl["perplexity"].isna().all()
    assert (no_ppl["perplexity_tokens"] == 0).all()
    assert (loopdir / "outputs" / "with_ppl" / "perplexity_vs_loop_count.png").exists()
    assert not (loopdir / "outputs" / "no_ppl" / "perplexity_vs_loop_count.png").exists()
    assert (loopdir / "outputs" / "no_ppl" / "cosine_similarity_vs_loop_count.png").exists()


def _figure_table() -> pd.DataFrame:
    """A loop_metrics table of a baseline at three perturbed levels and two checkpoints; one
    checkpoint an exact identity (every step change 0), the baseline's level 1.0 all NaN."""
    rows = []
    for model, role, level, rel in (("baseline", "baseline", 0.0, 0.5), ("baseline", "baseline", 0.1, 0.4),
                                    ("baseline", "baseline", 1.0, float("nan")),
                                    ("checkpoint-100", "checkpoint", 0.0, 0.0), ("checkpoint-200", "checkpoint", 0.0, 0.3)):
        for k in (0, 1, 2, 4):
            rows.append({"model": model, "role": role, "dataset": "d", "degradation_method": "add_gauss",
                         "param_group_name": "g", "level_value": level, "repeat_index": 0, "loop_count": k,
                         "cosine_mean": 1.0 if rel == 0 or k == 0 else 1 - rel * k / 10,
                         "mse_mean": 0.0 if k == 0 else rel, "norm_diff_mean": rel,
                         "step_rel_change_mean": float("nan") if k == 0 else rel / k,
                         "step_cosine_mean": float("nan") if k == 0 else 1 - rel / 10,
                         "perplexity": 10.0 * (1 + rel * k) if rel == rel else float("nan")})
    return pd.DataFrame(rows)


def test_figures_draw_an_exact_zero_and_tell_every_line_apart(tmp_path):
    from lensbench.analyses.loop_identity import figures
    from lensbench.tables import pyplot

    table = _figure_table()
    figs = figures(table, "blocks 1..2")
    assert sorted(figs) == ["convergence_vs_loop_count.png", "cosine_similarity_vs_loop_count.png",
                            "mse_vs_loop_count.png", "norm_diff_vs_loop_count.png", "perplexity_vs_loop_count.png"]
    left = figs["convergence_vs_loop_count.png"].axes[0]
    # the identity checkpoint's relative change is 0 at every k >= 1: drawn on a symlog axis, not dropped
    assert left.get_yscale() == "symlog"
    identity = next(line for line in left.get_lines() if line.get_label() == "checkpoint-100 / level_value=0.0")
    y = identity.get_ydata()
    assert list(y[1:]) == [0.0, 0.0, 0.0]
    low, high = left.get_ylim()
    assert low <= 0 <= high
    # perplexity (all > 0) keeps a log axis; the all-NaN state is drawn as an empty line, not a failure
    assert figs["perplexity_vs_loop_count.png"].axes[0].get_yscale() == "log"
    for name, fig in figs.items():
        for ax in fig.axes:
            lines = ax.get_lines()
            assert len(lines) == 5, name
            looks = {(str(line.get_color()), line.get_linestyle(), line.get_marker()) for line in lines}
            assert len(looks) == 5, f"{name}: two lines look alike"
            baseline = [line for line in lines if line.get_label().startswith("baseline")]
            assert len(baseline) == 3 and all(line.get_linestyle() == "--" for line in baseline), name
        fig.savefig(tmp_path / name)
        pyplot().close(fig)
    # nothing finite and > 0 for a log axis: linear, no failure
    table["step_rel_change_mean"] = float("nan")
    table["perplexity"] = float("inf")
    figs = figures(table)
    assert figs["convergence_vs_loop_count.png"].axes[0].get_yscale() == "linear"
    for name, fig in figs.items():
        fig.savefig(tmp_path / name)
        pyplot().close(fig)


def test_skipping_the_first_position_and_medians_match_plain_torch(tmp_path):
    """``skip_first_position`` leaves each text's first token out of every metric, and the medians
    are those of the per-token values (within the sketch's 0.1%), checked against a computation
    with transformers' own forward and plain torch over three texts of different lengths."""
    folder = save_tiny_llama(tmp_path / "m", seed=5, layers=4)
    start, end, counts = 1, 2, [0, 1, 2]
    tables = {}
    for skip in (False, True):
        analysis = LoopIdentity(baseline=str(folder), start=start, end=end, loop_counts=counts, max_length=64,
                                perplexity=False, skip_first_position=skip)
        analysis.subjects = SubjectManager(analysis.specs, torch.device("cpu"), active_registries().perturbations)
        records = []
        for b in (TEXTS[:2], TEXTS[2:]):  # two batches: medians and means merged over both
            measured = analysis._measure(State("baseline"), TextBatch("t", b), counts)
            records += [{"model": "baseline", "role": "baseline", "step": None, "dataset": "t", "labels": {},
                         "loop_count": k, **m} for k, m in measured.items()]
        records.sort(key=lambda r: r["loop_count"])
        (tmp_path / str(skip)).mkdir()
        tables[skip] = pd.read_csv(LoopIdentity.merge(records, tmp_path / str(skip))[0]).set_index("loop_count")

    tokenizer = tiny_tokenizer()
    per_text = []  # per text: h_in, h_out(1), h_out(2) over its real tokens, [T_i, D]
    for text in TEXTS:
        enc = tokenizer([text], return_tensors="pt")
        outputs = [_looped_forward(folder, start, end, k, enc)[0] for k in (1, 2)]
        width = end - start + 1
        per_text.append([outputs[0][start - 1][0], outputs[0][start - 1 + width][0], outputs[1][start - 1 + 2 * width][0]])
    for skip, table in tables.items():
        cut = 1 if skip else 0
        h_in, h1, h2 = (torch.cat([t[i][cut:] for t in per_text]).double() for i in range(3))
        assert (table["n_tokens"] == len(h_in)).all() and (table["n_nonfinite_tokens"] == 0).all()
        for k, (out, prev) in {1: (h1, h_in), 2: (h2, h1)}.items():
            values = {"cosine": (h_in * out).sum(-1) / (h_in.norm(dim=-1) * out.norm(dim=-1)),
                      "mse": ((out - h_in) ** 2).mean(-1), "norm_diff": out.norm(dim=-1) - h_in.norm(dim=-1),
                      "step_rel_change": (out - prev).norm(dim=-1) / prev.norm(dim=-1)}
            for name, v in values.items():
                assert table.loc[k, f"{name}_mean"] == pytest.approx(v.mean().item(), rel=1e-5), (skip, k, name)
                lower_median = torch.quantile(v, 0.5, interpolation="lower").item()
                assert table.loc[k, f"{name}_median"] == pytest.approx(lower_median, rel=1.01e-3), (skip, k, name)
        assert table.loc[0, "mse_median"] == 0 and table.loc[0, "cosine_median"] == pytest.approx(1, rel=1e-3)
    assert (tables[False]["n_tokens"] - tables[True]["n_tokens"] == len(TEXTS)).all()
    assert tables[False].loc[1, "norm_diff_mean"] != pytest.approx(tables[True].loc[1, "norm_diff_mean"], rel=1e-3)


def test_errors_about_a_patterned_folder_name_the_pattern_field(tmp_path):
    """A folder that a ``checkpoints`` pattern named has no field of its own: an error about it
    (here its weights, cut short, found when it loads) names ``model.init_args.checkpoints`` and the
    folder, not ``model.init_args.checkpoints.source``; ``end`` < 0 names ``end``, not ``start``."""
    import shutil

    from lensbench.errors import LensbenchError

    base = save_tiny_llama(tmp_path / "base", layers=2)
    shutil.copytree(base, tmp_path / "ck" / "checkpoint-1")
    weights = tmp_path / "ck" / "checkpoint-1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    analysis = LoopIdentity(baseline=str(base), checkpoints=str(tmp_path / "ck" / "checkpoint-*"), start=0, end=1,
                            loop_counts=[0, 1])
    assert analysis.fields["checkpoint-1"] == "model.init_args.checkpoints"
    analysis.subjects = SubjectManager(analysis.specs, torch.device("cpu"), active_registries().perturbations,
                                       fields=analysis.fields)
    with pytest.raises(LensbenchError) as caught:
        analysis._measure(State("checkpoint-1"), TextBatch("t", ("the cat",)), [0, 1])
    assert caught.value.field == "model.init_args.checkpoints"
    assert "checkpoint-1" in caught.value.message and "safetensors" in caught.value.message
    with pytest.raises(LensbenchError) as caught:
        LoopIdentity(baseline=str(base), start=0, end=-1)
    assert caught.value.field == "model.init_args.end" and "-1" in caught.value.message
