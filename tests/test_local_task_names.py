"""A local MTEB task (registered by a plugin, or a task folder) may not take the name of a task
MTEB knows, and each score of a local task in MTEB's result files is marked as a local task's
(docs/layer_sweep.md#task-formats, #outputs). Everything runs offline."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from test_layer_sweep_tasks import FIELD, HashedBow, folder_of, run

from lensbench.errors import LensbenchError
from lensbench.hookspecs import hookimpl
from lensbench.layer_sweep import tasks as T
from lensbench.layer_sweep.data import LayerSweepData
from lensbench.registry import Registry
from lensbench.testing import use_plugins

mteb = pytest.importorskip("mteb")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def task_plugin(name: str, *entries: T.TaskEntry) -> types.ModuleType:
    """A plugin module registering ``entries`` through ``lensbench_register_mteb_tasks``."""
    module = types.ModuleType(name)

    @hookimpl
    def lensbench_register_mteb_tasks():
        return list(entries)

    module.lensbench_register_mteb_tasks = lensbench_register_mteb_tasks
    return module


def refusal(tasks: list[str]) -> LensbenchError:
    with pytest.raises(LensbenchError) as info:
        LayerSweepData(tasks=tasks)
    assert info.value.field == FIELD and "\n" not in info.value.message
    return info.value


def test_mteb_task_names_are_read_once_per_process():
    names = T.mteb_task_names()
    assert names["banking77classification"] == "Banking77Classification" and names["sts12"] == "STS12"
    assert len(names) > 1000 and T.mteb_task_names() is names  # cached, not rebuilt
    assert not {"lensbench_topics", "lensbench_sts", "lensbench_topics_clustering"} & set(names)


def test_a_plugin_task_named_like_an_mteb_task_is_refused_naming_the_plugin(tmp_path):
    folder = folder_of("Classification", tmp_path)
    plugin = task_plugin("banking_plugin", T.TaskEntry("Banking77Classification", folder, "not MTEB's"))
    with use_plugins(plugin):
        err = refusal(["Banking77Classification"])
    assert err.message.startswith("task 'Banking77Classification' registered by plugin 'banking_plugin' "
                                  f"(folder {folder}) takes the name of an MTEB task"), err.message
    assert "read as MTEB's; rename the task in that plugin's TaskEntry" in err.message


def test_a_plugin_task_differing_from_an_mteb_name_by_case_only_is_refused(tmp_path):
    registry = Registry("MTEB task", T.TaskEntry, instances=True)
    registry.add(T.TaskEntry("sts12", folder_of("STS", tmp_path)), "my-tasks==1.0", entry_point="my_tasks")
    with pytest.raises(LensbenchError) as info:
        T.resolve_tasks(["sts12"], registry=registry)
    assert "task 'sts12' registered by plugin 'my-tasks==1.0'" in info.value.message
    assert "an MTEB task ('STS12')" in info.value.message
    assert info.value.message.endswith("or skip that plugin with LENSBENCH_BLOCK_PLUGINS=my_tasks to score MTEB's task")


def test_a_task_folder_named_like_an_mteb_task_is_refused(tmp_path):
    folder = folder_of("Classification", tmp_path).rename(tmp_path / "Banking77Classification")
    for entry in (str(folder), str(folder / "task.json")):
        err = refusal([entry])
        assert err.message == (f"task folder {entry!r} is named like an MTEB task and a folder's task takes its "
                               "folder's name, so its scores would be cached and read as MTEB's; rename the folder")


def test_the_cli_refuses_it_in_one_line_before_any_run_folder(tmp_path, tiny_model, monkeypatch, capsys):
    from lensbench.cli import main

    (tmp_path / "tiny").symlink_to(tiny_model)
    folder_of("STS", tmp_path).rename(tmp_path / "STSBenchmark")
    monkeypatch.chdir(tmp_path)
    code = main(["predict", "--model", "layer_sweep", "--model.init_args.models", "[tiny]",
                 "--data", "lensbench.layer_sweep.data.LayerSweepData", "--data.init_args.tasks", "[./STSBenchmark]",
                 "--trainer.accelerator", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        "lensbench: error: data.init_args.tasks: task folder './STSBenchmark' is named like an MTEB task and a "
        "folder's task takes its folder's name, so its scores would be cached and read as MTEB's; rename the folder")
    assert not (tmp_path / "outputs").exists()


def _result_file(cache: Path, task: str) -> dict:
    [path] = cache.rglob(f"{task}.json")
    return json.loads(path.read_text())


def test_a_task_with_its_own_name_runs_and_its_cached_scores_are_marked_local(tmp_path):
    folder = folder_of("STS", tmp_path)
    plugin = task_plugin("sts_plugin", T.TaskEntry("my_pairs", folder))
    with use_plugins(plugin):
        units = LayerSweepData(tasks=["my_pairs", str(folder)]).tasks
    assert [(u.name, u.ref.local) for u in units] == [("my_pairs", True), ("my_sts", True)]
    for unit in units:
        T.ensure_loaded(unit.ref)
        score = run(unit.ref.task, HashedBow(), tmp_path / "cache")
        stored = _result_file(tmp_path / "cache", unit.name)
        assert stored["task_name"] == unit.name and stored["dataset_revision"] == unit.ref.digest
        [subset] = stored["scores"]["test"]
        assert subset["main_score"] == pytest.approx(score, abs=1e-6)
        assert (subset["lensbench_local_task"], subset["lensbench_task_folder"], subset["lensbench_task_digest"]) == (
            True, str(folder.resolve()), unit.ref.digest)


def test_the_mark_survives_a_read_back_and_mteb_loads_the_results(tmp_path):
    [task] = T.resolve_tasks([str(folder_of("Retrieval", tmp_path))], registry=Registry("MTEB task"))
    T.ensure_loaded(task)
    cache = mteb.ResultCache(tmp_path / "cache")
    first = mteb.evaluate(HashedBow(), task.task, cache=cache, show_progress_bar=False)
    again = HashedBow(random=True)
    second = mteb.evaluate(again, task.task, cache=cache, show_progress_bar=False)  # only-missing: read back
    assert again.calls == [] and second.task_results[0].get_score() == pytest.approx(
        first.task_results[0].get_score(), abs=1e-6)
    assert second.task_results[0].scores["test"][0]["lensbench_local_task"] is True
    [loaded] = cache.load_results(require_model_meta=False, include_remote=False).model_results[0].task_results
    assert loaded.task_name == "my_retrieval" and loaded.scores["test"][0]["lensbench_local_task"] is True


def test_an_mteb_task_is_not_marked(tmp_path):
    from mteb.mocks.mock_tasks.sts import MockSTSTask

    task = MockSTSTask()
    task.load_data()
    run(task, HashedBow(), tmp_path / "cache")
    [subset] = _result_file(tmp_path / "cache", task.metadata.name)["scores"]["test"]
    assert not T.is_local(task) and not any(key.startswith("lensbench") for key in subset)


def test_a_sweep_caches_a_local_task_marked_in_its_run_folder(tmp_path, tiny_model, monkeypatch):
    from lensbench.cli import main

    (tmp_path / "tiny").symlink_to(tiny_model)
    folder = folder_of("STS", tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--model", "layer_sweep", "--model.init_args.models", "[tiny]",
                 "--model.init_args.batch_size", "8", "--data", "lensbench.layer_sweep.data.LayerSweepData",
                 "--data.init_args.tasks", "[./my_sts]", "--trainer.accelerator", "cpu",
                 "--model.init_args.experiment", "marked"]) == 0
    run_dir = tmp_path / "outputs" / "marked"
    files = sorted((run_dir / "mteb").rglob("my_sts.json"))
    assert len(files) == 3  # layers 0, 1 and 2 of the two-block model
    digest = T.resolve_tasks(["./my_sts"], registry=Registry("MTEB task"))[0].digest
    for path in files:
        [subset] = json.loads(path.read_text())["scores"]["test"]
        assert (subset["lensbench_local_task"], subset["lensbench_task_folder"], subset["lensbench_task_digest"]) == (
            True, str(folder.resolve()), digest), path
