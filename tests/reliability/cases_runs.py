"""Catalogue cases of run folders: experiment names that would write outside ``output_dir`` or
into a user's folder, and run folder files that are damaged (``run.json``, a shard line, a
``config.yaml`` that ``lensbench plot`` or ``lensbench report`` reads), and a run's config.yaml rerun after the plugin
whose class it names was uninstalled."""

from __future__ import annotations

import json
from pathlib import Path

NORMS = ("predict", "--model", "activation_norms", "--data", "lensbench.data.modules.TextDataModule",
         "--data.init_args.datasets", "[texts.txt]", "--trainer.accelerator", "cpu", "--model.init_args.models",
         "[tiny]")
#: The settings of the finished run each prepared case meets (see test_catalogue's fixture).
PREPARED_RUN = (*NORMS, "--data.init_args.batch_size", "1")

CASES = {
    "experiment_into_a_user_folder": ((*NORMS, "--model.init_args.experiment", "userdir"), 1,
                                      "model.init_args.experiment: outputs/userdir is not a lensbench run folder "
                                      "(it holds config.yaml, notes.txt); lensbench writes only into a folder it "
                                      "made or an empty one"),
    "experiment_into_another_tools_run_json": ((*NORMS, "--model.init_args.experiment", "sacred"), 1,
                                               "model.init_args.experiment: outputs/sacred is not a lensbench run "
                                               "folder (it holds cout.txt, run.json)"),
    "experiment_climbs_out": ((*NORMS, "--model.init_args.experiment", "../proj"), 1,
                              "model.init_args.experiment: '../proj' climbs out of output_dir with '..'"),
    "experiment_climbs_out_twice": ((*NORMS, "--model.init_args.experiment", "a/../../x"), 1,
                                    "model.init_args.experiment: 'a/../../x' climbs out of output_dir"),
    "experiment_absolute": ((*NORMS, "--model.init_args.experiment", "/nonexistent-lensbench/run"), 1,
                            "model.init_args.experiment: '/nonexistent-lensbench/run' is an absolute path"),
    "experiment_is_output_dir": ((*NORMS, "--model.init_args.experiment", "."), 1,
                                 "model.init_args.experiment: '.' names output_dir itself"),
    "pipeline_into_a_user_folder": (("pipeline", "--config", "user_pipeline.yaml"), 1,
                                    "experiment: outputs/userdir is not a lensbench run folder"),
    "run_json_cut_short": (PREPARED_RUN, 1, "run_json_cut_short/run.json is damaged (cut short)"),
    "run_json_a_list": (PREPARED_RUN, 1, "run_json_a_list/run.json is damaged (a JSON list, not an object)"),
    "shard_line_without_key": (PREPARED_RUN, 1, "rank00000.jsonl:2 is corrupt (not a record with a key)"),
    # a finished run's config.yaml naming a plugin's analysis or data module, rerun once it is uninstalled
    "rerun_of_an_uninstalled_plugins_analysis": (
        ("predict", "--config", "outputs/rerun_of_an_uninstalled_plugins_analysis/config.yaml"), 1,
        ("model.class_path: `gone_plugin.Norms` cannot be imported (No module named 'gone_plugin'): is the plugin "
         "that provides it installed? (`lensbench plugins` lists what is)")),
    "rerun_of_an_uninstalled_plugins_data": (
        ("predict", "--config", "outputs/rerun_of_an_uninstalled_plugins_data/config.yaml"), 1,
        ("data.class_path: `gone_plugin.Texts` cannot be imported (No module named 'gone_plugin'): is the plugin "
         "that provides it installed?")),
    "plot_config_malformed": (("plot", "badyaml"), 1, "badyaml/config.yaml is damaged (not YAML at line 3)"),
    "plot_config_a_list": (("plot", "listyaml"), 1, "listyaml/config.yaml is damaged (a YAML list"),
    "report_config_malformed": (("report", "badyaml"), 1, "badyaml/config.yaml is damaged (not YAML at line 3)"),
    "report_folder_without_config": (("report", "analysisrun", "nowhere", "-o", "outputs/both.html"), 1,
                                     "nowhere has no config.yaml; give the output folder of a lensbench run"),
    "plot_a_fit_folder": (("plot", "fitrun"), 1, "fitrun is a training run (lensbench fit), which has no figures"),
    "plot_fit_runs_with_an_analysis_run": (("plot", "fitrun", "analysisrun", "--out", "outputs/both.png"), 1,
                                           "analysisrun is not a training run (lensbench fit); plot draws several "
                                           "runs on one figure only for training runs"),
}
PREPARED = ("run_json_cut_short", "run_json_a_list", "shard_line_without_key",
            "rerun_of_an_uninstalled_plugins_analysis", "rerun_of_an_uninstalled_plugins_data")
#: In the config.yaml of those two prepared runs: a built-in's class path -> the plugin's that was uninstalled.
GONE = {"rerun_of_an_uninstalled_plugins_analysis": ("lensbench.analyses.activation_norms.ActivationNorms",
                                                     "gone_plugin.Norms"),
        "rerun_of_an_uninstalled_plugins_data": ("lensbench.data.modules.TextDataModule", "gone_plugin.Texts")}
#: The user's folders the experiment cases point at stay byte for byte.
KEEPS = {"experiment_into_a_user_folder": ("outputs/userdir",), "experiment_into_another_tools_run_json": ("outputs/sacred",), "experiment_climbs_out": ("proj",),
         "pipeline_into_a_user_folder": ("outputs/userdir",)}


def prepare(root: Path, tiny_model: Path, forks) -> None:
    for folder in (root / "outputs" / "userdir", root / "proj"):
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text("precious\n")
        (folder / "notes.txt").write_text("mine\n")
    (root / "outputs" / "sacred").mkdir()  # another tool's run folder: a run.json, but no .lock
    (root / "outputs" / "sacred" / "run.json").write_text('{"experiment": {"name": "mine"}}')
    (root / "outputs" / "sacred" / "cout.txt").write_text("mine\n")
    (root / "user_pipeline.yaml").write_text("base: tiny\nothers: [tiny]\nexperiment: userdir\n")
    run = root / "outputs" / "run_json_cut_short" / "run.json"
    run.write_bytes(run.read_bytes()[: len(run.read_bytes()) // 2])
    (root / "outputs" / "run_json_a_list" / "run.json").write_text("[]")
    shard = root / "outputs" / "shard_line_without_key" / "shards" / "rank00000.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text(lines[0] + json.dumps({"state": "x"}) + "\n" + "".join(lines[1:]))
    for case, (builtin, gone) in GONE.items():
        config = root / "outputs" / case / "config.yaml"
        text = config.read_text()
        assert f"class_path: {builtin}\n" in text
        config.write_text(text.replace(f"class_path: {builtin}\n", f"class_path: {gone}\n"))
    for name, text in (("badyaml", "model:\n  class_path: [activation_norms\n"), ("listyaml", "- a\n- b\n"),
                       ("fitrun", "model:\n  tokenizer: chars\n  config: {model_type: memory_llama}\n"),
                       ("analysisrun", "model:\n  class_path: activation_norms\n")):
        (root / name).mkdir()
        (root / name / "config.yaml").write_text(text)
    (root / "fitrun" / "lightning").mkdir()
