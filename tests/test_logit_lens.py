"""logit_lens against a plain per-token, per-layer loop written from the definition."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lensbench.cli import main
from lensbench.data.sources import read_texts
from lensbench.intervals import ratio_interval

CONFIG = """
model:
  class_path: logit_lens
  init_args:
    models: [tiny]
    chunk_tokens: 7
    top_tokens: 5
    experiment: lens
data:
  class_path: lensbench.data.modules.TextDataModule
  init_args:
    datasets: [alpha.txt, beta.txt]
    batch_size: 4
trainer: {accelerator: cpu, devices: 1}
"""


def _reference(model_dir, texts):
    """Per text: predicting-token count and, per layer, the sums of agreement, accuracy, KL and
    entropy; one text at a time (no padding), one position and one layer at a time."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    per_text = []
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
            n_layers = len(out.hidden_states)
            sums = np.zeros((4, n_layers))
            for t in range(ids.shape[1] - 1):
                final = torch.log_softmax(out.logits[0, t], -1)
                for layer in range(n_layers):
                    logits = (out.logits[0, t] if layer == n_layers - 1
                              else model.lm_head(model.model.norm(out.hidden_states[layer][0, t])))
                    lens = torch.log_softmax(logits, -1)
                    sums[0, layer] += float(lens.argmax() == final.argmax())
                    sums[1, layer] += float(lens.argmax() == ids[0, t + 1])
                    sums[2, layer] += float(sum(final.exp()[v] * (final[v] - lens[v]) for v in range(len(lens))))
                    sums[3, layer] += float(-sum(lens.exp()[v] * lens[v] for v in range(len(lens))))
        per_text.append((ids.shape[1] - 1, sums))
    return per_text


@pytest.fixture
def lens_run(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    (workdir / "lens.yaml").write_text(CONFIG)
    assert main(["predict", "--config", "lens.yaml"]) == 0
    return workdir / "outputs" / "lens"


def test_matches_a_loop_over_tokens_and_layers(lens_run, workdir):
    table = pd.read_csv(lens_run / "logit_lens.csv")
    metrics = ["top1_agreement", "top1_accuracy", "kl_to_final", "entropy"]
    assert list(table.columns) == ["model", "dataset", "layer", "n_tokens", "n_texts",
                                   *[f"{m}{s}" for m in metrics for s in ("", "_ci_low", "_ci_high")]]
    for name in ("alpha", "beta"):
        ref = _reference(workdir / "tiny", read_texts(workdir / f"{name}.txt"))
        counts = np.array([n for n, _ in ref])
        rows = table[table["dataset"] == name].sort_values("layer")
        assert list(rows["layer"]) == [0, 1, 2]
        assert (rows["n_tokens"] == counts.sum()).all() and (rows["n_texts"] == (counts > 0).sum()).all()
        for i, metric in enumerate(metrics):
            sums = np.stack([s[i] for _, s in ref])  # [texts, layers]
            assert np.allclose(rows[metric], sums.sum(0) / counts.sum(), rtol=1e-5, atol=1e-6), metric
            for layer in range(3):
                # the CR1 variance written per text: k/(k-1) Σ n_i² (mean_i - R)² / N²
                k, big_n = (counts > 0).sum(), counts.sum()
                ratio = sums[:, layer].sum() / big_n
                means = sums[:, layer] / counts
                se = math.sqrt(k / (k - 1) * float((counts ** 2 * (means - ratio) ** 2).sum())) / big_n
                from scipy.stats import t

                half = t.ppf(0.975, k - 1) * se
                low, high = ratio - half, ratio + half
                if metric.startswith("top1"):
                    low, high = max(low, 0), min(high, 1)
                row = rows[rows["layer"] == layer].iloc[0]
                assert row[f"{metric}_ci_low"] == pytest.approx(low, abs=1e-6), (metric, layer)
                assert row[f"{metric}_ci_high"] == pytest.approx(high, abs=1e-6), (metric, layer)
    last = table[table["layer"] == 2]
    assert (last["top1_agreement"] == 1).all() and np.allclose(last["kl_to_final"], 0, atol=1e-6)
    assert (lens_run / "logit_lens.png").stat().st_size > 0


def test_the_tokens_table_holds_the_first_texts_top1_per_layer(lens_run, workdir):
    tokens = pd.read_csv(lens_run / "logit_lens_tokens.csv", keep_default_na=False)
    tok = AutoTokenizer.from_pretrained(workdir / "tiny")
    model = AutoModelForCausalLM.from_pretrained(workdir / "tiny").eval()
    text = read_texts(workdir / "alpha.txt")[0]
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    rows = tokens[tokens["dataset"] == "alpha"]
    assert sorted(rows["layer"].unique()) == [0, 1, 2]
    n = min(5, ids.shape[1] - 1)  # top_tokens, or the text's predicting positions
    for layer in range(3):
        got = rows[rows["layer"] == layer].sort_values("position")
        assert list(got["position"]) == list(range(n))
        assert list(got["input_token"]) == tok.convert_ids_to_tokens(ids[0, :n].tolist())
        assert list(got["next_token"]) == tok.convert_ids_to_tokens(ids[0, 1:n + 1].tolist())
        h = out.hidden_states[layer][0, :n]
        logits = out.logits[0, :n] if layer == 2 else model.lm_head(model.model.norm(h))
        top1 = logits.argmax(-1).tolist()
        assert list(got["top1_id"]) == top1 and list(got["input_id"]) == ids[0, :n].tolist()
        # an id beyond the tokenizer's vocabulary (the tiny model's is padded) has no token string
        assert list(got["top1_token"]) == [t or "" for t in tok.convert_ids_to_tokens(top1)]


def test_ratio_interval_edge_cases():
    assert all(math.isnan(v) for v in ratio_interval([3.0], [4]))  # one text: no interval
    assert all(math.isnan(v) for v in ratio_interval([1.0, float("nan")], [2, 2]))
    low, high = ratio_interval([2.0, 2.0, 0.0], [4, 4, 0])  # a text with no token is left out
    assert low == high == pytest.approx(0.5)


def test_a_perturbed_grid_adds_states_and_bad_values_are_one_line(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    (workdir / "lens.yaml").write_text(CONFIG)
    assert main(["predict", "--config", "lens.yaml", "--model.init_args.perturbation",
                 "{method: ablation, param_group: mlp_only, levels: [1.0]}"]) == 0
    table = pd.read_csv(workdir / "outputs" / "lens" / "logit_lens.csv")
    assert sorted(table["level_value"].unique()) == [0.0, 1.0]
    clean, ablated = (table[(table["level_value"] == v) & (table["dataset"] == "alpha")].sort_values("layer")
                      for v in (0.0, 1.0))
    # layer 0 (the embedding output) is untouched by the MLPs; later layers change
    assert clean["entropy"].iloc[0] == pytest.approx(ablated["entropy"].iloc[0], rel=1e-6)
    assert not np.allclose(clean["kl_to_final"].iloc[:2], ablated["kl_to_final"].iloc[:2])
    capsys.readouterr()
    assert main(["predict", "--config", "lens.yaml", "--model.init_args.chunk_tokens", "0",
                 "--model.init_args.experiment", "lens2"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lensbench: error: model.init_args.chunk_tokens: must be an integer >= 1, got 0")
    assert not (workdir / "outputs" / "lens2").exists()


def test_declared_models_are_checked_before_any_folder_and_an_encoder_is_refused(workdir, monkeypatch, capsys):
    from transformers import BertConfig, BertModel

    monkeypatch.chdir(workdir)
    (workdir / "lens.yaml").write_text(CONFIG)
    # a missing model: one line naming its entry, before the run folder exists
    assert main(["predict", "--config", "lens.yaml", "--model.init_args.models", "[tiny, nowhere/model]"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("lensbench: error: model.init_args.models[1]")
    assert not (workdir / "outputs").exists()
    assert main(["predict", "--config", "lens.yaml", "--model.init_args.models", "[tiny, tiny]"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lensbench: error: model.init_args.models[1]: model label 'tiny' is used twice; give one a `name`")
    # an encoder without an LM head: one line naming the model's field
    BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(workdir / "bert")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (workdir / "tiny" / name).exists():
            (workdir / "bert" / name).write_bytes((workdir / "tiny" / name).read_bytes())
    capsys.readouterr()
    assert main(["predict", "--config", "lens.yaml", "--model.init_args.models", "[{source: bert, head: base}]",
                 "--model.init_args.experiment", "bert"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("lensbench: error: model.init_args.models[0]: ") and "logit_lens needs a" in line, line


def test_a_looped_model_is_read_after_every_block_pass(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    (workdir / "lens.yaml").write_text(CONFIG)
    looped = "{source: tiny, name: looped, transforms: [{name: loop_layers, params: {start: 0, end: 1, passes: 3}}]}"
    assert main(["predict", "--config", "lens.yaml", "--model.init_args.models", f"[tiny, {looped}]"]) == 0
    table = pd.read_csv(workdir / "outputs" / "lens" / "logit_lens.csv")
    plain, loop = (table[(table["model"] == m) & (table["dataset"] == "alpha")].sort_values("layer") for m in ("tiny", "looped"))
    assert list(plain["layer"]) == [0, 1, 2] and list(loop["layer"]) == list(range(7))  # 2 blocks x 3 passes
    assert loop["top1_agreement"].iloc[-1] == 1 and plain["top1_agreement"].iloc[-1] == 1
    # layer 0 (the embedding) is the same model before any block; the looped model's output differs
    assert loop["entropy"].iloc[0] == pytest.approx(plain["entropy"].iloc[0], rel=1e-6)
    assert loop["top1_accuracy"].iloc[-1] != pytest.approx(plain["top1_accuracy"].iloc[-1]) or \
        loop["kl_to_final"].iloc[0] != pytest.approx(plain["kl_to_final"].iloc[0])
