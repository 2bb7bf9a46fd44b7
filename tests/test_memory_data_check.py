"""lensbench.memory.data_check: the training data a ``lensbench fit`` run recorded (run.json beside
its checkpoints, or a training config) against the data an analysis evaluates: options compare
with their defaults filled in, and the first field that differs is named."""

from __future__ import annotations

import json

import pytest

from lensbench.errors import LensbenchError
from lensbench.memory.data_check import check_same_data, trained_data
from lensbench.plugins import active_registries

SYNTHETIC = active_registries().synthetic_datasets


def used(**kw):
    return {"dataset": "synthetic_qa", "options": {"num_pairs": 32}, "seed": 0, "path": None, "facts": None, **kw}


def test_the_fit_record_beside_a_checkpoint_is_read_and_defaults_compare_equal(tmp_path):
    run = tmp_path / "fit"
    (run / "checkpoint-5").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"data.dataset": "synthetic_qa", "data.seed": 0, "data.path": None,
                                              "data.options.num_pairs": 32, "data.append_eos": True}))
    trained = trained_data(str(run / "checkpoint-5"), None)
    assert trained is not None and trained[1] == str(run / "run.json") and trained[0]["append_eos"] is True
    assert trained_data(str(run), None)[0] == trained[0]
    check_same_data(trained, used(options={"num_pairs": 32, "heldout_fraction": 0.1}), "data.init_args", "allow", SYNTHETIC)
    with pytest.raises(LensbenchError) as err:
        check_same_data(trained, used(options={"num_pairs": 32, "heldout_fraction": 0.2}), "data.init_args", "allow", SYNTHETIC)
    assert err.value.field == "data.init_args.options.heldout_fraction"
    with pytest.raises(LensbenchError) as err:
        check_same_data(trained, used(seed=3), "data.init_args", "allow", SYNTHETIC)
    assert err.value.field == "data.init_args.seed" and "with seed 0, this evaluation uses seed 3" in str(err.value)


def test_a_training_config_stands_in_when_no_run_records_the_data(tmp_path):
    (tmp_path / "train.yaml").write_text("data:\n  options: {num_pairs: 32}\n  seed: 2\n")
    trained = trained_data(str(tmp_path / "elsewhere"), str(tmp_path / "train.yaml"))
    assert trained[0]["dataset"] == "synthetic_qa" and trained[0]["seed"] == 2  # SyntheticTextData's default dataset
    check_same_data(trained, used(seed=2), "data.init_args", "allow", SYNTHETIC)
    with pytest.raises(LensbenchError) as err:
        check_same_data(trained, used(seed=2, dataset=None, path=str(tmp_path)), "data.init_args", "allow", SYNTHETIC)
    assert err.value.field == "data.init_args.path"
    assert trained_data(str(tmp_path / "elsewhere"), None) is None  # nothing records it: nothing to check
