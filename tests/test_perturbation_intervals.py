"""perturbation's summary.csv: the answer match and mean output length over outputs carry their
intervals (lensbench.intervals), checked against the formulas on records built here."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from lensbench.analyses.perturbation import PerturbationAnalysis, answer_match

Z = 1.959963984540054


def test_answer_match_finds_the_answer_as_a_whole_word():
    assert answer_match("The answer is 96.", "96") is True
    assert answer_match("It is 196.", "96") is False  # not inside a longer number
    assert answer_match("PARIS, of course", "Paris") is True
    assert answer_match("Parisian", "Paris") is False
    assert answer_match("it is 102", 102) is True  # a JSONL answer given as a number
    for output, expected in ((None, "1"), ("x", None), ("x", math.nan), ("x", "  "), (math.nan, "1")):
        assert answer_match(output, expected) is None


def record(level: float, repeat: int, pid: int, output: str | None, tokens: int, answer: str | None) -> dict:
    return {"model_name": "tiny", "model_label": "tiny", "name_suffix": "", "degradation_method": "mult_gauss",
            "param_group_name": "mlp_only", "level_value": level, "is_baseline": level == 0,
            "repeat_index": repeat, "prompt_group": "iq", "prompt_id": pid, "expected_answer": answer,
            "output": output, "tokens": tokens, "duration": 0.1, "weights_finite": output is not None,
            "perplexity": None, "perplexity_state": None}


def test_summary_carries_wilson_and_t_intervals(tmp_path):
    answers = ["96", "4", "102", "32", "12", None]  # the last prompt has no expected answer
    right = {0.0: [1, 1, 1, 1, 0], 0.5: [1, 0, 0, 0, 0]}
    records = []
    tokens = {}
    for level, hits in right.items():
        for repeat in (0, 1):
            for pid, answer in enumerate(answers, start=1):
                hit = pid <= 5 and hits[pid - 1] and not (level == 0.5 and repeat == 1)
                n = 3 + pid + repeat + int(level * 10)
                tokens.setdefault(level, []).append(n)
                records.append(record(level, repeat, pid, f"so it is {answer if hit else 'x'}.", n, answer))
    records.append(record(1.0, 0, 1, None, 0, "96"))  # non-finite weights: nothing generated, nothing scored
    PerturbationAnalysis.merge(records, tmp_path)
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("level_value")

    for level, k in ((0.0, 8), (0.5, 1)):
        row = summary.loc[level]
        assert row["n_scored"] == 10 and row["answer_match"] == pytest.approx(k / 10)
        p, n = k / 10, 10
        centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
        half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
        assert row["answer_match_ci_low"] == pytest.approx(centre - half, rel=1e-7)
        assert row["answer_match_ci_high"] == pytest.approx(centre + half, rel=1e-7)
        x = tokens[level]
        mean = sum(x) / len(x)
        s = math.sqrt(sum((v - mean) ** 2 for v in x) / (len(x) - 1))
        t11 = 2.200985160091639  # the 0.975 quantile of Student's t with 11 degrees of freedom
        assert row["mean_tokens"] == pytest.approx(mean)
        assert row["mean_tokens_ci_low"] == pytest.approx(mean - t11 * s / math.sqrt(12), rel=1e-7)
        assert row["mean_tokens_ci_high"] == pytest.approx(mean + t11 * s / math.sqrt(12), rel=1e-7)
    broken = summary.loc[1.0]
    assert broken["n_scored"] == 0 and math.isnan(broken["answer_match"])
    assert math.isnan(broken["answer_match_ci_low"]) and math.isnan(broken["mean_tokens_ci_low"])  # one output

    outputs = PerturbationAnalysis.plot(tmp_path)
    assert (tmp_path / "answer_match_vs_level.png") in outputs
    assert (tmp_path / "answer_match_vs_level.png").stat().st_size > 1000
