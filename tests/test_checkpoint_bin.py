"""pytorch_model.bin files in either torch.save format are read; anything else is one line."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from lensbench.errors import LensbenchError
from lensbench.models.checkpoint import open_checkpoint
from lensbench.models.loading import ModelSpec


def _state_dict() -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    from transformers import LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    state = {name: tensor.clone() for name, tensor in LlamaForCausalLM(config).state_dict().items()}
    return config, state


def _folder(tmp_path, legacy: bool):
    config, state = _state_dict()
    folder = tmp_path / ("legacy" if legacy else "zip")
    config.save_pretrained(folder)
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    return folder, state


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_bin_in_either_format_reads_every_tensor(tmp_path, legacy):
    folder, state = _folder(tmp_path, legacy)
    if legacy:
        head = (folder / "pytorch_model.bin").read_bytes()[:4]
        assert head != b"PK\x03\x04"  # really the legacy format, which cannot be memory-mapped
        with pytest.raises(RuntimeError):
            torch.load(folder / "pytorch_model.bin", weights_only=True, mmap=True)
    reader = open_checkpoint(ModelSpec(source=str(folder)))
    assert sorted(reader.names()) == sorted(state)
    assert reader.config["hidden_size"] == 16
    for name, tensor in state.items():
        assert reader.shape(name) == tuple(tensor.shape)
        got = reader.get(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
        got.add_(1.0)  # the caller's copy: changing it changes nothing the reader holds
        assert torch.equal(reader.get(name), tensor), name
        assert torch.equal(torch.cat(list(reader.iter_rows(name, max_bytes=64))), tensor), name


@pytest.mark.parametrize("damage", ["random", "truncated_zip", "truncated_legacy", "empty"])
def test_an_unreadable_bin_is_one_line(tmp_path, damage):
    import os

    if damage == "random":
        folder = tmp_path / "random"
        _state_dict()[0].save_pretrained(folder)
        (folder / "pytorch_model.bin").write_bytes(os.urandom(4096))
    else:
        folder, _ = _folder(tmp_path, legacy=damage == "truncated_legacy")
        path = folder / "pytorch_model.bin"
        data = path.read_bytes()
        path.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    with pytest.raises(LensbenchError) as err:
        open_checkpoint(ModelSpec(source=str(folder)))
    message = str(err.value)
    assert "\n" not in message
    assert err.value.field == "model.source"
    assert f"{folder / 'pytorch_model.bin'} is not a readable PyTorch checkpoint" in message
    assert message.endswith("re-save it with save_pretrained or as safetensors")
