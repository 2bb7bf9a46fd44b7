"""The reliability catalogue: bad inputs and environments, each answered with one line naming what
is wrong and how to fix it, a non-zero exit, no traceback, and the run folder left as it was.

One table of cases, run through the real console script (concurrently). Each case: the command
line, the expected exit code, a fragment of the expected line, and the folder whose files must be
unchanged byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import clean_env
from helpers_cli import run_many, snapshot

NORMS = ("predict", "--model", "activation_norms", "--data", "lensbench.data.modules.TextDataModule",
         "--data.init_args.datasets", "[texts.txt]", "--trainer.accelerator", "cpu")


def norms(model: str, *extra: str) -> tuple[str, ...]:
    return (*NORMS, "--model.init_args.models", f"[{model}]", *extra)


#: id -> (arguments, exit code, fragment of the one line)
CASES = {
    "config_json_without_model_type": (norms("notype"), 1,
                                       "model.source: the config.json of 'notype' has no model_type transformers knows"),
    "safetensors_cut_short": (norms("cut"), 1, "are not readable safetensors"),
    "safetensors_header_cut": (norms("cuthead"), 1, "invalid header length"),
    "output_dir_not_creatable": (norms("tiny", "--model.init_args.output_dir", "/proc/lensbench/nope"), 1,
                                 "model.init_args.output_dir: cannot create the run folder"),
    "misspelled_analysis_flag": (("predict", "--model", "activation_normz"), 1,
                                 "model: unknown analysis 'activation_normz'; did you mean 'activation_norms'"),
    "missing_model_folder": (norms("./no/such/model"), 1, "does not exist"),
    "non_utf8_texts": (("predict", "--model", "activation_norms", "--model.init_args.models", "[tiny]",
                        "--data", "lensbench.data.modules.TextDataModule", "--data.init_args.datasets", "[latin1.txt]",
                        "--trainer.accelerator", "cpu"), 1, "is not UTF-8 text"),
    "empty_text_file": (("predict", "--model", "activation_norms", "--model.init_args.models", "[tiny]",
                         "--data", "lensbench.data.modules.TextDataModule", "--data.init_args.datasets", "[empty.txt]",
                         "--trainer.accelerator", "cpu"), 1, "holds no text"),
    "batch_size_zero": (norms("tiny", "--data.init_args.batch_size", "0"), 1, "data.init_args.batch_size"),
    "unknown_fit_dataset": (("fit", "--config", "train.yaml", "--data.dataset", "two_hops"), 1,
                            "did you mean 'two_hop'"),
    "memory_layer_outside_the_model": (("fit", "--config", "train.yaml", "--model.config.memory_layers", "[7]"), 1,
                                       "outside the model"),
    "memory_ablation_without_memory": (("predict", "--model", "memory_ablation", "--model.init_args.model", "tiny",
                                        "--model.init_args.interventions",
                                        '[{transform: mask_memory_keys, params: {layer: 0}, vary: slots, values: [[1]]}]',
                                        "--data", "lensbench.data.answers.AnswerDataModule",
                                        "--data.init_args.dataset", "null", "--data.init_args.facts", "texts.txt",
                                        "--trainer.accelerator", "cpu"), 1, "layer 0 is not a memory layer"),
    "pipeline_unknown_key": (("pipeline", "--config", "bad_pipeline.yaml"), 1, "unknown key 'other'; did you mean 'others'"),
    "tokenizer_missing": (norms("notok"), 1, "no usable tokenizer"),
    "shard_with_a_corrupt_middle_line": (norms("tiny", "--data.init_args.batch_size", "1"), 1,
                                         "rank00000.jsonl:2 is corrupt (not a torn last line)"),
    "folder_of_another_analysis": (("predict", "--model", "loop_identity", "--model.init_args.baseline", "tiny",
                                    "--model.init_args.start", "0", "--model.init_args.end", "0",
                                    "--data", "lensbench.data.modules.TextDataModule",
                                    "--data.init_args.datasets", "[texts.txt]", "--trainer.accelerator", "cpu"), 1,
                                   "holds results of a different configuration"),
    "mismatched_checkpoints": (("predict", "--model", "param_diff", "--data", "lensbench.data.checkpoints.CheckpointPairs",
                                "--data.init_args.base", "tiny", "--data.init_args.others", "[gpt2]",
                                "--trainer.accelerator", "cpu"), 1, "compare checkpoints of one architecture"),
}
#: Cases that run in a folder holding a finished run (made first): it must stay byte for byte.
PREPARED = ("shard_with_a_corrupt_middle_line", "folder_of_another_analysis")


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("catalogue")
    (root / "tiny").symlink_to(tiny_model)
    shutil.copytree(tiny_model, root / "notype")
    config = json.loads((root / "notype" / "config.json").read_text())
    config.pop("model_type")
    (root / "notype" / "config.json").write_text(json.dumps(config))
    weights = (tiny_model / "model.safetensors").read_bytes()
    for name, data in (("cut", weights[: len(weights) // 2]), ("cuthead", weights[:50])):
        shutil.copytree(tiny_model, root / name)
        (root / name / "model.safetensors").write_bytes(data)
    (root / "texts.txt").write_text("the cat sat on the mat\nthe dog ran to a tree\n")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "empty.txt").write_text("\n\n")
    (root / "train.yaml").write_text(
        "model:\n  tokenizer: chars\n  config: {model_type: memory_llama, hidden_size: 16, intermediate_size: 16, "
        "num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1, memory_layers: [1], memory_n_keys: 4, "
        "memory_heads: 1, memory_topk: 2, memory_k_dim: 8}\n"
        "data:\n  dataset: synthetic_qa\n  options: {num_pairs: 4, buckets: [1, 2]}\n"
        "trainer: {max_steps: 1, accelerator: cpu}\n")
    (root / "bad_pipeline.yaml").write_text("base: tiny\nother: [tiny]\n")
    shutil.copytree(tiny_model, root / "notok", ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)).save_pretrained(root / "gpt2")
    from conftest import lensbench

    for case in PREPARED:  # a finished activation_norms run in the folder each of these cases uses
        done = lensbench(*norms("tiny", "--data.init_args.batch_size", "1", "--model.init_args.experiment", case),
                         cwd=root, env=clean_env())
        assert done.returncode == 0, done.stderr[-2000:]
    shard = root / "outputs" / "shard_with_a_corrupt_middle_line" / "shards" / "rank00000.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text(lines[0] + '{"key": "half a rec\n' + "".join(lines[1:]))
    # a finished run whose folder every case must leave alone
    (root / "outputs" / "kept").mkdir(parents=True)
    (root / "outputs" / "kept" / "run.json").write_text('{"kept": true}')
    before = snapshot(root / "outputs")
    # each case in its own run folder: they run at the same time, and a run folder is locked
    results = run_many({cid: ((*args, "--model.init_args.experiment", cid) if "--model" in args else args, root,
                              clean_env()) for cid, (args, _, _) in CASES.items()})
    return root, before, results


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_case_is_one_line_and_changes_nothing_stored(catalogue, case):
    root, before, results = catalogue
    _, code, fragment = CASES[case]
    result = results[case]
    lines = [line for line in result.stderr.splitlines() if line.startswith("lensbench: error:")]
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(lines) == 1 and fragment in lines[0], result.stderr[-2000:]
    after = snapshot(root / "outputs")
    assert {k: v for k, v in after.items() if k.startswith("kept/")} == {k: v for k, v in before.items()
                                                                          if k.startswith("kept/")}
    if case in PREPARED:  # the finished run it met is left byte for byte
        mine = {k: v for k, v in before.items() if k.startswith(case + "/")}
        assert mine and {k: v for k, v in after.items() if k.startswith(case + "/")} == mine


def test_debug_shows_the_traceback(tmp_path):
    from conftest import lensbench

    result = lensbench("predict", "--model", "activation_normz", cwd=tmp_path, env=clean_env(LENSBENCH_DEBUG="1"))
    assert result.returncode != 0 and "Traceback" in result.stderr and "LensbenchError" in result.stderr


def test_an_environment_failure_is_one_line(tmp_path, monkeypatch, capsys):
    """A failure of the machine (here a read-only folder) is one line, without a traceback."""
    from lensbench import cli

    def refuse(argv):
        raise PermissionError(13, "Permission denied", str(tmp_path / "outputs"))

    monkeypatch.setattr(cli, "run_predict", refuse)
    monkeypatch.delenv("LENSBENCH_DEBUG", raising=False)
    assert cli.main(["predict", "--config", "x.yaml"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"lensbench: error: Permission denied: {tmp_path / 'outputs'}; check the permissions of that path "
                   "(LENSBENCH_DEBUG=1 shows the traceback)")
    if os.name == "posix":
        monkeypatch.setenv("LENSBENCH_DEBUG", "1")
        with pytest.raises(PermissionError):
            cli.main(["predict", "--config", "x.yaml"])


def test_a_run_that_stored_nothing_leaves_no_identity_behind(catalogue):
    """A model that does not load fails after the run folder was made: its run.json is removed, so
    the same command with the model fixed is not refused as a different configuration."""
    root, _, results = catalogue
    for case in ("config_json_without_model_type", "safetensors_cut_short", "safetensors_header_cut"):
        folder = root / "outputs" / case
        assert results[case].returncode == 1
        assert not (folder / "run.json").exists(), case
    from conftest import lensbench

    shutil.rmtree(root / "notype")
    (root / "notype").symlink_to(root / "tiny")  # the fix: a model that loads, under the same name
    fixed = lensbench(*norms("notype", "--model.init_args.experiment", "config_json_without_model_type"), cwd=root,
                      env=clean_env())
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert (root / "outputs" / "config_json_without_model_type" / "activation_norms.csv").is_file()
