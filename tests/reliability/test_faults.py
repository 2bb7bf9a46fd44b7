"""Injected faults: each loses nothing stored and resumes to the uninterrupted result.

- SIGKILL at two seeded random points of every analysis (1 rank): the second run resumes the
  first's folder and is killed again; the third finishes. Records stored before each kill are
  still there byte for byte, no key is stored twice, and the merged tables equal an uninterrupted
  run's.
- A 2-rank DDP run (CPU, gloo) killed as a whole, resumed with 1 rank; a 2-rank run one of whose
  ranks dies: the other stops within seconds in one line (gloo reports the closed connection; no
  barrier waits for the 30-minute default timeout), and the folder resumes with 1 rank.
- SIGTERM and SIGINT (Ctrl-C): a clean stop (exit 128 + signal, one line saying how to resume,
  every stored line whole, the lock released, the reason in the run log), then a resume.
- A write that fails midway (a full disk, simulated with RLIMIT_FSIZE and SIGXFSZ ignored, so the
  write past the limit fails with EFBIG after a partial write): one line naming the shard; the torn
  line is cut off by the next run, which resumes.
- The shards folder made read-only after a first partial run. As root, permission bits do not
  stop writes (CAP_DAC_OVERRIDE); so the refused run is the real console script started through
  ``setpriv`` with DAC_OVERRIDE, DAC_READ_SEARCH and FOWNER dropped from its capability bounding
  set: still root, but held to the permission bits like any user. It stops in one line, the shards
  are unchanged byte for byte, and after ``chmod u+w`` the folder resumes.

Single-rank runs are forks of the fork server (``forkserver.py``: ``lensbench.cli.main`` as the
console script runs it); the fork server sends the signals itself once the shards hold a seeded
number of lines. DDP and ``setpriv`` runs are real console-script subprocesses.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import clean_env
from safetensors.torch import load_file, save_file
from tiny import save_tiny_llama, write_texts

SEED = 20240601
#: Columns that differ between two runs of one config (wall-clock times).
VOLATILE = ("time", "duration", "seconds", "timestamp")


def _yaml(model: dict, data: dict) -> str:
    return yaml.safe_dump({"model": model, "data": data,
                           "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}})


def make_analyses(root: Path, tiny_model: Path, forks) -> dict[str, dict]:
    """One config per analysis, each with 60-240 work items; name -> {config, total, tables}."""
    (root / "tiny").symlink_to(tiny_model)
    state = load_file(tiny_model / "model.safetensors")
    g = torch.Generator().manual_seed(SEED)
    for i in range(1, 4):  # three edited copies of the tiny model
        shutil.copytree(tiny_model, root / f"o{i}", ignore=shutil.ignore_patterns("*.safetensors"))
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()},
                  root / f"o{i}" / "model.safetensors", metadata={"format": "pt"})
    write_texts(root / "long.txt", 120, seed=3)
    write_texts(root / "short.txt", 40, seed=4)
    write_texts(root / "prompts.txt", 30, seed=5)
    text = {"class_path": "lensbench.data.modules.TextDataModule"}
    (root / "activation_norms.yaml").write_text(_yaml(
        {"class_path": "activation_norms", "init_args": {"models": ["tiny"]}},
        {**text, "init_args": {"datasets": ["long.txt"], "batch_size": 1}}))
    (root / "perturbation.yaml").write_text(_yaml(
        {"class_path": "perturbation", "init_args": {
            "model": "tiny", "perturbation": {"method": "mult_gauss", "param_group": "mlp_only", "levels": [0.3, 0.6]},
            "generation": {"do_sample": False, "max_new_tokens": 2, "max_batch_size": 2}, "perplexity": None}},
        {"class_path": "lensbench.data.modules.PromptDataModule", "init_args": {"prompts": ["prompts.txt"]}}))
    (root / "param_diff.yaml").write_text(_yaml(
        {"class_path": "param_diff"},
        {"class_path": "lensbench.data.checkpoints.CheckpointPairs", "init_args": {"base": "tiny",
                                                                                 "others": ["o1", "o2", "o3"]}}))
    (root / "loop_identity.yaml").write_text(_yaml(
        {"class_path": "loop_identity", "init_args": {"baseline": "tiny", "checkpoints": ["o1"], "start": 0, "end": 1,
                                                      "loop_counts": [0, 1, 2], "max_length": 32}},
        {**text, "init_args": {"datasets": ["short.txt"], "batch_size": 1}}))
    # memory_ablation needs a memory model: a few training steps (what it learnt does not matter)
    data = {"dataset": "synthetic_qa", "options": {"num_pairs": 32, "buckets": [4, 16], "heldout_fraction": 0.125},
            "seed": 0}
    (root / "train.yaml").write_text(yaml.safe_dump({
        "model": {"tokenizer": "chars", "save_every": 1000, "track_memory_every": 0,
                  "config": {"model_type": "memory_llama", "hidden_size": 32, "intermediate_size": 4,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "memory_layers": [1], "memory_n_keys": 16, "memory_heads": 2, "memory_topk": 4,
                             "memory_k_dim": 32, "max_position_embeddings": 32}},
        "data": {**data, "max_length": 16, "batch_size": 32, "val_split": None},
        "trainer": {"max_steps": 3, "accelerator": "cpu", "enable_progress_bar": False}}))
    trained = forks.one(("fit", "--config", "train.yaml"), root, clean_env())
    assert trained.returncode == 0, trained.stderr[-3000:]
    (root / "memory_ablation.yaml").write_text(_yaml(
        {"class_path": "memory_ablation", "init_args": {
            "model": "outputs/fit/train", "interventions": [{"name": "slot", "transform": "ablate_memory_values",
                                                             "params": {"layer": 1}, "vary": "slots", "every": True,
                                                             "limit": 30}]}},
        {"class_path": "lensbench.data.answers.AnswerDataModule",
         "init_args": {**data, "splits": ["test"], "batch_size": 8}}))
    return {
        "activation_norms": {"total": None, "tables": ["activation_norms.csv"]},
        "perturbation": {"total": None, "tables": ["summary.csv"]},
        "param_diff": {"total": None, "tables": ["per_matrix.csv", "per_layer.csv"]},
        "loop_identity": {"total": None, "tables": ["loop_metrics.csv"]},
        "memory_ablation": {"total": None, "tables": ["accuracy.csv", "impact_matrix.csv"]},
    }


def args(name: str, experiment: str, *extra: str) -> tuple[str, ...]:
    return ("predict", "--config", f"{name}.yaml", "--model.init_args.experiment", experiment, *extra)


def lines(run_dir: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in run_dir.glob("shards/*.jsonl"))


def whole_lines(run_dir: Path) -> dict[str, bytes]:
    """Every shard's complete lines (a torn last line left out)."""
    out = {}
    for p in sorted(run_dir.glob("shards/*.jsonl")):
        data = p.read_bytes()
        out[p.name] = data[: data.rfind(b"\n") + 1]
    return out


def keys(run_dir: Path) -> list[str]:
    return [json.loads(line)["key"] for p in sorted(run_dir.glob("shards/*.jsonl"))
            for line in p.read_text().splitlines() if line.strip()]


def table(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path)
    return frame[[c for c in frame.columns if not any(v in c.lower() for v in VOLATILE)]]


def same_tables(run_dir: Path, reference: Path, names: list[str], rtol: float = 1e-9) -> None:
    for name in names:
        pd.testing.assert_frame_equal(table(run_dir / name), table(reference / name), check_exact=False, rtol=rtol,
                                      atol=1e-12, obj=f"{run_dir.name}/{name}")


def one_error_line(result) -> str:
    found = [line for line in result.stderr.splitlines() if line.startswith("lensbench: error:")]
    assert len(found) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return found[0]


def lock_is_free(run_dir: Path) -> bool:
    with open(run_dir / ".lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def _ddp(root: Path, experiment: str, kill: str, at: int) -> dict:
    """A 2-rank DDP activation_norms run through the real console script; once the shards hold
    ``at`` lines, SIGKILL the whole run (``kill="all"``) or only rank 1 (``kill="rank1"``)."""
    env = clean_env()
    proc = subprocess.Popen(["lensbench", *args("activation_norms", experiment, "--trainer.devices", "2",
                                                "--trainer.strategy", "ddp")],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    run_dir = root / "outputs" / experiment
    deadline = time.time() + 200
    watched = run_dir / "shards" / "rank00001.jsonl" if kill == "rank1" else None
    while time.time() < deadline and proc.poll() is None:
        count = watched.read_bytes().count(b"\n") if watched and watched.exists() else (0 if watched else lines(run_dir))
        if count >= at:
            break
        time.sleep(0.005)
    killed_at = time.time()
    if kill == "all":
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        os.kill(int(children[0]), signal.SIGKILL)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += "\n(hung: killed by the test after 120 s)"
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # a rank left behind
    except OSError:
        pass
    return {"returncode": proc.returncode, "stderr": err, "stopped_after": time.time() - killed_at,
            "stored": whole_lines(run_dir), "lines": lines(run_dir)}


def _setpriv_run(root: Path, experiment: str) -> subprocess.CompletedProcess:
    run_dir = root / "outputs" / experiment
    (run_dir / "shards").chmod(0o555)
    for shard in (run_dir / "shards").glob("*.jsonl"):
        shard.chmod(0o444)
    try:
        return subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "lensbench",
                               *args("activation_norms", experiment)], cwd=root, env=clean_env(),
                              capture_output=True, text=True, timeout=300)
    finally:
        (run_dir / "shards").chmod(0o755)
        for shard in (run_dir / "shards").glob("*.jsonl"):
            shard.chmod(0o644)


@pytest.fixture(scope="module")
def faults(tmp_path_factory, tiny_model, forks):
    root = tmp_path_factory.mktemp("faults")
    analyses = make_analyses(root, tiny_model, forks)
    env = clean_env()
    rng = random.Random(SEED)
    out: dict = {"root": root, "analyses": analyses}
    pool = ThreadPoolExecutor(2)
    ddp_all = ddp_rank = None

    def kill_at(name: str, experiment: str, at: int, sig: str = "SIGKILL") -> dict:
        return {"args": args(name, experiment), "cwd": root, "env": env,
                "fault": {"signal": sig, "glob": f"outputs/{experiment}/shards/*.jsonl", "lines": at}}

    # 1. the uninterrupted runs, and the first kill of each analysis
    first = forks.run({f"full_{name}": {"args": args(name, f"full_{name}"), "cwd": root, "env": env}
                       for name in analyses}, parallel=3)
    for name, spec in analyses.items():
        assert first[f"full_{name}"].returncode == 0, first[f"full_{name}"].stderr[-3000:]
        spec["total"] = spec["total"] or len(keys(root / "outputs" / f"full_{name}"))
        assert len(keys(root / "outputs" / f"full_{name}")) == spec["total"], name
        spec["points"] = sorted(rng.sample(range(3, spec["total"] * 2 // 3), 2))
    # the DDP runs start meanwhile (their imports overlap the forks' work)
    ddp_all = pool.submit(_ddp, root, "ddp_killed", "all", rng.randrange(10, 60))
    ddp_rank = pool.submit(_ddp, root, "ddp_rank_died", "rank1", 5)
    jobs = {f"kill1_{name}": kill_at(name, f"killed_{name}", spec["points"][0]) for name, spec in analyses.items()}
    jobs.update({sig: kill_at("activation_norms", f"signal_{sig}", rng.randrange(5, 60), sig)
                 for sig in ("SIGTERM", "SIGINT")})
    jobs["partial_read_only"] = kill_at("activation_norms", "read_only", rng.randrange(5, 60))
    jobs["disk_full"] = {"args": args("activation_norms", "disk_full"), "cwd": root, "env": env,
                         "fault": {"fsize": 6000 + rng.randrange(500)}}
    out["kill1"] = forks.run(jobs, parallel=3)
    out["kept1"] = {name: whole_lines(root / "outputs" / f"killed_{name}") for name in analyses}
    out["after_kill1"] = {name: lines(root / "outputs" / f"killed_{name}") for name in analyses}
    for sig in ("SIGTERM", "SIGINT"):
        run_dir = root / "outputs" / f"signal_{sig}"
        out[f"{sig}_state"] = {"lock_free": lock_is_free(run_dir), "stored": whole_lines(run_dir),
                               "raw": {p.name: p.read_bytes() for p in run_dir.glob("shards/*.jsonl")},
                               "log": (run_dir / "logs" / "rank0.log").read_text()}
    out["disk_full_shard"] = (root / "outputs" / "disk_full" / "shards" / "rank00000.jsonl").read_bytes()
    # 2. the read-only shards (real console script under setpriv), and the second kill of each analysis
    read_only_before = {p.name: p.read_bytes() for p in (root / "outputs" / "read_only" / "shards").iterdir()}
    read_only = pool.submit(_setpriv_run, root, "read_only") if shutil.which("setpriv") else None
    out["kill2"] = forks.run({f"kill2_{name}": kill_at(name, f"killed_{name}", spec["points"][1])
                              for name, spec in analyses.items()}, parallel=3)
    out["kept2"] = {name: whole_lines(root / "outputs" / f"killed_{name}") for name in analyses}
    out["after_kill2"] = {name: lines(root / "outputs" / f"killed_{name}") for name in analyses}
    if read_only is not None:
        out["read_only"] = read_only.result()
        out["read_only_before"] = read_only_before
        out["read_only_after"] = {p.name: p.read_bytes() for p in (root / "outputs" / "read_only" / "shards").iterdir()}
    out["ddp_killed"], out["ddp_rank_died"] = ddp_all.result(), ddp_rank.result()
    pool.shutdown()
    # 3. every interrupted folder resumes (the DDP ones with 1 rank)
    resume = [f"killed_{name}" for name in analyses] + ["signal_SIGTERM", "signal_SIGINT", "disk_full", "read_only",
                                                       "ddp_killed", "ddp_rank_died"]
    out["resume"] = forks.run({e: {"args": args(e.split("_", 1)[1] if e.startswith("killed_") else "activation_norms",
                                                e), "cwd": root, "env": env} for e in resume}, parallel=3)
    return out


ANALYSES = ("activation_norms", "perturbation", "param_diff", "loop_identity", "memory_ablation")


@pytest.mark.parametrize("name", ANALYSES)
def test_sigkill_at_seeded_points_loses_nothing_and_resumes_to_the_uninterrupted_result(faults, name):
    root, spec = faults["root"], faults["analyses"][name]
    run_dir = root / "outputs" / f"killed_{name}"
    for step, point in (("1", spec["points"][0]), ("2", spec["points"][1])):
        killed = faults[f"kill{step}"][f"kill{step}_{name}"]
        assert killed.fault and killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        assert point <= faults[f"after_kill{step}"][name] < spec["total"], "the kill must land mid-run"
    # what the first kill left stored is still there, byte for byte, after the second and the resume
    for shard, data in faults["kept1"][name].items():
        assert faults["kept2"][name][shard].startswith(data)
        assert (run_dir / "shards" / shard).read_bytes().startswith(data)
    resumed = faults["resume"][f"killed_{name}"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    found = keys(run_dir)
    assert len(found) == len(set(found)) == spec["total"]  # nothing duplicated, nothing missing
    same_tables(run_dir, root / "outputs" / f"full_{name}", spec["tables"])


def test_a_ddp_run_killed_whole_resumes_with_one_rank(faults):
    root, ddp = faults["root"], faults["ddp_killed"]
    assert ddp["returncode"] == -signal.SIGKILL, ddp["stderr"][-3000:]
    assert 0 < ddp["lines"] < 120, "the kill must land mid-run"
    run_dir = root / "outputs" / "ddp_killed"
    for shard, data in ddp["stored"].items():
        assert (run_dir / "shards" / shard).read_bytes().startswith(data)
    assert faults["resume"]["ddp_killed"].returncode == 0, faults["resume"]["ddp_killed"].stderr[-3000:]
    found = keys(run_dir)
    assert len(found) == len(set(found)) == 120
    # rank 1 of the DDP run computed its items in another process: float32 sums may round differently
    same_tables(run_dir, root / "outputs" / "full_activation_norms", ["activation_norms.csv"], rtol=1e-5)


def test_a_rank_that_dies_stops_the_others_in_one_line(faults):
    root, ddp = faults["root"], faults["ddp_rank_died"]
    assert ddp["returncode"] == 1, ddp["stderr"][-3000:]
    assert ddp["stopped_after"] < 60, "the surviving rank must not wait for a barrier's timeout"
    found = [line for line in ddp["stderr"].splitlines() if line.startswith("lensbench: error:")]
    assert len(found) == 1 and "Traceback" not in ddp["stderr"], ddp["stderr"][-3000:]
    assert "another rank of this distributed run stopped" in found[0]
    assert "run the same command again to resume" in found[0]
    run_dir = root / "outputs" / "ddp_rank_died"
    assert lock_is_free(run_dir)
    assert faults["resume"]["ddp_rank_died"].returncode == 0, faults["resume"]["ddp_rank_died"].stderr[-3000:]
    found_keys = keys(run_dir)
    assert len(found_keys) == len(set(found_keys)) == 120
    same_tables(run_dir, root / "outputs" / "full_activation_norms", ["activation_norms.csv"], rtol=1e-5)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_sigterm_and_ctrl_c_stop_cleanly_and_resume(faults, sig):
    root, state = faults["root"], faults[f"{sig}_state"]
    stopped = faults["kill1"][sig]
    assert stopped.fault and stopped.returncode == 128 + getattr(signal, sig), stopped.stderr[-3000:]
    line = one_error_line(stopped)
    assert line == (f"lensbench: error: stopped by {sig}; the results stored so far are kept: run the same command "
                    "again to resume")
    assert state["lock_free"]
    assert state["raw"] == state["stored"] and sum(d.count(b"\n") for d in state["raw"].values()) > 0  # no torn line
    assert f"run stopped: RunStopped: stopped by {sig}" in state["log"]
    run_dir = root / "outputs" / f"signal_{sig}"
    resumed = faults["resume"][f"signal_{sig}"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for shard, data in state["stored"].items():
        assert (run_dir / "shards" / shard).read_bytes().startswith(data)
    found = keys(run_dir)
    assert len(found) == len(set(found)) == 120
    same_tables(run_dir, root / "outputs" / "full_activation_norms", ["activation_norms.csv"])


def test_a_write_that_fails_midway_is_one_line_and_resumes(faults):
    root = faults["root"]
    failed = faults["kill1"]["disk_full"]
    run_dir = root / "outputs" / "disk_full"
    assert failed.returncode == 1, failed.stderr[-3000:]
    line = one_error_line(failed)
    assert line.startswith(f"lensbench: error: File too large: {Path('outputs') / 'disk_full' / 'shards' / 'rank00000.jsonl'}")
    assert "raise the file size limit (ulimit -f)" in line
    shard = faults["disk_full_shard"]
    assert 0 < shard.count(b"\n") < 120
    assert not shard.endswith(b"\n"), "the failed write leaves a torn last line"
    assert lock_is_free(run_dir)
    resumed = faults["resume"]["disk_full"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "shards" / "rank00000.jsonl").read_bytes().startswith(shard[: shard.rfind(b"\n") + 1])
    found = keys(run_dir)
    assert len(found) == len(set(found)) == 120
    same_tables(run_dir, root / "outputs" / "full_activation_norms", ["activation_norms.csv"])


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_read_only_shards_midway_are_one_line_unchanged_and_resume(faults):
    root = faults["root"]
    partial = faults["kill1"]["partial_read_only"]
    assert partial.returncode == -signal.SIGKILL
    refused = faults["read_only"]
    assert refused.returncode == 1, refused.stderr[-3000:]
    line = one_error_line(refused)
    assert line.startswith("lensbench: error: Permission denied: ") and "read_only/shards/rank00000.jsonl" in line
    assert "check the permissions of that path" in line
    assert faults["read_only_after"] == faults["read_only_before"]  # byte for byte
    run_dir = root / "outputs" / "read_only"
    resumed = faults["resume"]["read_only"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    found = keys(run_dir)
    assert len(found) == len(set(found)) == 120
    same_tables(run_dir, root / "outputs" / "full_activation_norms", ["activation_norms.csv"])
