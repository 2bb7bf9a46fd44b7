"""End-to-end runs of the real console script: results, DDP, multi-node, resume."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path

import pandas as pd
import torch
from conftest import clean_env, lensbench
from helpers_cli import sigkill_when_stored
from transformers import AutoModelForCausalLM, AutoTokenizer

from lensbench.data.sources import read_texts


def _table(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "activation_norms.csv").sort_values(["model", "dataset", "layer"]).reset_index(drop=True)


def _assert_close(a: pd.DataFrame, b: pd.DataFrame, rel: float = 1e-5) -> None:
    assert list(a.columns) == list(b.columns)
    assert a[["model", "dataset", "layer", "n_tokens"]].equals(b[["model", "dataset", "layer", "n_tokens"]])
    for col in [c for c in a.columns if c.startswith(("mean_", "std_", "min_", "max_"))]:
        assert ((a[col] - b[col]).abs() <= rel * b[col].abs() + 1e-12).all(), col


def _reference(model_dir: Path, texts: list[str]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Token count, mean and population std of the L2 norm per layer, over all texts at once."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    norms = []
    for text in texts:  # one text at a time: no padding at all
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            hs = model(**ids, output_hidden_states=True).hidden_states
        norms.append(torch.stack([h[0].double().norm(dim=-1) for h in hs]))  # [L+1, T]
    allnorms = torch.cat(norms, dim=1)
    return allnorms.shape[1], allnorms.mean(dim=1), allnorms.std(dim=1, unbiased=False)


def test_single_run_matches_a_direct_computation(workdir):
    result = lensbench("predict", "--config", "run.yaml", cwd=workdir)
    assert result.returncode == 0, result.stderr
    run_dir = workdir / "outputs" / "activation_norms" / "run"
    table = _table(run_dir)
    assert list(table.columns) == ["model", "dataset", "layer", "n_tokens", "n_tokens_dropped",
                                   "mean_norm", "std_norm", "min_norm", "max_norm", "n_nonfinite_norm"]
    assert (table["n_tokens_dropped"] == 0).all() and (table["n_nonfinite_norm"] == 0).all()
    assert sorted(table["dataset"].unique()) == ["alpha", "beta"]
    assert sorted(table["layer"].unique()) == [0, 1, 2]  # embedding output + 2 blocks
    for name in ("alpha", "beta"):
        n, mean, std = _reference(workdir / "tiny", read_texts(workdir / f"{name}.txt"))
        rows = table[table["dataset"] == name]
        assert (rows["n_tokens"] == n).all()
        assert torch.allclose(torch.tensor(rows["mean_norm"].values), mean, rtol=1e-5)
        assert torch.allclose(torch.tensor(rows["std_norm"].values), std, rtol=1e-4)
    assert (run_dir / "activation_norms.png").stat().st_size > 1000
    config = (run_dir / "config.yaml").read_text()
    assert "lensbench.analyses.activation_norms.ActivationNorms" in config and "batch_size: 4" in config
    # The stored config repeats the run exactly: rerunning it into a new folder gives the same table.
    again = lensbench("predict", "--config", str(run_dir / "config.yaml"), "--model.init_args.experiment", "again", cwd=workdir)
    assert again.returncode == 0, again.stderr
    _assert_close(_table(workdir / "outputs" / "again"), table, rel=0)


def test_truncated_tokens_are_counted_and_reported(workdir):
    from tiny import WORDS

    long_text = " ".join(WORDS[i % len(WORDS)] for i in range(40))
    texts = ["the sun", long_text, "paris is the capital of france", long_text + " moon sea"]
    (workdir / "long.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(workdir / "tiny")
    lengths = [len(tok(text)["input_ids"]) for text in texts]
    expected = sum(max(0, n - 16) for n in lengths)
    assert expected > 0 and max(lengths) < 128  # all within the tiny model's context (128 positions)
    args = ["predict", "--config", "run.yaml", "--data.init_args.datasets", "[long.txt]",
            "--data.init_args.batch_size", "2"]  # the two long texts fall in two work items

    cut = lensbench(*args, "--model.init_args.max_length", "16", "--model.init_args.experiment", "cut", cwd=workdir)
    assert cut.returncode == 0, cut.stderr
    table = _table(workdir / "outputs" / "cut")
    assert (table["n_tokens_dropped"] == expected).all()
    assert (table["n_tokens"] == sum(min(n, 16) for n in lengths)).all()
    line = f"activation_norms: {expected} tokens of 2 texts beyond max_length=16 were not measured"
    printed = [x for x in (cut.stdout + cut.stderr).splitlines() if line in x]
    assert len(printed) == 1 and printed[0].rstrip().endswith("raise max_length or set it to null"), cut.stderr
    assert line in (workdir / "outputs" / "cut" / "logs" / "rank0.log").read_text(encoding="utf-8")

    full = lensbench(*args, "--model.init_args.experiment", "full", cwd=workdir)  # max_length: null
    assert full.returncode == 0, full.stderr
    table = _table(workdir / "outputs" / "full")
    assert (table["n_tokens_dropped"] == 0).all() and (table["n_tokens"] == sum(lengths)).all()
    assert "were not measured" not in full.stdout + full.stderr
    assert "max_length: null" in (workdir / "outputs" / "full" / "config.yaml").read_text()


def test_model_context_and_old_records(tmp_path):
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlavaConfig

    from lensbench.analyses.activation_norms import ActivationNorms, truncation_message
    from lensbench.generation import model_context

    def loaded(model_max_length, config):
        return SimpleNamespace(tokenizer=SimpleNamespace(model_max_length=model_max_length),
                               model=SimpleNamespace(config=config))

    llama = LlamaConfig(max_position_embeddings=300)
    assert model_context(loaded(64, llama)) == 64  # the tokenizer's, when set
    assert model_context(loaded(int(1e30), llama)) == 300  # transformers' "not set" placeholder
    llava = LlavaConfig(text_config=LlamaConfig(max_position_embeddings=200).to_dict())
    assert model_context(loaded(int(1e30), llava)) == 200  # a vision-language model's text model
    assert model_context(SimpleNamespace(tokenizer=None, model=SimpleNamespace(config=None))) is None

    # Records stored before tokens were counted merge as dropping nothing.
    stats = {"norm": {"mean": [1.0, 2.0], "m2": [0.5, 0.5], "min": [0.5, 1.0], "max": [1.5, 3.0]}}
    old = [{"model": "m", "dataset": "d", "labels": {}, "n_tokens": 5, "stats": stats}]
    ActivationNorms.merge(old, tmp_path)
    table = pd.read_csv(tmp_path / "activation_norms.csv")
    assert list(table["n_tokens_dropped"]) == [0, 0] and list(table["n_tokens"]) == [5, 5]
    assert truncation_message(old) is None
    cut = [{**old[0], "n_tokens_dropped": 7, "n_texts_truncated": 1, "max_length": 128, "max_length_from": "context"}]
    message = truncation_message(cut)
    assert message.startswith("activation_norms: 7 tokens of 1 texts beyond the model's context of 128 tokens")
    assert "\n" not in message


def test_rerun_recomputes_nothing_and_refuses_a_changed_config(workdir):
    assert lensbench("predict", "--config", "run.yaml", cwd=workdir).returncode == 0
    shards = workdir / "outputs" / "activation_norms" / "run" / "shards"
    before = {p.name: p.read_bytes() for p in shards.iterdir()}
    second = lensbench("predict", "--config", "run.yaml", cwd=workdir)
    assert second.returncode == 0, second.stderr
    assert "0 to do" in second.stderr + second.stdout
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before
    changed = lensbench("predict", "--config", "run.yaml", "--data.init_args.batch_size", "2", cwd=workdir)
    assert changed.returncode == 1
    line = changed.stderr.strip().splitlines()[-1]
    assert "different configuration" in line and "data.init_args.batch_size" in line
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before


def test_two_ddp_processes_match_one(workdir):
    one = lensbench("predict", "--config", "run.yaml", cwd=workdir)
    assert one.returncode == 0, one.stderr
    two = lensbench("predict", "--config", "run.yaml", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                    "--model.init_args.experiment", "ddp2", cwd=workdir)
    assert two.returncode == 0, two.stderr
    shards = sorted((workdir / "outputs" / "ddp2" / "shards").glob("*.jsonl"))
    assert len(shards) == 2 and all(p.stat().st_size > 0 for p in shards)  # both ranks worked
    for rank in (0, 1):  # each rank logs its own share and its end
        log = (workdir / "outputs" / "ddp2" / "logs" / f"rank{rank}.log").read_text(encoding="utf-8")
        assert f"rank {rank}/2 on cpu" in log and re.search(rf"rank {rank}: (\d+)/\1 work items \(100%\)", log), log
    assert "merged: activation_norms.csv" in (workdir / "outputs" / "ddp2" / "logs" / "rank0.log").read_text()
    assert "Tip:" not in two.stdout + two.stderr
    _assert_close(_table(workdir / "outputs" / "ddp2"), _table(workdir / "outputs" / "activation_norms" / "run"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_match_one(workdir):
    assert lensbench("predict", "--config", "run.yaml", cwd=workdir).returncode == 0
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            ["torchrun", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
             "--master_addr", "127.0.0.1", "--master_port", port,
             "-m", "lensbench.cli", "predict", "--config", "run.yaml",
             "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp",
             "--model.init_args.experiment", "nodes"],
            cwd=workdir, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(list((workdir / "outputs" / "nodes" / "shards").glob("*.jsonl"))) == 2
    _assert_close(_table(workdir / "outputs" / "nodes"), _table(workdir / "outputs" / "activation_norms" / "run"))


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((run_dir / "shards").glob("*.jsonl"))
            for line in p.read_text().splitlines() if line.strip()]


def test_sigkill_then_resume_equals_an_uninterrupted_run(workdir):
    from tiny import write_texts

    write_texts(workdir / "long.txt", 60, seed=3)  # seconds per run, even on two busy cores
    args = ["predict", "--config", "run.yaml", "--data.init_args.datasets", "[long.txt]",
            "--data.init_args.batch_size", "1"]
    full = lensbench(*args, "--model.init_args.experiment", "full", cwd=workdir)
    assert full.returncode == 0, full.stderr

    run_dir = workdir / "outputs" / "killed"
    shard = run_dir / "shards" / "rank00000.jsonl"
    stored = sigkill_when_stored([*args, "--model.init_args.experiment", "killed"], workdir, shard, 12)
    assert 12 <= stored < 60, "the kill must land mid-run"
    assert not (run_dir / "activation_norms.csv").exists()

    resumed = lensbench(*args, "--model.init_args.experiment", "killed", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    records = _records(run_dir)
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == 60  # nothing duplicated, nothing missing
    assert f"{stored} already stored" in resumed.stderr + resumed.stdout or \
        f"{stored - 1} already stored" in resumed.stderr + resumed.stdout  # a torn last line is dropped
    _assert_close(_table(run_dir), _table(workdir / "outputs" / "full"), rel=1e-9)


def test_more_ranks_than_work_items(workdir):
    """A rank with nothing to do (one work item on two ranks; a resume with nothing left) takes
    part in the barriers and the merge: the run ends well and its table equals one rank's."""
    one = lensbench("predict", "--config", "run.yaml", "--data.init_args.datasets", "[beta.txt]",
                    "--data.init_args.batch_size", "16", cwd=workdir)
    assert one.returncode == 0, one.stderr
    assert "1 work items" in one.stderr + one.stdout
    two = lensbench("predict", "--config", "run.yaml", "--data.init_args.datasets", "[beta.txt]",
                    "--data.init_args.batch_size", "16", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                    "--model.init_args.experiment", "ddp2", cwd=workdir)
    assert two.returncode == 0, two.stderr
    run = workdir / "outputs" / "ddp2"
    stored = [p for p in (run / "shards").glob("*.jsonl") if p.stat().st_size > 0]
    assert len(stored) == 1  # one rank had the item, the other nothing
    assert "merged: activation_norms.csv" in (run / "logs" / "rank0.log").read_text(encoding="utf-8")
    _assert_close(_table(run), _table(workdir / "outputs" / "activation_norms" / "run"))
    before = {p.name: p.read_bytes() for p in (run / "shards").iterdir()}
    again = lensbench("predict", "--config", "run.yaml", "--data.init_args.datasets", "[beta.txt]",
                      "--data.init_args.batch_size", "16", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                      "--model.init_args.experiment", "ddp2", cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert "0 to do on 2 rank(s)" in again.stderr + again.stdout
    assert {p.name: p.read_bytes() for p in (run / "shards").iterdir()} == before
    _assert_close(_table(run), _table(workdir / "outputs" / "activation_norms" / "run"))
