"""Runs through the real console script on ``accelerator: gpu``: activation_norms (plain, and with the
model split between GPU and CPU by a device_map) against the same run on the CPU, and a perturbation
run; the float32 matmul precision is high by default on a GPU, recorded in run.json, and Lightning's
advice about it never shows."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from .gpu_models import GPU, texts

from helpers_cli import run_many

pytestmark = GPU

SPLIT = ("{model.embed_tokens: 0, model.layers.0: 0, model.layers.1: cpu, model.layers.2: 0, "
         "model.layers.3: cpu, model.norm: 0, model.rotary_emb: 0, lm_head: cpu}")


def _act(accelerator: str, model: str = "model") -> str:
    return ("model:\n  class_path: activation_norms\n  init_args:\n"
            f"    models: [{model}]\n"
            "data:\n  class_path: lensbench.data.modules.TextDataModule\n  init_args:\n"
            "    datasets: [alpha.txt, beta.txt]\n    batch_size: 8\n"
            f"trainer:\n  accelerator: {accelerator}\n  devices: 1\n")


PERTURBATION = (
    "model:\n  class_path: perturbation\n  init_args:\n    model: model\n"
    "    perturbation: {method: mult_gauss, param_group: attn_only, levels: [0.5], n_rep: 1, seed: 42}\n"
    "    generation: {do_sample: false, max_new_tokens: 8, max_batch_size: 4}\n"
    "    perplexity: {text: \"the capital of france is paris and the sea is water\"}\n"
    "data:\n  class_path: lensbench.data.modules.PromptDataModule\n  init_args:\n    prompts: [prompts.txt]\n"
    "trainer:\n  accelerator: gpu\n  devices: 1\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llama):
    work = tmp_path_factory.mktemp("gpu-cli")
    (work / "model").symlink_to(llama)
    (work / "alpha.txt").write_text("\n".join(texts(24, seed=1)) + "\n")
    (work / "beta.txt").write_text("\n".join(texts(10, words=30, seed=2)) + "\n")
    (work / "prompts.txt").write_text("\n".join(texts(6, words=6, seed=3)) + "\n")
    configs = {"act_gpu": _act("gpu"), "act_cpu": _act("cpu"),
               "act_split": _act("gpu", f"{{source: model, device_map: {SPLIT}}}"), "pert_gpu": PERTURBATION}
    for name, text in configs.items():
        (work / f"{name}.yaml").write_text(text)
    results = run_many({name: (("predict", "--config", f"{name}.yaml"), work, None) for name in configs})
    return work, results


def _run_dir(work, name):
    analysis = "perturbation" if name.startswith("pert") else "activation_norms"
    return work / "outputs" / analysis / name


def test_every_run_succeeds_without_lightnings_precision_advice(runs):
    work, results = runs
    for name, result in results.items():
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr
        assert "set_float32_matmul_precision" not in result.stderr + result.stdout, name
        assert "Tensor Cores" not in result.stderr + result.stdout, name


def test_run_json_records_the_float32_matmul_precision(runs):
    work, _ = runs
    precision = {name: json.loads((_run_dir(work, name) / "run.json").read_text())["float32_matmul_precision"]
                 for name in ("act_gpu", "act_cpu", "act_split", "pert_gpu")}
    assert precision == {"act_gpu": "high", "act_cpu": "highest", "act_split": "high", "pert_gpu": "high"}


def test_activation_norms_on_the_gpu_match_the_cpu_and_the_split_model(runs):
    work, _ = runs
    tables = {name: pd.read_csv(_run_dir(work, name) / "activation_norms.csv")
              for name in ("act_gpu", "act_cpu", "act_split")}
    numeric = [c for c in tables["act_cpu"].columns if pd.api.types.is_float_dtype(tables["act_cpu"][c])]
    assert numeric
    keys = [c for c in tables["act_cpu"].columns if c not in numeric]
    for name in ("act_gpu", "act_split"):
        assert tables[name][keys].equals(tables["act_cpu"][keys]), name
    # TF32 matmuls (precision high) on the GPU: agreement to about 1e-3 with the CPU's float32
    pd.testing.assert_frame_equal(tables["act_gpu"][numeric], tables["act_cpu"][numeric], rtol=1e-2, atol=1e-4)
    # the split model computes on the same GPU with the same kernels
    pd.testing.assert_frame_equal(tables["act_split"][numeric], tables["act_gpu"][numeric], rtol=1e-4, atol=1e-6)


def test_a_perturbation_run_on_the_gpu(runs):
    from lensbench.results import ResultStore

    work, _ = runs
    records = list(ResultStore(_run_dir(work, "pert_gpu")).records())
    assert len(records) == 2 * 6  # the baseline and one level, six prompts
    assert {r["device"] for r in records} == {"cuda:0"}
    assert all(r["weights_finite"] and math.isfinite(r["perplexity"]) for r in records)
    base = {r["prompt_id"]: r["output"] for r in records if r["is_baseline"]}
    assert len(base) == 6 and all(isinstance(o, str) for o in base.values())
