"""Security promises: no code from weight files or unasked-for repositories, third-party plugins
off on request, no secret from the environment in a run folder.

(A pickled ``.bin`` carrying code is refused in one line without running it: the catalogue's
``bin_carrying_code`` cases and ``test_a_pickled_bin_runs_no_code``.)
"""

from __future__ import annotations

import shutil

import pytest
from conftest import clean_env

TOKENS = {"HF_TOKEN": "hf_fakeTOKENfor1reliability2tests", "HUGGING_FACE_HUB_TOKEN": "hf_fakeHUBtokenXYZ987",
          "LENSBENCH_TEST_SECRET": "s3cr3t-value-never-stored"}


def norms(models: str, experiment: str, *extra: str) -> tuple[str, ...]:
    return ("predict", "--model", "activation_norms", "--model.init_args.models", models,
            "--data", "lensbench.data.modules.TextDataModule", "--data.init_args.datasets", "[texts.txt]",
            "--trainer.accelerator", "cpu", "--model.init_args.experiment", experiment, *extra)


@pytest.fixture(scope="module")
def security(tmp_path_factory, tiny_model, forks):
    root = tmp_path_factory.mktemp("security")
    (root / "tiny").symlink_to(tiny_model)
    (root / "texts.txt").write_text("the cat sat on the mat\nthe dog ran to a tree\n")
    shutil.copytree(tiny_model, root / "cut")  # weights cut short: a run that fails after it started
    weights = (root / "cut" / "model.safetensors").read_bytes()
    (root / "cut" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    secret = clean_env(**TOKENS)
    results = forks.run({
        "plugins_off": {"args": ("plugins",), "cwd": root, "env": clean_env(LENSBENCH_DISABLE_PLUGIN_AUTOLOAD="1")},
        "plugins_on": {"args": ("plugins",), "cwd": root, "env": clean_env()},
        "trusted": {"args": norms("[{source: tiny, trust_remote_code: true}]", "trusted"), "cwd": root, "env": secret},
        "default": {"args": norms("[tiny]", "default"), "cwd": root, "env": secret},
        "failed": {"args": norms("[cut]", "failed"), "cwd": root, "env": secret},
        "debug": {"args": norms("[./nothing]", "debug"), "cwd": root, "env": clean_env(LENSBENCH_DEBUG="1", **TOKENS)},
    })
    return root, results


def test_trust_remote_code_is_off_unless_the_config_sets_it_and_the_log_says_when_on(security):
    root, results = security
    for name in ("trusted", "default"):
        assert results[name].returncode == 0, results[name].stderr[-3000:]
    warning = "trust_remote_code is on for 'tiny'"
    trusted_log = (root / "outputs" / "trusted" / "logs" / "rank0.log").read_text()
    assert warning in trusted_log and warning in results["trusted"].stderr
    default_log = (root / "outputs" / "default" / "logs" / "rank0.log").read_text()
    assert "trust_remote_code" not in default_log and "trust_remote_code" not in results["default"].stderr
    assert "trust_remote_code: true" not in (root / "outputs" / "default" / "config.yaml").read_text()
    assert "trust_remote_code: true" in (root / "outputs" / "trusted" / "config.yaml").read_text()


def test_transformers_is_asked_without_remote_code_by_default(tiny_model, monkeypatch):
    import transformers

    from lensbench.models.loading import ModelSpec, load_model

    seen = {}

    def spy(location, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("spied")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    with pytest.raises(RuntimeError, match="spied"):
        load_model(ModelSpec(str(tiny_model)))
    assert seen["trust_remote_code"] is False


def test_plugin_autoload_can_be_turned_off_and_plugins_says_so(security):
    _, results = security
    on, off = results["plugins_on"], results["plugins_off"]
    assert on.returncode == off.returncode == 0, off.stderr[-3000:]
    assert "plugin autoload: off" not in on.stdout
    assert "low_rank" in on.stdout  # a perturbation of the installed example plugin
    assert "plugin autoload: off (LENSBENCH_DISABLE_PLUGIN_AUTOLOAD is set)" in off.stdout.splitlines()[0]
    assert "low_rank" not in off.stdout
    example = [line for line in off.stdout.splitlines() if "lensbench-example" in line]
    assert example and all("not loaded (LENSBENCH_DISABLE_PLUGIN_AUTOLOAD)" in line for line in example)


def test_no_secret_from_the_environment_reaches_a_run_folder(security):
    root, results = security
    assert results["failed"].returncode == 1 and results["debug"].returncode != 0
    files = [p for p in (root / "outputs").rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.name == "rank0.log" for p in files)
    assert any(p.name == "run.json" for p in files)
    for path in files:
        data = path.read_bytes()
        for value in TOKENS.values():
            assert value.encode() not in data, f"{path} holds {value}"
    for result in results.values():  # nor the console, even with LENSBENCH_DEBUG=1
        for value in TOKENS.values():
            assert value not in result.stdout + result.stderr
