"""The real embedded default model end to end (marked slow: about a minute on two CPU cores)."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch
from conftest import ROOT, lensbench

from lensbench.data.sources import read_texts
from lensbench.models.loading import ModelSpec, load_model
from lensbench.plugins import active_registries


@pytest.mark.slow
def test_quickstart_on_smollm2(tmp_path):
    shutil.copy(ROOT / "configs" / "activation_norms" / "quickstart.yaml", tmp_path / "quickstart.yaml")
    result = lensbench("predict", "--config", "quickstart.yaml", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "outputs" / "activation_norms" / "quickstart"
    table = pd.read_csv(run_dir / "activation_norms.csv")
    assert sorted(table["dataset"].unique()) == ["forget", "retain"]
    assert sorted(table["layer"].unique()) == list(range(31))  # embedding output + 30 blocks
    assert (run_dir / "activation_norms.png").exists() and (run_dir / "config.yaml").exists()

    # The retain rows equal a direct computation, one text at a time (no padding at all).
    loaded = load_model(ModelSpec("smollm2"))
    texts = read_texts(active_registries().datasets.get("retain").path)
    norms = []
    for text in texts:
        ids = loaded.tokenizer(text, return_tensors="pt", truncation=True, max_length=128)
        with torch.no_grad():
            hidden = loaded.model(**ids, output_hidden_states=True).hidden_states
        norms.append(torch.stack([h[0].double().norm(dim=-1) for h in hidden]))
    norms = torch.cat(norms, dim=1)  # [31, tokens]
    rows = table[table["dataset"] == "retain"].sort_values("layer")
    assert (rows["n_tokens"] == norms.shape[1]).all()
    assert torch.allclose(torch.tensor(rows["mean_norm"].values), norms.mean(dim=1), rtol=1e-4)
