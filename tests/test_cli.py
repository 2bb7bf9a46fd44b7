"""The ``lensbench`` console script: config parsing, help, one-line errors, plugins, the example plugin, plot.

Every call goes through the real console script in a subprocess. Independent calls run concurrently
(``helpers_cli.run_many``): each spends ~5 s importing, so running them one by one would be slow.
"""

from __future__ import annotations

import json
import math
import shutil
from importlib import resources
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import ROOT, clean_env, lensbench
from helpers_cli import last_line, make_workdir, run_many, snapshot
from transformers import AutoModelForCausalLM, AutoTokenizer

from lensbench.run_folders import LOCK_FILE, try_lock
from lensbench.models.fingerprint import model_fingerprint
from lensbench.models.loading import ModelSpec

CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("**/*.yaml"))
EXAMPLE = "lensbench-example==0.1.0"
BUILTIN = "lensbench (built-in)"
HAS_GPU = torch.cuda.is_available()

BAD_YAML = "model:\n  class_path: activation_norms\n  init_args:\n    models: [tiny\ndata: {\n"

# id -> (extra arguments after `predict --config run.yaml`, or a full argument list; pieces the
# last stderr line must contain, in order: the field first)
BAD_INPUTS = {
    "malformed_yaml": (["predict", "--config", "bad.yaml"], ["config: malformed YAML", "line 5"]),
    "unknown_analysis": (["predict", "--config", "badname.yaml"],
                         ["model.class_path", "'activation_norm'", "did you mean 'activation_norms'"]),
    "missing_model": (["--model.init_args.models", "[./no/such/model]"],
                      ["model.init_args.models[0]", "./no/such/model", "does not exist"]),
    "empty_dataset": (["--data.init_args.datasets", "[empty.txt]"],
                      ["data.init_args.datasets[0]", "empty.txt", "no text"]),
    "not_utf8": (["--data.init_args.datasets", "[latin.txt]"],
                 ["data.init_args.datasets[0]", "latin.txt", "not UTF-8", "byte 3"]),
    "jsonl_without_field": (["--data.init_args.datasets", "[nofield.jsonl]"],
                            ["data.init_args.datasets[0]", "nofield.jsonl:1", "'text'", "text_field"]),
    "unknown_statistic": (["--model.init_args.statistics", "[nrom]"],
                          ["model.init_args.statistics[0]", "'nrom'", "did you mean 'norm'"]),
    "batch_size_zero": (["--data.init_args.batch_size", "0"], ["data.init_args.batch_size", "at least 1"]),
    "unknown_data_option": (["--data.init_args.batch_sise", "3"], ["data.init_args", "batch_sise", "not accepted"]),
    "accelerator_gpu": (["--trainer.accelerator", "gpu"], ["trainer", "gpu"]),
}


def _bad_args(extra: list[str]) -> tuple[str, ...]:
    return tuple(extra) if extra[0] == "predict" else ("predict", "--config", "run.yaml", *extra)


@pytest.fixture(scope="module")
def batch(tmp_path_factory, tiny_model):
    """Every call that needs no finished run, run concurrently once for the module."""
    bad = make_workdir(tmp_path_factory.mktemp("bad"), tiny_model)
    (bad / "bad.yaml").write_text(BAD_YAML)
    (bad / "badname.yaml").write_text((bad / "run.yaml").read_text().replace(
        "class_path: activation_norms", "class_path: activation_norm"))
    (bad / "empty.txt").write_text("\n  \n")
    (bad / "latin.txt").write_bytes(b"caf\xe9\n")
    (bad / "nofield.jsonl").write_text('{"body": "the sun"}\n')
    (bad / "no_config").mkdir()
    (bad / "no_config" / "activation_norms.csv").write_text("model,dataset,layer\n")
    cache = tmp_path_factory.mktemp("cache")
    parse_env = clean_env(LENSBENCH_CACHE=str(cache / "lensbench"), HF_HOME=str(cache / "hf"))

    calls = {f"bad:{cid}": (_bad_args(extra), bad, None)
             for cid, (extra, _) in BAD_INPUTS.items() if not (cid == "accelerator_gpu" and HAS_GPU)}
    calls.update({f"config:{c}": ((subcommand(c), "--config", str(ROOT / c),
                                   "--print_steps" if subcommand(c) == "pipeline" else "--print_config"), bad, parse_env)
                  for c in CONFIGS})
    calls["help"] = (("--help",), bad, None)
    calls["predict_help"] = (("predict", "--help"), bad, None)
    calls["plugins"] = (("plugins",), bad, None)
    calls["plot_no_config"] = (("plot", "no_config"), bad, None)
    results = run_many(calls)
    return {"dir": bad, "cache": cache, "results": results}


# -- configs and help -----------------------------------------------------------------------------------

def test_there_are_configs():
    assert CONFIGS, "no YAML under configs/"


def subcommand(config: str) -> str:
    """Training configs (``configs/memory/train_*``) run under ``lensbench fit``, the model-diff
    pipeline under ``lensbench pipeline``, the rest under predict."""
    if Path(config).name == "pipeline.yaml":
        return "pipeline"
    return "fit" if Path(config).parent.name == "memory" and Path(config).name.startswith("train_") else "predict"


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_parses(batch, config):
    from lensbench.plugins import build_registries, get_plugin_manager

    result = batch["results"][f"config:{config}"]
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    printed = yaml.safe_load(result.stdout)
    source = yaml.safe_load((ROOT / config).read_text())
    registries = build_registries(get_plugin_manager())
    if subcommand(config) == "pipeline":  # two ordinary run configs, the models named once
        assert list(printed) == ["param_diff", "activation_norms"]
        assert printed["param_diff"]["data"]["init_args"]["base"] == source["base"]
        assert printed["activation_norms"]["model"]["init_args"]["models"][0] == source["base"]
        return
    for section in ("model", "data"):
        if section not in source:
            continue
        if subcommand(config) == "fit":  # the training module and DataModule take their arguments directly
            assert set(source[section]) <= set(printed[section]), set(source[section]) - set(printed[section])
            continue
        entry = source[section] if isinstance(source[section], dict) else {"class_path": source[section]}
        wanted = entry["class_path"]
        if section == "model" and wanted in registries.analyses:
            cls = registries.analyses.get(wanted)
            wanted = f"{cls.__module__}.{cls.__qualname__}"
        assert printed[section]["class_path"] == wanted
        assert wanted in result.stdout
        assert set(entry.get("init_args") or {}) <= set(printed[section]["init_args"])
    # Parsing loads no weights: the embedded smollm2 is never converted into the (fresh) cache.
    assert not any((batch["cache"] / "lensbench").rglob("*.safetensors"))
    assert not (batch["cache"] / "lensbench" / "models").exists()


def test_help(batch):
    top = batch["results"]["help"]
    assert top.returncode == 0, top.stderr
    for word in ("predict", "fit", "pipeline", "plugins", "plot"):
        assert word in top.stdout
    predict = batch["results"]["predict_help"]
    assert predict.returncode == 0, predict.stderr
    for option in ("--config", "--print_config", "--trainer.accelerator", "--trainer.devices", "--model", "--data"):
        assert option in predict.stdout, option


# -- one-line errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_field(batch, case):
    if case == "accelerator_gpu" and HAS_GPU:
        pytest.skip("this machine has a GPU")
    result = batch["results"][f"bad:{case}"]
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    line = last_line(result.stderr)
    assert line.startswith("lensbench: error: "), result.stderr
    pieces = BAD_INPUTS[case][1]
    assert line.startswith(f"lensbench: error: {pieces[0]}"), line
    position = 0
    for piece in pieces:
        found = line.find(piece, position)
        assert found >= 0, f"{piece!r} missing from (or out of order in) {line!r}"
        position = found + len(piece)


def test_failed_runs_write_no_run_folder(batch):
    assert not (batch["dir"] / "outputs").exists()


def test_plot_without_config_is_a_one_line_error(batch):
    result = batch["results"]["plot_no_config"]
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lensbench: error: ") and "no_config" in lines[0] and "config.yaml" in lines[0]


# -- plugins ----------------------------------------------------------------------------------------------

def test_plugins_lists_builtins_and_the_example_plugin(batch):
    result = batch["results"]["plugins"]
    assert result.returncode == 0, result.stderr
    rows: dict[str, tuple[str, str]] = {}
    kind = None
    for line in result.stdout.splitlines():
        if line and not line.startswith(" "):
            kind = line.rstrip(":")
        elif line.strip() and line.strip() != "(none)":
            name, plugin = line.split()[:2]
            if plugin == "lensbench":  # "lensbench (built-in)"
                plugin = BUILTIN
            rows[name] = (kind, plugin)
    assert rows["activation_norms"] == ("analyses", BUILTIN)
    assert rows["norm"] == ("metrics", BUILTIN)
    assert rows["max_abs"] == ("metrics", EXAMPLE)
    assert rows["forget"] == ("datasets", BUILTIN)
    assert rows["retain"] == ("datasets", BUILTIN)
    assert rows["capitals"] == ("datasets", EXAMPLE)
    assert rows["mult_gauss"] == ("perturbations", BUILTIN)
    assert rows["low_rank"] == ("perturbations", EXAMPLE)
    assert rows["perturbation"] == ("analyses", BUILTIN) and rows["param_diff"] == ("analyses", BUILTIN)


# -- the example plugin end to end, then plot -----------------------------------------------------------

EXAMPLE_YAML = (
    "model:\n  class_path: activation_norms\n  init_args:\n    models: [tiny]\n    statistics: [norm, max_abs]\n"
    "data:\n  class_path: lensbench.data.modules.TextDataModule\n  init_args:\n"
    "    datasets: [capitals, alpha.txt]\n    batch_size: 4\n"
    "trainer:\n  accelerator: cpu\n  devices: 1\n"
)
HIDDEN = 32  # tests/tiny.py


@pytest.fixture(scope="module")
def example_run(tmp_path_factory, tiny_model):
    folder = make_workdir(tmp_path_factory.mktemp("example"), tiny_model)
    (folder / "example.yaml").write_text(EXAMPLE_YAML)
    (folder / "empty.txt").write_text("")
    result = lensbench("predict", "--config", "example.yaml", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder


def _capitals() -> list[str]:
    text = (resources.files("lensbench_example") / "capitals.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["sentence"] for line in text.splitlines() if line.strip()]


def _reference_max_abs(model_dir: Path, texts: list[str]) -> tuple[int, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    values = []
    for text in texts:  # one text at a time: no padding
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**ids, output_hidden_states=True).hidden_states
        values.append(torch.stack([h[0].double().abs().amax(dim=-1) for h in hidden]))  # [L+1, T]
    allvalues = torch.cat(values, dim=1)
    return allvalues.shape[1], allvalues.mean(dim=1)


def test_example_plugin_statistic_and_dataset_end_to_end(example_run):
    run_dir = example_run / "outputs" / "activation_norms" / "example"
    table = pd.read_csv(run_dir / "activation_norms.csv")
    stats = [f"{agg}_{s}" for s in ("norm", "max_abs") for agg in ("mean", "std", "min", "max", "n_nonfinite")]
    assert list(table.columns) == ["model", "dataset", "layer", "n_tokens", "n_tokens_dropped", *stats]
    assert sorted(table["dataset"].unique()) == ["alpha", "capitals"]
    assert len(table) == 2 * 3  # two datasets x (embedding + 2 blocks)

    eps = 1e-6
    # Per token: ||h||_2 / sqrt(D) <= max_i |h_i| <= ||h||_2; so for means, minima and maxima too.
    assert (table["mean_max_abs"] <= table["mean_norm"] * (1 + eps)).all()
    assert (table["max_max_abs"] <= table["max_norm"] * (1 + eps)).all()
    assert (table["mean_max_abs"] >= table["mean_norm"] / math.sqrt(HIDDEN) * (1 - eps)).all()
    assert (table["min_max_abs"] >= table["min_norm"] / math.sqrt(HIDDEN) * (1 - eps)).all()
    assert (table["min_max_abs"] <= table["mean_max_abs"]).all() and (table["mean_max_abs"] <= table["max_max_abs"]).all()
    assert (table["std_max_abs"] >= 0).all()

    n, mean = _reference_max_abs(example_run / "tiny", _capitals())
    rows = table[table["dataset"] == "capitals"].sort_values("layer")
    assert (rows["n_tokens"] == n).all()
    assert torch.allclose(torch.tensor(rows["mean_max_abs"].values), mean, rtol=1e-5, atol=0)

    assert (run_dir / "activation_norms.png").stat().st_size > 1000
    assert (run_dir / "activation_norms_max_abs.png").stat().st_size > 1000
    assert "max_abs" in (run_dir / "config.yaml").read_text()


@pytest.fixture(scope="module")
def after_run(example_run):
    """Failing runs into the finished run's folder, and plot on a copy of it, run concurrently."""
    run_dir = example_run / "outputs" / "activation_norms" / "example"
    before = snapshot(run_dir)
    copy = example_run / "outputs" / "copy"
    shutil.copytree(run_dir, copy)
    for png in copy.glob("*.png"):
        png.unlink()
    csv_before = (copy / "activation_norms.csv").read_bytes()
    # The run as if the model's weights had been rewritten since it started.
    reweighted = example_run / "outputs" / "reweighted"
    shutil.copytree(run_dir, reweighted)
    identity = json.loads((reweighted / "run.json").read_text())
    identity["model_fingerprint.tiny"] = "0" * 16
    (reweighted / "run.json").write_text(json.dumps(identity, indent=1, sort_keys=True))
    # The run as if another lensbench process were writing it now: this process holds its lock.
    locked = example_run / "outputs" / "locked"
    shutil.copytree(run_dir, locked)
    held = try_lock(locked / LOCK_FILE)
    assert held is not None
    folders = {"reweighted": reweighted, "locked": locked}
    snapshots = {name: snapshot(folder) for name, folder in folders.items()}
    try:
        results = run_many({
            "changed": (("predict", "--config", "example.yaml", "--model.init_args.statistics", "[norm]"), example_run, None),
            "bad_data": (("predict", "--config", "example.yaml", "--data.init_args.datasets", "[empty.txt]"), example_run, None),
            "plot": (("plot", "outputs/copy"), example_run, None),
            **{name: (("predict", "--config", "example.yaml", "--model.init_args.experiment", name), example_run, None)
               for name in folders},
        })
    finally:
        held.close()
    unchanged = {name: snapshot(folder) == snapshots[name] for name, folder in folders.items()}
    return {"before": before, "after": snapshot(run_dir), "copy": copy, "csv_before": csv_before,
            "unchanged": unchanged, **results}


def test_failed_runs_leave_a_finished_run_byte_identical(after_run):
    for name, expected in (("changed", "different configuration"), ("bad_data", "empty.txt"),
                           ("reweighted", "the weights of tiny changed since it started"),
                           ("locked", "another lensbench run is writing")):
        result = after_run[name]
        assert result.returncode == 1, result.stderr
        assert last_line(result.stderr).startswith("lensbench: error: ") and expected in last_line(result.stderr)
    assert {"config.yaml", "run.json", "activation_norms.csv", "activation_norms.png"} <= set(after_run["before"])
    assert after_run["after"] == after_run["before"]
    assert after_run["unchanged"] == {"reweighted": True, "locked": True}


def test_the_run_identity_holds_the_weights_fingerprint(example_run):
    identity = json.loads((example_run / "outputs" / "activation_norms" / "example" / "run.json").read_text())
    assert identity["model_fingerprint.tiny"] == model_fingerprint(ModelSpec(str(example_run / "tiny")))
    assert "model.init_args.statistics" in identity  # changes what a record means
    assert "data.init_args.datasets" not in identity  # extendable: more datasets extend the run
    shard = example_run / "outputs" / "activation_norms" / "example" / "shards" / "rank00000.jsonl"
    records = [json.loads(line) for line in shard.read_text().splitlines()]
    assert records and all(len(r["digest"]) == 16 for r in records)  # the batch's texts, per record
    assert len({r["digest"] for r in records}) == len(records)


def test_plot_redraws_the_figures(after_run):
    result = after_run["plot"]
    assert result.returncode == 0, result.stderr
    copy = after_run["copy"]
    for name in ("activation_norms.png", "activation_norms_max_abs.png"):
        assert (copy / name).stat().st_size > 1000
        assert name in result.stdout
    assert (copy / "activation_norms.csv").read_bytes() == after_run["csv_before"]


def test_a_registered_short_name_works_on_the_command_line(workdir):
    result = lensbench("predict", "--config", "run.yaml", "--model", "activation_norms", "--print_config", cwd=workdir)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["class_path"] == "lensbench.analyses.activation_norms.ActivationNorms"
    assert printed["model"]["init_args"]["models"] == ["tiny"]  # the config's arguments are kept


def test_a_value_starting_with_a_star_is_a_string_not_a_yaml_alias(workdir):
    (workdir / "glob.yaml").write_text(
        "model:\n  class_path: perturbation\n  init_args:\n    model: tiny\n"
        "    perturbation: {param_group: \"*.mlp.*\"}\ntrainer:\n  devices: 1\n")
    result = lensbench("predict", "--config", "glob.yaml", "--print_config", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["model"]["init_args"]["perturbation"]["param_group"] == "*.mlp.*"
