"""Injected faults: each loses nothing stored and resumes to the uninterrupted result.

- SIGKILL at two seeded random points of every analysis (1 rank): the second run resumes the
  first's folder and is killed again; the third finishes. Records stored before each kill are
  still there byte for byte, no key is stored twice, and the merged tables equal an uninterrupted
  run's.
- SIGKILL of layer_sweep after a seeded number of MTEB evaluations of each run (rows of
  progress.csv), mostly inside a work item: the layers MTEB already wrote under ``mteb/`` are read
  back on resume, their files unchanged byte for byte (left out where mteb is not installed).
- A 2-rank DDP run (CPU, gloo) killed as a whole, resumed with 1 rank; a 2-rank run one of whose
  ranks dies: the other stops within seconds (gloo reports the closed connection; no barrier
  waits for the 30-minute default timeout), and the folder resumes with 1 rank.
- Other rank counts: 1-rank runs (activation_norms, param_diff) killed at seeded points and
  resumed by 2 ranks; a 2-rank param_diff run killed as a whole, resumed by 1.
- A rank that hangs (SIGSTOP) with an 8 s DDP timeout (``--trainer.strategy.init_args.timeout``):
  the other stops in one line naming the timeout; the stopped rank is then SIGKILLed and the
  folder resumes. SIGTERM sent to both ranks of a 2-rank run: each stops cleanly in one line.
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
number of lines. ``ddp_killed``, ``ddp_rank_died`` and ``setpriv`` runs are real console-script
subprocesses (Lightning's own launcher); the other DDP runs are "fork-DDP": each rank a fork
started with ``LOCAL_RANK``/``MASTER_PORT``, as srun or torchrun start ranks, the ranks of a run
started together (``gang``).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import clean_env, installed
from safetensors.torch import load_file, save_file
from tiny import write_texts

from .sweep_tasks import write_sts

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
    analyses = {
        "activation_norms": {"total": None, "tables": ["activation_norms.csv"]},
        "perturbation": {"total": None, "tables": ["summary.csv"]},
        "param_diff": {"total": None, "tables": ["per_matrix.csv", "per_layer.csv"]},
        "loop_identity": {"total": None, "tables": ["loop_metrics.csv"]},
        "memory_ablation": {"total": None, "tables": ["accuracy.csv", "impact_matrix.csv"]},
    }
    if not installed("mteb"):  # its test is skipped (ANALYSES)
        return analyses
    # layer_sweep: three local STS tasks (3 layers each: 9 MTEB evaluations) and one metrics dataset
    for i in range(3):
        write_sts(root / f"sts{i}", seed=i)
    (root / "layer_sweep.yaml").write_text(_yaml(
        {"class_path": "layer_sweep", "init_args": {"models": ["tiny"], "batch_size": 8}},
        {"class_path": "lensbench.layer_sweep.data.LayerSweepData",
         "init_args": {"tasks": ["sts0", "sts1", "sts2"], "metrics_datasets": ["short.txt"]}}))
    # killed at MTEB evaluations (progress.csv rows; 3 per work item), counted from each run's start
    analyses["layer_sweep"] = {"total": None, "tables": ["layer_sweep.csv", "representation_metrics.csv"],
                               "glob": "progress.csv"}
    return analyses


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gang(name: str, experiment: str, ranks: int, *extra: str, fault: dict | None = None,
         faults: dict[int, dict] | None = None, root: Path, prefix: str = "") -> dict[str, dict]:
    """The fork-server jobs of one run of ``ranks`` ranks: with 2, two forks started together, each
    with ``LOCAL_RANK`` and a shared ``MASTER_PORT``, as srun or torchrun start the ranks of a DDP
    run (Lightning then launches nothing itself). ``fault`` goes to every rank (a signal sent to the
    whole job), ``faults`` to the ranks it names."""
    if ranks == 1:
        return {f"{prefix}{experiment}": {"args": args(name, experiment, *extra), "cwd": root, "env": clean_env(),
                                          "fault": fault}}
    port = str(free_port())
    strategy = extra if "--trainer.strategy" in extra else ("--trainer.strategy", "ddp", *extra)
    return {f"{prefix}{experiment}_rank{r}": {
        "args": args(name, experiment, "--trainer.devices", str(ranks), *strategy), "cwd": root, "gang": experiment,
        "env": clean_env(LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        "fault": (faults or {}).get(r, fault)} for r in range(ranks)}


#: Runs killed with one rank count and resumed with another: experiment -> (analysis, ranks killed,
#: ranks resuming). (A 2-rank activation_norms run killed whole and resumed with 1 is ``ddp_killed``.)
RERANKED = {"k1to2_activation_norms": ("activation_norms", 1, 2), "k2to1_param_diff": ("param_diff", 2, 1),
            "k1to2_param_diff": ("param_diff", 1, 2)}
#: The DDP collective timeout of the run whose rank 1 hangs (SIGSTOP), in seconds.
HANG_TIMEOUT = 8
DDP_STRATEGY = "lightning.pytorch.strategies.DDPStrategy"


@pytest.fixture(scope="module")
def faults(tmp_path_factory, tiny_model, forks):
    root = tmp_path_factory.mktemp("faults")
    analyses = make_analyses(root, tiny_model, forks)
    env = clean_env()
    rng = random.Random(SEED)
    more = random.Random(SEED + 1)  # the points of layer_sweep and of the fork-DDP runs
    out: dict = {"root": root, "analyses": analyses}
    pool = ThreadPoolExecutor(2)
    ddp_all = ddp_rank = None

    def kill_at(name: str, experiment: str, at: int, sig: str = "SIGKILL") -> dict:
        pattern = analyses.get(name, {}).get("glob", "shards/*.jsonl")
        if "glob" in analyses.get(name, {}):  # counted from this run's start (after the header)
            at += max(1, _count(root / "outputs" / experiment / pattern))
        return {"args": args(name, experiment), "cwd": root, "env": env,
                "fault": {"signal": sig, "glob": f"outputs/{experiment}/{pattern}", "lines": at}}

    def counts(name: str) -> dict:
        run_dir = root / "outputs" / f"killed_{name}"
        pattern = analyses[name].get("glob")
        return {"lines": _count(run_dir / pattern) if pattern else lines(run_dir), "items": len(keys(run_dir)),
                "tasks": sum('"task"' in k for k in keys(run_dir))}

    # 1. the uninterrupted runs, and the first kill of each analysis
    first = forks.run({f"full_{name}": {"args": args(name, f"full_{name}"), "cwd": root, "env": env}
                       for name in analyses}, parallel=3)
    for name, spec in analyses.items():
        assert first[f"full_{name}"].returncode == 0, first[f"full_{name}"].stderr[-3000:]
        spec["total"] = spec["total"] or len(keys(root / "outputs" / f"full_{name}"))
        assert len(keys(root / "outputs" / f"full_{name}")) == spec["total"], name
        if "glob" in spec:  # layer_sweep: MTEB evaluations, drawn from the first two thirds of a run
            spec["evaluations"] = _count(root / "outputs" / f"full_{name}" / spec["glob"]) - 1
            spec["points"] = [1 + more.randrange(spec["evaluations"] * 2 // 3), None]
        else:
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
    # fork-DDP runs: killed with one rank count (resumed with the other below), a rank that hangs
    # (SIGSTOP, then SIGKILL once rank 0 is gone), and SIGTERM sent to both ranks
    for experiment, (name, ranks, _) in RERANKED.items():
        at = more.randrange(5, analyses[name]["total"] * 2 // 3)
        out.setdefault("reranked_points", {})[experiment] = at
        jobs.update(gang(name, experiment, ranks, root=root, prefix="kill1_", fault={
            "signal": "SIGKILL", "glob": f"outputs/{experiment}/shards/*.jsonl", "lines": at}))
    jobs.update(gang("activation_norms", "ddp_hang", 2, "--trainer.strategy", DDP_STRATEGY,
                     "--trainer.strategy.init_args.timeout", f"0:00:{HANG_TIMEOUT:02d}", root=root, faults={
                         1: {"signal": "SIGSTOP", "glob": "outputs/ddp_hang/shards/rank00001.jsonl",
                             "lines": more.randrange(5, 40), "then_kill": True}}))
    jobs.update(gang("activation_norms", "ddp_rank_killed", 2, root=root, faults={
        1: {"signal": "SIGKILL", "glob": "outputs/ddp_rank_killed/shards/rank00001.jsonl",
            "lines": more.randrange(5, 40)}}))
    jobs.update(gang("activation_norms", "ddp_SIGTERM_rank1", 2, "--trainer.strategy", DDP_STRATEGY,
                     "--trainer.strategy.init_args.timeout", "0:00:45", root=root, faults={
                         1: {"signal": "SIGTERM", "glob": "outputs/ddp_SIGTERM_rank1/shards/rank00001.jsonl",
                             "lines": more.randrange(5, 40)}}))
    jobs.update(gang("activation_norms", "ddp_SIGTERM", 2, root=root, fault={
        "signal": "SIGTERM", "glob": "outputs/ddp_SIGTERM/shards/*.jsonl", "lines": more.randrange(10, 90)}))
    out["kill1"] = forks.run(jobs, parallel=3)
    out["kept1"] = {name: whole_lines(root / "outputs" / f"killed_{name}") for name in analyses}
    out["after_kill1"] = {name: counts(name) for name in analyses}
    out["mteb_after_kill1"] = {str(p.relative_to(root)): p.read_bytes()
                               for p in (root / "outputs" / "killed_layer_sweep" / "mteb").rglob("*.json")}
    for experiment in [*RERANKED, "ddp_hang", "ddp_rank_killed", "ddp_SIGTERM", "ddp_SIGTERM_rank1"]:
        run_dir = root / "outputs" / experiment
        out[f"{experiment}_state"] = {
            "lock_free": lock_is_free(run_dir), "stored": whole_lines(run_dir), "lines": lines(run_dir),
            "raw": {p.name: p.read_bytes() for p in run_dir.glob("shards/*.jsonl")},
            "mtime": {p.name: p.stat().st_mtime for p in run_dir.glob("shards/*.jsonl")},
            "logs": {p.name: p.read_text() for p in run_dir.glob("logs/rank*.log")}}
    for sig in ("SIGTERM", "SIGINT"):
        run_dir = root / "outputs" / f"signal_{sig}"
        out[f"{sig}_state"] = {"lock_free": lock_is_free(run_dir), "stored": whole_lines(run_dir),
                               "raw": {p.name: p.read_bytes() for p in run_dir.glob("shards/*.jsonl")},
                               "log": (run_dir / "logs" / "rank0.log").read_text()}
    out["disk_full_shard"] = (root / "outputs" / "disk_full" / "shards" / "rank00000.jsonl").read_bytes()
    # 2. the read-only shards (real console script under setpriv), and the second kill of each analysis
    read_only_before = {p.name: p.read_bytes() for p in (root / "outputs" / "read_only" / "shards").iterdir()}
    read_only = pool.submit(_setpriv_run, root, "read_only") if shutil.which("setpriv") else None
    for name, spec in analyses.items():
        if "glob" in spec:  # layer_sweep: within the evaluations this run has left to do (3 per item)
            left = spec["evaluations"] - 3 * out["after_kill1"][name]["tasks"]
            spec["points"][1] = 1 + more.randrange(max(1, left - 1))
        elif spec["points"][1] <= out["after_kill1"][name]["lines"]:  # the first kill overshot the second point
            low = out["after_kill1"][name]["lines"] + 1
            assert low < spec["total"], f"{name}: the first kill stored {low - 1} of {spec['total']} lines"
            spec["points"][1] = low + more.randrange(max(1, (spec["total"] - low) // 2))
    out["kill2"] = forks.run({f"kill2_{name}": kill_at(name, f"killed_{name}", spec["points"][1])
                              for name, spec in analyses.items()}, parallel=3)
    out["kept2"] = {name: whole_lines(root / "outputs" / f"killed_{name}") for name in analyses}
    out["after_kill2"] = {name: counts(name) for name in analyses}
    out["mteb_after_kill2"] = {str(p.relative_to(root)): p.read_bytes()
                               for p in (root / "outputs" / "killed_layer_sweep" / "mteb").rglob("*.json")}
    if read_only is not None:
        out["read_only"] = read_only.result()
        out["read_only_before"] = read_only_before
        out["read_only_after"] = {p.name: p.read_bytes() for p in (root / "outputs" / "read_only" / "shards").iterdir()}
    out["ddp_killed"], out["ddp_rank_died"] = ddp_all.result(), ddp_rank.result()
    pool.shutdown()
    # 3. every interrupted folder resumes (the DDP ones with 1 rank, the RERANKED ones with the other count)
    resume = [f"killed_{name}" for name in analyses] + ["signal_SIGTERM", "signal_SIGINT", "disk_full", "read_only",
                                                       "ddp_killed", "ddp_rank_died", "ddp_hang", "ddp_rank_killed",
                                                       "ddp_SIGTERM", "ddp_SIGTERM_rank1"]
    jobs = {e: {"args": args(e.split("_", 1)[1] if e.startswith("killed_") else "activation_norms", e), "cwd": root,
                "env": env} for e in resume}
    for experiment, (name, _, ranks) in RERANKED.items():
        jobs.update(gang(name, experiment, ranks, root=root))
    out["resume"] = forks.run(jobs, parallel=3)
    return out


def resumed_to_the_full_result(faults, experiment: str, stored: dict[str, bytes] | None = None, *,
                               name: str = "activation_norms", rtol: float = 1e-9, resumed: list | None = None) -> None:
    """The resume of ``experiment`` exited 0 (every rank of it: ``resumed``), each shard still starts
    with what the interruption left stored (``stored``: shard -> bytes), every item is stored once,
    and the tables equal the uninterrupted run's (``full_<name>``)."""
    root = faults["root"]
    run_dir = root / "outputs" / experiment
    for result in resumed if resumed is not None else [faults["resume"][experiment]]:
        assert result.returncode == 0, result.stderr[-3000:]
    for shard, data in (stored or {}).items():
        assert (run_dir / "shards" / shard).read_bytes().startswith(data), shard
    found = keys(run_dir)
    assert len(found) == len(set(found)) == faults["analyses"][name]["total"]  # nothing duplicated, nothing missing
    same_tables(run_dir, root / "outputs" / f"full_{name}", faults["analyses"][name]["tables"], rtol=rtol)


def _whole_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def _count(path_or_glob: Path) -> int:
    """Lines of the files matching ``path_or_glob``."""
    return sum(p.read_bytes().count(b"\n") for p in path_or_glob.parent.glob(path_or_glob.name))


ANALYSES = ("activation_norms", "perturbation", "param_diff", "loop_identity", "memory_ablation",
            pytest.param("layer_sweep", marks=pytest.mark.requires("mteb")))


@pytest.mark.parametrize("name", ANALYSES)
def test_sigkill_at_seeded_points_loses_nothing_and_resumes_to_the_uninterrupted_result(faults, name):
    root, spec = faults["root"], faults["analyses"][name]
    before = 0
    for step, point in (("1", spec["points"][0]), ("2", spec["points"][1])):
        killed = faults[f"kill{step}"][f"kill{step}_{name}"]
        assert killed.fault and killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        after = faults[f"after_kill{step}"][name]
        if "glob" in spec:  # layer_sweep: MTEB evaluations done by this run (progress.csv rows)
            assert after["lines"] - max(before, 1) >= point and after["items"] < spec["total"], \
                "the kill must land mid-run"
            before = after["lines"]
        else:
            assert point <= after["lines"] < spec["total"], "the kill must land mid-run"
    # what the first kill left stored is still there, byte for byte, after the second and the resume
    for shard, data in faults["kept1"][name].items():
        assert faults["kept2"][name][shard].startswith(data)
    for path, data in faults["mteb_after_kill1"].items() if "glob" in spec else ():
        if _whole_json(data):  # a file the kill tore mid-write is written again, rightly
            assert (root / path).read_bytes() == data, f"{path}: a layer MTEB wrote before the kill was rewritten"
    resumed_to_the_full_result(faults, f"killed_{name}", faults["kept1"][name], name=name)


def test_a_ddp_run_killed_whole_resumes_with_one_rank(faults):
    ddp = faults["ddp_killed"]
    assert ddp["returncode"] == -signal.SIGKILL, ddp["stderr"][-3000:]
    assert 0 < ddp["lines"] < 120, "the kill must land mid-run"
    # rank 1 of the DDP run computed its items in another process: float32 sums may round differently
    resumed_to_the_full_result(faults, "ddp_killed", ddp["stored"], rtol=1e-5)


def test_a_rank_that_dies_stops_the_others_in_one_line(faults):
    """Under Lightning's own launcher (one command, ``--trainer.devices 2``) rank 0 stops either at
    its next collective, in one line, or earlier: Lightning's process observer, which polls the
    children every 5 s, SIGKILLs it once it sees a child died (and logs so). Either way within
    seconds, unlocked, resumable. ``test_a_rank_that_dies_under_an_external_launcher_...`` has no
    observer, so the one line is certain there."""
    root, ddp = faults["root"], faults["ddp_rank_died"]
    run_dir = root / "outputs" / "ddp_rank_died"
    assert ddp["stopped_after"] < 60, "the surviving rank must not wait for a barrier's timeout"
    if ddp["returncode"] == -signal.SIGKILL:  # the observer was first
        assert "terminated with code -9. Forcefully terminating all other processes" in \
            (run_dir / "logs" / "rank0.log").read_text() + ddp["stderr"], ddp["stderr"][-3000:]
    else:
        assert ddp["returncode"] == 1, ddp["stderr"][-3000:]
        found = [line for line in ddp["stderr"].splitlines() if line.startswith("lensbench: error:")]
        assert len(found) == 1 and "Traceback" not in ddp["stderr"], ddp["stderr"][-3000:]
        assert "another rank of this distributed run stopped" in found[0]
        assert "run the same command again to resume" in found[0]
    assert lock_is_free(run_dir)
    resumed_to_the_full_result(faults, "ddp_rank_died", rtol=1e-5)


def test_a_rank_that_dies_under_an_external_launcher_stops_the_other_in_one_line(faults):
    """Rank 1 of a fork-DDP run (ranks started as srun starts them) is SIGKILLed at a drawn point:
    rank 0 exits 1 in one line at its next collective (gloo: the connection closed), within
    seconds of its last record; unlocked; 1 rank resumes to the uninterrupted tables."""
    state = faults["ddp_rank_killed_state"]
    rank0, rank1 = faults["kill1"]["ddp_rank_killed_rank0"], faults["kill1"]["ddp_rank_killed_rank1"]
    assert rank1.fault and rank1.returncode == -signal.SIGKILL
    assert rank0.returncode == 1, rank0.stderr[-3000:]
    line = one_error_line(rank0)
    assert "another rank of this distributed run stopped or stopped answering" in line
    assert "run the same command again to resume" in line and "DDP timeout" not in line
    assert rank0.ended_at - state["mtime"]["rank00000.jsonl"] < 20, "no wait for a timeout"
    assert state["lock_free"] and "run stopped" in state["logs"]["rank0.log"]
    resumed_to_the_full_result(faults, "ddp_rank_killed", state["stored"], rtol=1e-5)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_sigterm_and_ctrl_c_stop_cleanly_and_resume(faults, sig):
    state = faults[f"{sig}_state"]
    stopped = faults["kill1"][sig]
    assert stopped.fault and stopped.returncode == 128 + getattr(signal, sig), stopped.stderr[-3000:]
    line = one_error_line(stopped)
    assert line == (f"lensbench: error: stopped by {sig}; the results stored so far are kept: run the same command "
                    "again to resume")
    assert state["lock_free"]
    assert state["raw"] == state["stored"] and sum(d.count(b"\n") for d in state["raw"].values()) > 0  # no torn line
    assert f"run stopped: RunStopped: stopped by {sig}" in state["log"]
    resumed_to_the_full_result(faults, f"signal_{sig}", state["stored"])


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
    resumed_to_the_full_result(faults, "disk_full", {"rank00000.jsonl": shard[: shard.rfind(b"\n") + 1]})


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_read_only_shards_midway_are_one_line_unchanged_and_resume(faults):
    partial = faults["kill1"]["partial_read_only"]
    assert partial.returncode == -signal.SIGKILL
    refused = faults["read_only"]
    assert refused.returncode == 1, refused.stderr[-3000:]
    line = one_error_line(refused)
    assert line.startswith("lensbench: error: Permission denied: ") and "read_only/shards/rank00000.jsonl" in line
    assert "check the permissions of that path" in line
    assert faults["read_only_after"] == faults["read_only_before"]  # byte for byte
    resumed_to_the_full_result(faults, "read_only", {n: d[: d.rfind(b"\n") + 1]  # the kill's torn line aside
                                                     for n, d in faults["read_only_before"].items()})


@pytest.mark.parametrize("experiment", sorted(RERANKED))
def test_sigkill_then_a_resume_with_another_rank_count_gives_the_uninterrupted_result(faults, experiment):
    """1 rank killed, resumed by 2 ranks; 2 ranks killed together (fork-DDP, as srun starts them),
    resumed by 1."""
    root = faults["root"]
    name, killed_ranks, resumed_ranks = RERANKED[experiment]
    total, state = faults["analyses"][name]["total"], faults[f"{experiment}_state"]
    killed = [faults["kill1"][cid] for cid in faults["kill1"] if cid.startswith(f"kill1_{experiment}")]
    assert len(killed) == killed_ranks
    for result in killed:
        assert result.fault and result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert faults["reranked_points"][experiment] <= state["lines"] < total, "the kill must land mid-run"
    assert state["lock_free"]
    resumed = [faults["resume"][cid] for cid in faults["resume"] if cid.startswith(experiment)]
    assert len(resumed) == resumed_ranks
    resumed_to_the_full_result(faults, experiment, state["stored"], name=name, rtol=1e-5, resumed=resumed)
    assert len(list((root / "outputs" / experiment).glob("shards/rank*.jsonl"))) == 2  # both rank counts wrote


def test_a_rank_that_hangs_stops_the_others_at_the_ddp_timeout(faults):
    """Rank 1 is stopped (SIGSTOP) mid-run: rank 0 finishes its items, waits at the merge barrier
    for the DDP timeout (``--trainer.strategy.init_args.timeout 0:00:08``), then exits 1 in one
    line. The stopped rank is then SIGKILLed, and the folder resumes."""
    state = faults["ddp_hang_state"]
    rank0, rank1 = faults["kill1"]["ddp_hang_rank0"], faults["kill1"]["ddp_hang_rank1"]
    assert rank1.fault and rank1.returncode == -signal.SIGKILL  # stopped, then killed once rank 0 was gone
    assert rank0.returncode == 1, rank0.stderr[-3000:]
    line = one_error_line(rank0)
    assert "another rank of this distributed run stopped or stopped answering" in line
    assert "Timed out" in line and "trainer.strategy.init_args.timeout" in line
    assert "run the same command again to resume" in line
    # rank 0 stops within the timeout (plus slack for a loaded machine) after its last record
    waited = rank0.ended_at - state["mtime"]["rank00000.jsonl"]
    assert waited < HANG_TIMEOUT + 20, waited
    assert rank0.ended_at - rank1.fired_at < HANG_TIMEOUT + 60
    assert state["lock_free"]
    assert "run stopped" in state["logs"]["rank0.log"]
    resumed_to_the_full_result(faults, "ddp_hang", state["stored"], rtol=1e-5)


def test_sigterm_to_a_ddp_run_stops_every_rank_cleanly_and_resumes(faults):
    """SIGTERM sent to both ranks of a 2-rank run (as scancel does): each exits 143 with one line,
    no torn line, the lock free, the reason in each rank's log; one rank resumes to the result."""
    state = faults["ddp_SIGTERM_state"]
    for rank in (0, 1):
        stopped = faults["kill1"][f"ddp_SIGTERM_rank{rank}"]
        assert stopped.fault and stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
        assert one_error_line(stopped) == ("lensbench: error: stopped by SIGTERM; the results stored so far are kept: "
                                           "run the same command again to resume")
        assert "run stopped: RunStopped: stopped by SIGTERM" in state["logs"][f"rank{rank}.log"]
    assert state["lock_free"]
    assert state["raw"] == state["stored"] and 0 < state["lines"] < 120  # no torn line, stopped mid-run
    resumed_to_the_full_result(faults, "ddp_SIGTERM", state["stored"], rtol=1e-5)


def test_sigterm_to_one_rank_stops_it_cleanly_and_the_other_at_its_next_collective(faults):
    """SIGTERM to rank 1 alone (a ``kill`` of one process): it exits 143 in its one line; rank 0
    finishes its items and exits 1 in one line at the merge barrier (the connection closed), long
    before the run's 45 s DDP timeout (Lightning's own SIGTERM handler broadcasts from rank 0 inside
    the handler, where rank 1 would wait for that timeout; lensbench drops that broadcast)."""
    state = faults["ddp_SIGTERM_rank1_state"]
    rank0, rank1 = faults["kill1"]["ddp_SIGTERM_rank1_rank0"], faults["kill1"]["ddp_SIGTERM_rank1_rank1"]
    assert rank1.fault and rank1.returncode == 128 + signal.SIGTERM, rank1.stderr[-3000:]
    assert rank1.ended_at - rank1.fired_at < 20
    assert one_error_line(rank1) == ("lensbench: error: stopped by SIGTERM; the results stored so far are kept: "
                                     "run the same command again to resume")
    assert rank0.returncode == 1, rank0.stderr[-3000:]
    line = one_error_line(rank0)
    assert "another rank of this distributed run stopped or stopped answering" in line and "Timed out" not in line
    assert rank0.ended_at - state["mtime"]["rank00000.jsonl"] < 20, "no wait for the DDP timeout"
    assert state["lock_free"] and state["raw"] == state["stored"]
    assert "run stopped: RunStopped: stopped by SIGTERM" in state["logs"]["rank1.log"]
    resumed_to_the_full_result(faults, "ddp_SIGTERM_rank1", state["stored"], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["process_group", "rank0"])
def test_sigterm_to_a_run_under_lightnings_launcher_stops_every_rank_cleanly(tmp_path, tiny_model, target):
    """The real console script with ``--trainer.devices 2``: SIGTERM to its process group (a
    terminal's ``kill -- -PGID``) or to rank 0 alone (Lightning forwards it to rank 1): each rank
    prints its one line and exits 143 (rank 1 shares rank 0's stderr: the line twice), each rank's
    log says why, the lock is free, and the folder resumes."""
    (tmp_path / "tiny").symlink_to(tiny_model)
    write_texts(tmp_path / "long.txt", 120, seed=3)
    (tmp_path / "activation_norms.yaml").write_text(_yaml(
        {"class_path": "activation_norms", "init_args": {"models": ["tiny"]}},
        {"class_path": "lensbench.data.modules.TextDataModule", "init_args": {"datasets": ["long.txt"],
                                                                               "batch_size": 1}}))
    proc = subprocess.Popen(["lensbench", *args("activation_norms", "run", "--trainer.devices", "2",
                                                "--trainer.strategy", "ddp")],
                            cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    run_dir = tmp_path / "outputs" / "run"
    at = random.Random(SEED).randrange(10, 60)
    deadline = time.time() + 200
    while time.time() < deadline and proc.poll() is None and lines(run_dir) < at:
        time.sleep(0.005)
    if target == "process_group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    found = [line for line in err.splitlines() if line.startswith("lensbench: error:")]
    assert found == ["lensbench: error: stopped by SIGTERM; the results stored so far are kept: run the same command "
                     "again to resume"] * 2, err[-3000:]
    for rank in (0, 1):
        assert "run stopped: RunStopped: stopped by SIGTERM" in (run_dir / "logs" / f"rank{rank}.log").read_text()
    assert lock_is_free(run_dir) and whole_lines(run_dir) == {p.name: p.read_bytes()
                                                              for p in run_dir.glob("shards/*.jsonl")}
    resumed = subprocess.run(["lensbench", *args("activation_norms", "run")], cwd=tmp_path, env=clean_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    found_keys = keys(run_dir)
    assert len(found_keys) == len(set(found_keys)) == 120
