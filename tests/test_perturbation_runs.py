"""End-to-end perturbation runs through the real console script on the tiny model: merged outputs,
summary, figures, reproducibility, DDP, resume after SIGKILL, force_run, the example plugin's
low_rank, activation_norms over perturbed states, and bad input.

Independent console-script calls are started together (``run_many``) by one module fixture.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import clean_env, lensbench
from helpers_cli import last_line, run_many, sigkill_when_stored
from tiny import write_texts
from transformers import AutoModelForCausalLM, AutoTokenizer

from lensbench.analyses.perturbation import prompt_seed
from lensbench.data.sources import read_texts
from lensbench.generation import GenerationSettings, generate
from lensbench.models.loading import ModelSpec
from lensbench.perturbations import PerturbationGrid
from lensbench.plugins import active_registries
from lensbench.state import SubjectManager

PPL_TEXT = "the capital of france is paris and the sun is on the sea"
MLP = [f"model.layers.{i}.mlp.{p}_proj.weight" for i in (0, 1) for p in ("gate", "up", "down")]
ATTN = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in ("q", "k", "v", "o")]
SCHEMA = {
    "timestamp", "model_name", "model_label", "degradation_method", "level_value", "std_dev", "is_baseline",
    "param_group_name", "touched_tensors", "n_touched_tensors", "weights_finite", "repeat_index", "seed",
    "sampling_seed", "prompt_group", "prompt_id", "category", "expected_answer", "prompt_text", "output",
    "duration", "tokens", "batch_size_effective", "temperature", "do_sample", "top_p", "max_new_tokens",
    "perplexity", "perplexity_state", "dtype", "device", "load_4bit", "name_suffix", "image", "image_used",
}
# The seed's timestamp form: 2025-10-06T12:34:56.789Z (UTC, milliseconds, Z).
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def perturbation_yaml(method: str = "mult_gauss", group: str = "mlp_only", levels: str = "[0.5, 3.0]",
                      n_rep: int = 2, generation: str = "{do_sample: false, max_new_tokens: 6, max_batch_size: 3}",
                      extra: str = "", prompts: str = "[prompts.txt]", model: str = "tiny") -> str:
    return (
        "model:\n  class_path: perturbation\n  init_args:\n"
        f"    model: {model}\n"
        f"    perturbation: {{method: {method}, param_group: {group}, levels: {levels}, n_rep: {n_rep}, seed: 42}}\n"
        f"    generation: {generation}\n"
        f"    perplexity: {{text: \"{PPL_TEXT}\"}}\n{extra}"
        "data:\n  class_path: lensbench.data.modules.PromptDataModule\n"
        f"  init_args:\n    prompts: {prompts}\n"
        "trainer:\n  accelerator: cpu\n  devices: 1\n"
    )


# One thread per process: with several processes on few cores, torch's default thread pool makes
# each tiny matmul wait for a busy core (a 6-token generate goes from ~10 ms to ~1.5 s).
ENV = clean_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

ACT_YAML = (
    "model:\n  class_path: activation_norms\n  init_args:\n    models: [tiny]\n"
    "    perturbation: {method: mult_gauss, param_group: mlp_only, levels: [0.1, 0.5, 1.0]}\n"
    "data:\n  class_path: lensbench.data.modules.TextDataModule\n  init_args:\n"
    "    datasets: [alpha.txt]\n    batch_size: 4\n"
    "trainer:\n  accelerator: cpu\n  devices: 1\n"
)

BAD = {
    "bad_method": (["--model.init_args.perturbation.method", "mult_gaus"],
                   "model.init_args.perturbation.method", "did you mean 'mult_gauss'"),
    "bad_group": (["--model.init_args.perturbation.param_group", "mlp_onyl"],
                  "param_group", "did you mean 'mlp_only'"),
    "bad_level": (["--model.init_args.perturbation.levels", "[0.5, -1.0]"],
                  "model.init_args.perturbation.levels[1]", "got -1.0"),
    "bad_prompts": (["--data.init_args.prompts", "[empty.txt]"], "data.init_args.prompts[0]", "holds no text"),
    "bad_top_p": (["--model.init_args.generation.top_p", "0"], "model.init_args.generation.top_p", "(0, 1]"),
    "bad_images": (["--model.init_args.generation.images", "sometimes"], "model.init_args.generation.images",
                   "use one of auto, always, never"),
    "always_text": (["--model.init_args.generation.images", "always"], "model.init_args.generation.images",
                    "'tiny' takes text only"),
    "ppl_text_and_file": (["--model.init_args.perplexity.file", "alpha.txt"], "model.init_args.perplexity.text",
                          "give one, not both"),
    "bad_plugin_level": (["--model.init_args.perturbation.method", "low_rank",
                          "--model.init_args.perturbation.levels", "[0.5, 1.0]"],
                         "model.init_args.perturbation.levels[1]", "got 1.0"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, tiny_llava):
    """Every independent run of this module, started together."""
    folder = tmp_path_factory.mktemp("perturbation_runs")
    (folder / "tiny").symlink_to(tiny_model)
    (folder / "llava").symlink_to(tiny_llava)
    write_texts(folder / "prompts.txt", 5, seed=11)
    write_texts(folder / "alpha.txt", 10, seed=1)
    (folder / "empty.txt").write_text("\n  \n", encoding="utf-8")
    (folder / "main.yaml").write_text(perturbation_yaml())
    (folder / "sampled.yaml").write_text(perturbation_yaml(
        levels="[1.0, 1.0e39]", n_rep=1, generation="{do_sample: true, temperature: 1.0, max_new_tokens: 6}",
        extra="    name_suffix: samp\n"))
    (folder / "lowrank.yaml").write_text(perturbation_yaml(method="low_rank", group="attn", levels="[0.9]", n_rep=1))
    (folder / "act.yaml").write_text(ACT_YAML)
    (folder / "vision.yaml").write_text(perturbation_yaml(
        model="llava", levels="[0.5]", n_rep=1, generation="{do_sample: false, max_new_tokens: 6, max_batch_size: 4}",
        prompts="[cookie_theft, prompts.txt]\n    max_prompts: 3"))
    (folder / "textonly.yaml").write_text(perturbation_yaml(levels="[0.5]", n_rep=1, prompts="[cookie_theft]\n    max_prompts: 2"))
    # Every run names its experiment: its results are in outputs/<name>, whatever the default layout.
    calls = {
        "main": (("predict", "--config", "main.yaml"), folder, ENV),
        "again": (("predict", "--config", "main.yaml"), folder, ENV),
        "ddp": (("predict", "--config", "main.yaml", "--trainer.devices", "2", "--trainer.strategy", "ddp"), folder, ENV),
        "s1": (("predict", "--config", "sampled.yaml"), folder, ENV),
        "s2": (("predict", "--config", "sampled.yaml"), folder, ENV),
        "lowrank": (("predict", "--config", "lowrank.yaml"), folder, ENV),
        "act": (("predict", "--config", "act.yaml"), folder, ENV),
        "vision": (("predict", "--config", "vision.yaml"), folder, ENV),
        "textonly": (("predict", "--config", "textonly.yaml"), folder, ENV),
    }
    calls = {name: ((*args, "--model.init_args.experiment", name), cwd, env) for name, (args, cwd, env) in calls.items()}
    for name, (args, _, _) in BAD.items():
        calls[name] = (("predict", "--config", "main.yaml", *args, "--model.init_args.experiment", name), folder, ENV)
    results = run_many(calls)
    return folder, results


def ok(runs, name: str) -> Path:
    folder, results = runs
    result = results[name]
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "outputs" / name


def merged(run_dir: Path, name: str = "outputs_mult_gauss_tiny.json") -> list[dict]:
    return json.loads((run_dir / name).read_text(encoding="utf-8"))


def by_key(records: list[dict]) -> dict[tuple, dict]:
    out = {(r["level_value"], r["repeat_index"], r["prompt_group"], r["prompt_id"]): r for r in records}
    assert len(out) == len(records), "duplicate (level, repeat, prompt) records"
    return out


def shard_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((run_dir / "shards").glob("*.jsonl"))
            for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


# -- direct references (transformers only, plus the unit-tested SubjectManager) ----------------------

@pytest.fixture
def one_thread():
    """In-process references on one thread (see ENV), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hf_perplexity(model, tok, text: str) -> float:
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=ids).loss.item())


def hf_greedy(model, tok, prompt: str, n: int = 6) -> tuple[str, int]:
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        seq = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    new = seq[0, ids["input_ids"].shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id) + 1]
    return tok.decode(new, skip_special_tokens=True), len(new)


def perturbed_perplexities(model_dir: Path, grid: PerturbationGrid) -> dict[tuple[float, int], float]:
    """(level, repeat) -> perplexity of the tiny model moved to that state in this process."""
    registry = active_registries().perturbations
    manager = SubjectManager({"tiny": ModelSpec(str(model_dir))}, torch.device("cpu"), registry)
    out = {}
    for state in grid.states("tiny", registry, "p"):
        loaded = manager.activate(state)
        labels = dict(state.labels)
        out[(labels["level_value"], labels["repeat_index"])] = hf_perplexity(loaded.model, loaded.tokenizer, PPL_TEXT)
    return out


# -- the main run: schema, summary, perplexity, figures -------------------------------------------

def test_merged_file_holds_one_complete_record_per_level_repeat_and_prompt(runs):
    run_dir = ok(runs, "main")
    folder = runs[0]
    prompts = read_texts(folder / "prompts.txt")
    records = merged(run_dir)
    assert len(records) == 3 * 2 * len(prompts)  # (baseline, 0.5, 3.0) x 2 repeats x 5 prompts
    keys = by_key(records)
    # prompt ids are 1-based, as in the seed's records
    assert set(keys) == {(lv, r, "prompts", p) for lv in (0.0, 0.5, 3.0) for r in (0, 1) for p in range(1, len(prompts) + 1)}
    for rec in records:
        assert set(rec) == SCHEMA, sorted(set(rec) ^ SCHEMA)  # every field documented, no bookkeeping
        assert TIMESTAMP.fullmatch(rec["timestamp"]), rec["timestamp"]
        stamp = dt.datetime.fromisoformat(rec["timestamp"])
        assert stamp.utcoffset() == dt.timedelta(0)
        assert abs(dt.datetime.now(dt.timezone.utc) - stamp) < dt.timedelta(hours=2)
        assert rec["model_name"] == "tiny" and rec["model_label"] == "tiny"
        assert rec["degradation_method"] == "mult_gauss" and rec["param_group_name"] == "mlp_only"
        assert rec["std_dev"] == rec["level_value"]  # every method: the level, under the seed's name
        assert rec["seed"] == 42 + rec["repeat_index"]
        assert rec["prompt_text"] == prompts[rec["prompt_id"] - 1] and rec["category"] == "prompts"
        assert isinstance(rec["output"], str) and 1 <= rec["tokens"] <= 6 and rec["duration"] > 0
        assert rec["temperature"] == 1.0 and rec["do_sample"] is False and rec["max_new_tokens"] == 6
        assert rec["batch_size_effective"] == (3 if rec["prompt_id"] <= 3 else 2)  # 5 prompts in steps of 3
        # each generate call is seeded with its first prompt's seed: prompts 1-3, then 4-5
        assert rec["sampling_seed"] == prompt_seed(rec["seed"], "prompts", 1 if rec["prompt_id"] <= 3 else 4)
        assert rec["weights_finite"] is True and rec["dtype"] == "float32" and rec["device"] == "cpu"
        assert rec["is_baseline"] == (rec["level_value"] == 0)
        if rec["is_baseline"]:
            assert rec["touched_tensors"] == [] and rec["n_touched_tensors"] == 0
        else:
            assert rec["touched_tensors"] == MLP and rec["n_touched_tensors"] == 6
    # Sorted by level, repeat, prompt.
    assert [by for by in keys] == sorted(keys)


def test_baseline_outputs_and_perplexity_match_transformers_directly(runs, tiny_model, one_thread):
    records = merged(ok(runs, "main"))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    reference = hf_perplexity(model, tok, PPL_TEXT)
    for rec in records:
        if rec["is_baseline"]:
            assert rec["perplexity"] == pytest.approx(reference, rel=1e-6)  # equal across repeats too
            assert (rec["output"], rec["tokens"]) == hf_greedy(model, tok, rec["prompt_text"]), rec["prompt_id"]


def test_perplexity_is_that_of_the_seeded_perturbed_state_and_grows_with_damage(runs, tiny_model, one_thread):
    records = merged(ok(runs, "main"))
    expected = perturbed_perplexities(tiny_model, PerturbationGrid("mult_gauss", "mlp_only", [0.5, 3.0], n_rep=2))
    per_state: dict[tuple, set] = {}
    for rec in records:
        per_state.setdefault((rec["level_value"], rec["repeat_index"]), set()).add(rec["perplexity"])
    assert all(len(v) == 1 for v in per_state.values())  # one perplexity per state
    ppl = {k: v.pop() for k, v in per_state.items()}
    for key, value in ppl.items():
        assert value == pytest.approx(expected[key], rel=1e-6), key
    assert ppl[(0.0, 0)] == ppl[(0.0, 1)]
    assert ppl[(0.5, 0)] != ppl[(0.5, 1)]  # the repeats really use different seeds
    # Each record holds the torchmetrics state its perplexity is computed from.
    n_predicted = len(AutoTokenizer.from_pretrained(tiny_model)(PPL_TEXT)["input_ids"]) - 1
    for rec in records:
        state = rec["perplexity_state"]
        assert set(state) == {"total", "count"} and state["count"] == n_predicted
        assert rec["perplexity"] == pytest.approx(math.exp(state["total"] / state["count"]), rel=1e-12)
    assert ppl[(3.0, 0)] > ppl[(0.0, 0)] and ppl[(3.0, 1)] > ppl[(0.0, 0)]


def test_summary_has_one_row_per_level_and_the_figures_exist(runs):
    run_dir = ok(runs, "main")
    records = pd.DataFrame(merged(run_dir))
    summary = pd.read_csv(run_dir / "summary.csv")
    assert summary["level_value"].tolist() == [0.0, 0.5, 3.0]
    assert summary["is_baseline"].tolist() == [True, False, False]
    assert (summary["n_outputs"] == 5 * 2).all() and (summary["n_repeats"] == 2).all()
    assert (summary["degradation_method"] == "mult_gauss").all() and (summary["param_group_name"] == "mlp_only").all()
    assert (summary["n_nonfinite_states"] == 0).all()
    for _, row in summary.iterrows():
        g = records[records["level_value"] == row["level_value"]]
        per_rep = g.groupby("repeat_index")["perplexity"].first()
        assert row["perplexity_mean"] == pytest.approx(per_rep.mean(), rel=1e-8)
        assert row["perplexity_std"] == pytest.approx(per_rep.std(ddof=0), abs=1e-8)
        # pooled over repetitions: the summed NLL over the summed token counts of the states
        states = g.groupby("repeat_index")["perplexity_state"].first()
        total, count = sum(s["total"] for s in states), sum(s["count"] for s in states)
        assert row["perplexity_pooled"] == pytest.approx(math.exp(total / count), rel=1e-9)
        # the same text every repetition: the geometric mean of the repetitions' perplexities
        assert row["perplexity_pooled"] == pytest.approx(math.exp(per_rep.map(math.log).mean()), rel=1e-9)
        assert row["mean_tokens"] == pytest.approx(g["tokens"].mean(), rel=1e-9)
    assert summary.loc[0, "perplexity_std"] == 0 and summary.loc[0, "perplexity_pooled"] == summary.loc[0, "perplexity_mean"]
    assert summary.loc[1, "perplexity_pooled"] < summary.loc[1, "perplexity_mean"]  # geometric < arithmetic mean
    assert summary.loc[2, "perplexity_mean"] > summary.loc[0, "perplexity_mean"]
    for name in ("perplexity_vs_level.png", "output_length_vs_level.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (run_dir / name).stat().st_size > 1000


def test_the_docs_describe_every_record_field_and_summary_column(runs):
    doc = (Path(__file__).resolve().parents[1] / "docs" / "perturbation.md").read_text(encoding="utf-8")
    table = doc[doc.index("| field | meaning |"):doc.index("`summary.csv`, one row")]
    rows = [line.split("|")[1] for line in table.splitlines()[2:] if line.startswith("|")]
    assert set(re.findall(r"`(\w+)`", "\n".join(rows))) == SCHEMA
    paragraph = doc[doc.index("`summary.csv`, one row"):doc.index("Figures: `perplexity_vs_level.png`")]
    columns = pd.read_csv(ok(runs, "main") / "summary.csv").columns
    assert set(columns) <= set(re.findall(r"`(\w+)`", paragraph)), sorted(columns)


# -- reproducibility ----------------------------------------------------------------------------------

VOLATILE = ("timestamp", "duration")


def stable(records: list[dict]) -> str:
    """The records without their timing, as text (so that NaN equals NaN)."""
    return json.dumps([{k: v for k, v in r.items() if k not in VOLATILE} for r in records], allow_nan=True)


def test_the_same_greedy_config_twice_gives_identical_records(runs):
    first, second = merged(ok(runs, "main")), merged(ok(runs, "again"))
    assert stable(first) == stable(second)
    assert len({r["output"] for r in first}) > 3  # not trivially constant outputs


def test_sampling_with_a_fixed_seed_is_reproducible_and_really_samples(runs):
    name = "outputs_mult_gauss_tiny_samp.json"  # name_suffix ends the file name
    s1, s2 = merged(ok(runs, "s1"), name), merged(ok(runs, "s2"), name)
    assert not (runs[0] / "outputs" / "s1" / "outputs_mult_gauss_tiny.json").exists()
    assert len(s1) == 3 * 5 and all(r["do_sample"] is True and r["name_suffix"] == "samp" for r in s1)
    assert stable(s1) == stable(s2)
    greedy = {r["prompt_id"]: r["output"] for r in merged(ok(runs, "main")) if r["level_value"] == 0 and r["repeat_index"] == 0}
    sampled = {r["prompt_id"]: r["output"] for r in s1 if r["level_value"] == 0}
    assert sampled != greedy


def test_the_recorded_sampling_seed_reproduces_the_sampled_outputs(runs, tiny_model, one_thread):
    records = [r for r in merged(ok(runs, "s1"), "outputs_mult_gauss_tiny_samp.json") if r["level_value"] == 0]
    assert len(records) == 5 and all(r["batch_size_effective"] == 5 for r in records)  # one generate call
    assert {r["sampling_seed"] for r in records} == {prompt_seed(42, "prompts", 1)}  # its first prompt's
    assert all(r["sampling_seed"] != r["seed"] for r in records)  # not seed + repeat_index itself
    tok = AutoTokenizer.from_pretrained(tiny_model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    settings = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=1.0, max_batch_size=8)
    again = generate(model, tok, [r["prompt_text"] for r in records], settings, records[0]["sampling_seed"],
                     torch.device("cpu"))
    assert [g.output for g in again] == [r["output"] for r in records]


def test_a_state_with_non_finite_weights_is_recorded_without_generating(runs):
    run_dir = ok(runs, "s1")
    records = merged(run_dir, "outputs_mult_gauss_tiny_samp.json")
    broken = [r for r in records if r["level_value"] == 1e39]
    assert len(broken) == 5
    for rec in broken:  # 1e39 is a finite level, but overflows float32 weights
        assert rec["weights_finite"] is False and rec["output"] is None and rec["tokens"] == 0
        assert math.isnan(rec["perplexity"]) and rec["touched_tensors"] == MLP
    assert all(r["weights_finite"] is True and isinstance(r["output"], str) for r in records if r["level_value"] < 1e39)
    summary = pd.read_csv(run_dir / "summary.csv").set_index("level_value")
    assert summary["n_nonfinite_states"].to_dict() == {0.0: 0, 1.0: 0, 1e39: 1}
    assert math.isnan(summary.loc[1e39, "perplexity_mean"]) and summary.loc[1e39, "mean_tokens"] == 0
    assert math.isnan(summary.loc[1e39, "perplexity_pooled"]) and math.isfinite(summary.loc[1.0, "perplexity_pooled"])
    assert all(r["perplexity_state"] is None and r["sampling_seed"] is None for r in broken)  # nothing run
    assert (run_dir / "perplexity_vs_level.png").exists()


# -- DDP ---------------------------------------------------------------------------------------------

def test_two_ddp_processes_give_the_records_of_one(runs):
    ddp_dir = ok(runs, "ddp")
    shards = sorted((ddp_dir / "shards").glob("*.jsonl"))
    assert [p.name for p in shards] == ["rank00000.jsonl", "rank00001.jsonl"]
    assert all(p.read_text().count("\n") > 0 for p in shards)  # both ranks worked
    one, two = by_key(merged(ok(runs, "main"))), by_key(merged(ddp_dir))
    assert one.keys() == two.keys()
    for key, a in one.items():
        b = two[key]
        assert (b["output"], b["tokens"], b["touched_tensors"], b["weights_finite"]) == \
            (a["output"], a["tokens"], a["touched_tensors"], a["weights_finite"]), key
        assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-6), key
    assert pd.read_csv(ddp_dir / "summary.csv")["n_outputs"].tolist() == [10, 10, 10]


# -- the example plugin's low_rank ------------------------------------------------------------------

def test_low_rank_from_the_example_plugin_by_name(runs, tiny_model, one_thread):
    run_dir = ok(runs, "lowrank")
    records = merged(run_dir, "outputs_low_rank_tiny.json")
    assert len(records) == 2 * 5
    assert {r["degradation_method"] for r in records} == {"low_rank"}
    assert all(r["std_dev"] == r["level_value"] for r in records)  # the level for every method (the seed's key)
    ppl = {r["level_value"]: r["perplexity"] for r in records}
    assert set(ppl) == {0.0, 0.9}
    assert ppl[0.9] != ppl[0.0]
    assert all(r["touched_tensors"] == (ATTN if r["level_value"] else []) for r in records)
    expected = perturbed_perplexities(tiny_model, PerturbationGrid("low_rank", "attn", [0.9]))
    assert ppl[0.9] == pytest.approx(expected[(0.9, 0)], rel=1e-6)


# -- activation_norms over perturbed states ----------------------------------------------------------

def test_activation_norms_over_perturbed_states_from_a_config(runs, tiny_model, one_thread):
    run_dir = ok(runs, "act")
    table = pd.read_csv(run_dir / "activation_norms.csv")
    for column in ("level_value", "degradation_method", "param_group_name", "repeat_index"):
        assert column in table.columns
    assert (table["degradation_method"] == "mult_gauss").all() and (table["param_group_name"] == "mlp_only").all()
    assert sorted(table["level_value"].unique()) == [0.0, 0.1, 0.5, 1.0]
    assert len(table) == 4 * 3
    assert all(sorted(g["layer"]) == [0, 1, 2] for _, g in table.groupby("level_value"))
    stats = ["mean_norm", "std_norm", "min_norm", "max_norm"]
    layer = {lv: g.set_index("layer") for lv, g in table.groupby("level_value")}
    for level in (0.1, 0.5, 1.0):
        # The embedding output does not see the MLPs; every block output does.
        assert layer[level].loc[0, stats].tolist() == layer[0.0].loc[0, stats].tolist()
        for depth in (1, 2):
            assert layer[level].loc[depth, "mean_norm"] != layer[0.0].loc[depth, "mean_norm"], (level, depth)
    # Layer 2 at level 0.5 equals a direct computation on the model in that state.
    registry = active_registries().perturbations
    states = PerturbationGrid("mult_gauss", "mlp_only", [0.1, 0.5, 1.0]).states("tiny", registry, "p")
    manager = SubjectManager({"tiny": ModelSpec(str(tiny_model))}, torch.device("cpu"), registry)
    loaded = manager.activate(next(s for s in states if dict(s.labels)["level_value"] == 0.5))
    norms = []
    for text in read_texts(runs[0] / "alpha.txt"):
        ids = loaded.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = loaded.model(**ids, output_hidden_states=True).hidden_states[2][0]
        norms.append(hidden.double().norm(dim=-1))
    assert layer[0.5].loc[2, "mean_norm"] == pytest.approx(torch.cat(norms).mean().item(), rel=1e-5)
    assert (run_dir / "activation_norms.png").stat().st_size > 1000


# -- pictures for a vision-language model ---------------------------------------------------------

LLAVA_MLP = [f"model.language_model.layers.{i}.mlp.{p}_proj.weight" for i in (0, 1) for p in ("gate", "up", "down")]


def test_picture_prompts_show_the_picture_to_a_vision_language_model(runs, tiny_llava, one_thread):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lensbench.data.images import load_image
    from lensbench.data.modules import PromptDataModule

    records = merged(ok(runs, "vision"), "outputs_mult_gauss_llava.json")
    assert len(records) == 2 * 6  # (baseline, 0.5) x (3 picture prompts + 3 text prompts)
    for rec in records:
        assert SCHEMA <= rec.keys()
        picture = rec["prompt_group"] == "cookie_theft"
        assert rec["image"] == ("kitchen_scene.png" if picture else None) and rec["image_used"] is picture
        # The 3 picture prompts share one generate call; a step of 4 leaves 1 text prompt, then 2.
        assert rec["batch_size_effective"] == (3 if picture else (1 if rec["prompt_id"] == 1 else 2))
        assert rec["touched_tensors"] == ([] if rec["is_baseline"] else LLAVA_MLP)
        assert math.isfinite(rec["perplexity"])
    proc = AutoProcessor.from_pretrained(tiny_llava)
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava).eval()
    kitchen = load_image(str(PromptDataModule(["cookie_theft"]).prompts[0].image))
    for rec in records:  # the baseline's picture prompts, one at a time straight through transformers
        if rec["is_baseline"] and rec["image_used"]:
            chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rec["prompt_text"]}]}]
            text = proc.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            batch = proc(text=[text], images=[[kitchen]], return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                seq = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
            new = seq[0, batch["input_ids"].shape[1]:].tolist()
            new = new[: new.index(2) + 1] if 2 in new else new
            assert (rec["output"], rec["tokens"]) == (proc.tokenizer.decode(new, skip_special_tokens=True), len(new))


def test_a_text_only_model_gets_picture_prompts_as_text_and_says_so(runs):
    records = merged(ok(runs, "textonly"))
    assert len(records) == 2 * 2 and all(r["image"] == "kitchen_scene.png" and r["image_used"] is False for r in records)
    assert all(isinstance(r["output"], str) for r in records)
    assert "takes text only" in runs[1]["textonly"].stderr


# -- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_line_naming_the_field(runs, name):
    result = runs[1][name]
    _, field, words = BAD[name]
    assert result.returncode == 1, result.stderr[-3000:]
    line = last_line(result.stderr)
    assert line.startswith("lensbench: error:"), line
    assert field in line and words in line, line
    assert "Traceback" not in result.stderr + result.stdout


def test_an_unknown_param_group_is_refused_before_any_work(runs):
    folder, results = runs
    line = last_line(results["bad_group"].stderr)
    assert "lensbench: error: model.init_args.perturbation.param_group:" in line, line
    assert not list((folder / "outputs" / "bad_group").glob("shards/*.jsonl")) or \
        shard_records(folder / "outputs" / "bad_group") == []


# -- resume after SIGKILL, force_run ------------------------------------------------------------------

def test_sigkill_then_resume_equals_an_uninterrupted_run_and_force_run_recomputes(tmp_path, tiny_model):
    (tmp_path / "tiny").symlink_to(tiny_model)
    write_texts(tmp_path / "prompts.txt", 100, seed=4)
    (tmp_path / "resume.yaml").write_text(perturbation_yaml(
        group="attn_only", levels="[0.2, 0.4, 0.6, 0.8]", n_rep=1,
        generation="{do_sample: false, max_new_tokens: 6, max_batch_size: 4}"))
    total = 5 * 100
    args = ["predict", "--config", "resume.yaml"]
    killed_dir, full_dir = tmp_path / "outputs" / "killed", tmp_path / "outputs" / "full"

    shard = killed_dir / "shards" / "rank00000.jsonl"
    with ThreadPoolExecutor(1) as pool:  # the uninterrupted reference runs meanwhile
        future = pool.submit(lensbench, *args, "--model.init_args.experiment", "full", cwd=tmp_path, env=ENV)
        stored = sigkill_when_stored([*args, "--model.init_args.experiment", "killed"], tmp_path, shard, 12, ENV)
        full = future.result()
    assert full.returncode == 0, full.stderr[-3000:]
    assert 12 <= stored < total, "the kill must land mid-run"
    assert not list(killed_dir.glob("outputs_*.json")) and not (killed_dir / "summary.csv").exists()
    reference = by_key(merged(full_dir))
    old_full_shard = (full_dir / "shards" / "rank00000.jsonl").read_bytes()

    results = run_many({
        "resume": ((*args, "--model.init_args.experiment", "killed"), tmp_path, ENV),
        "force": ((*args, "--model.init_args.experiment", "full", "--model.init_args.force_run", "true"), tmp_path, ENV),
    })
    resumed, forced = results["resume"], results["force"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{stored} already stored" in resumed.stderr + resumed.stdout
    keys = [r["key"] for r in shard_records(killed_dir)]
    assert len(keys) == len(set(keys)) == total  # nothing duplicated, nothing missing
    for name, run_dir in (("resumed", killed_dir), ("forced", full_dir)):
        got = by_key(merged(run_dir))
        assert got.keys() == reference.keys(), name
        for key, ref in reference.items():
            rec = got[key]
            assert (rec["output"], rec["tokens"], rec["touched_tensors"]) == \
                (ref["output"], ref["tokens"], ref["touched_tensors"]), (name, key)
            assert rec["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-9), (name, key)
    assert pd.read_csv(killed_dir / "summary.csv")["n_outputs"].tolist() == [100] * 5

    assert forced.returncode == 0, forced.stderr[-3000:]
    assert f"{total} work items, 0 already stored" in forced.stderr + forced.stdout
    kept = list((full_dir / "superseded").glob("*/rank00000.jsonl"))
    assert len(kept) == 1 and kept[0].read_bytes() == old_full_shard  # moved aside, not deleted
    assert len(shard_records(full_dir)) == total  # recomputed from scratch into fresh shards
