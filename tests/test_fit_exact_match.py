"""``lensbench fit``'s exact_match.csv carries the 95% Wilson interval of each group's exact match,
and the training curves draw the validation exact match's interval."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

Z = 1.959963984540054  # the 0.975 quantile of the standard normal


def wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


class Answers(torch.nn.Module):
    """A model whose logits say, per row, whether its answer is right (``exact_answers`` reads them)."""

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=input_ids.float())


def test_exact_match_csv_carries_the_wilson_interval(monkeypatch):
    from lensbench.training import module

    # bucket 1: 7 of 10 right; bucket 2: 0 of 4; bucket 4: 5 of 5
    hits = {1: [1] * 7 + [0] * 3, 2: [0] * 4, 4: [1] * 5}
    rows = [{"bucket": b, "split": "seen", "hit": h} for b, hs in hits.items() for h in hs]
    monkeypatch.setattr(module, "exact_answers", lambda logits, labels: logits[:, 0].bool())

    def collate(chunk):
        return {"input_ids": torch.tensor([[r["hit"]] for r in chunk]), "labels": torch.zeros(len(chunk), 1)}

    table = module.exact_match_table(Answers(), rows, collate, 3, "cpu")
    assert list(table.columns) == ["group", "bucket", "split", "n", "exact_match", "exact_match_ci_low",
                                   "exact_match_ci_high"]
    table = table.set_index("bucket")
    for bucket, hs in hits.items():
        k, n = sum(hs), len(hs)
        assert (table.loc[bucket, "n"], table.loc[bucket, "exact_match"]) == (n, pytest.approx(k / n))
        low, high = wilson_by_hand(k, n)
        assert table.loc[bucket, "exact_match_ci_low"] == pytest.approx(low, abs=1e-12)
        assert table.loc[bucket, "exact_match_ci_high"] == pytest.approx(high, abs=1e-12)
    assert table.loc[1, "exact_match_ci_low"] == pytest.approx(0.396778, abs=1e-6)  # 7 of 10: (0.3968, 0.8922)
    assert table.loc[2, "exact_match_ci_low"] == 0 and table.loc[4, "exact_match_ci_high"] == 1


def test_the_curves_draw_the_validation_exact_match_with_its_wilson_band():
    import pandas as pd

    from lensbench.tables import pyplot
    from lensbench.training.curves import draw, exact_band

    metrics = pd.DataFrame({"train_loss": [3.0, 2.0, 1.0], "val_exact/bucket=1/seen": [float("nan"), 0.25, 0.75],
                            "val_n/bucket=1/seen": [float("nan"), 8.0, 8.0],
                            "val_exact/bucket=2/seen": [float("nan"), 0.5, 1.0]},  # logged without its n
                           index=pd.Index([0, 1, 2], name="step"))
    band = exact_band(metrics, "bucket=1/seen")
    assert list(band.index) == [1, 2]
    for step, k in ((1, 2), (2, 6)):
        assert (band.loc[step, "low"], band.loc[step, "high"]) == pytest.approx(wilson_by_hand(k, 8), abs=1e-12)
    assert exact_band(metrics, "bucket=2/seen") is None
    fig = draw({"run": metrics})
    exact = fig.axes[1]
    bands = exact.collections
    assert len(bands) == 1 and len(exact.get_lines()) == 2  # a band for the group whose n was logged
    ys = bands[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(wilson_by_hand(2, 8)[0]) and ys.max() == pytest.approx(wilson_by_hand(6, 8)[1])
    assert "Wilson" in exact.get_ylabel()
    pyplot().close(fig)
