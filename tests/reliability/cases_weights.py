"""Catalogue cases: weights that do not fit their model, configs transformers rejects, model code
that would run, a symlink loop. Each is one line naming the tensors, the config or the path.

The damaged copies of the tiny model are made by the helpers below (also used by
tests/test_model_integrity.py): a tensor taken out or added, a config.json of another width, a
tensor saved transposed, a safetensors header that calls float32 data int32.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

#: The tensor the damaged copies lack, transpose or mislabel.
UP = "model.layers.0.mlp.up_proj.weight"


def copy_with(tiny_model: Path, dest: Path, drop: tuple[str, ...] = (), add: dict | None = None,
              transpose: tuple[str, ...] = (), config: dict | None = None) -> Path:
    """A copy of ``tiny_model`` at ``dest`` whose weights lack ``drop``, hold ``add`` besides, hold
    ``transpose`` transposed, and whose config.json has ``config``'s values."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_model, dest, symlinks=True)
    if drop or add or transpose:
        state = load_file(dest / "model.safetensors")
        for name in drop:
            del state[name]
        for name in transpose:
            state[name] = state[name].T.contiguous()
        state.update(add or {})
        save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    if config:
        data = json.loads((dest / "config.json").read_text())
        data.update(config)
        (dest / "config.json").write_text(json.dumps(data))
    return dest


def relabel(weights: Path, name: str, dtype: str) -> Path:
    """Rewrite the safetensors header of ``weights`` so that it calls tensor ``name`` ``dtype``
    (same width: I32 for F32 data), its bytes unchanged: what a damaged header looks like."""
    raw = weights.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    header[name]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= size
    weights.write_bytes(raw[:8] + text + b" " * (size - len(text)) + raw[8 + size:])
    return weights


def with_remote_code(tiny_model: Path, dest: Path) -> Path:
    """A copy whose config.json names its own model code (auto_map, a model_type transformers
    does not know), shipped beside it as configuration_x.py and modeling_x.py."""
    copy_with(tiny_model, dest, config={"model_type": "x_llama", "architectures": ["XForCausalLM"],
                                        "auto_map": {"AutoConfig": "configuration_x.XConfig",
                                                     "AutoModelForCausalLM": "modeling_x.XForCausalLM"}})
    (dest / "configuration_x.py").write_text("from transformers import LlamaConfig\n\n\nclass XConfig(LlamaConfig):\n"
                                             "    model_type = 'x_llama'\n")
    (dest / "modeling_x.py").write_text("from transformers import LlamaForCausalLM\n\nfrom .configuration_x import "
                                        "XConfig\n\n\nclass XForCausalLM(LlamaForCausalLM):\n"
                                        "    config_class = XConfig\n")
    return dest


def damaged_models(root: Path, tiny_model: Path) -> None:
    """The folders the cases name, beside ``root/tiny``."""
    import torch

    copy_with(tiny_model, root / "w_missing", drop=(UP,))
    copy_with(tiny_model, root / "w_unexpected", add={"model.layers.0.mlp.extra_proj.weight": torch.zeros(4, 4)})
    copy_with(tiny_model, root / "w_wider", config={"hidden_size": 48})
    copy_with(tiny_model, root / "w_transposed", transpose=(UP,))
    relabel(copy_with(tiny_model, root / "w_int32") / "model.safetensors", UP, "I32")
    copy_with(tiny_model, root / "w_heads", config={"hidden_size": 640, "num_attention_heads": 9})
    with_remote_code(tiny_model, root / "w_remote")
    os.symlink("w_loop", root / "w_loop")


def _norms(model: str) -> tuple[str, ...]:
    return ("predict", "--model", "activation_norms", "--data", "lensbench.data.modules.TextDataModule",
            "--data.init_args.datasets", "[texts.txt]", "--trainer.accelerator", "cpu",
            "--model.init_args.models", f"[{model}]")


def _loop_identity(baseline: str) -> tuple[str, ...]:
    return ("predict", "--model", "loop_identity", "--model.init_args.baseline", baseline, "--model.init_args.start",
            "0", "--model.init_args.end", "1", "--model.init_args.loop_counts", "[0, 1]",
            "--data", "lensbench.data.modules.TextDataModule", "--data.init_args.datasets", "[texts.txt]",
            "--trainer.accelerator", "cpu")


#: id -> (arguments, exit code, fragment of the one line)
CASES = {
    "weights_missing_tensor": (_norms("w_missing"), 1,
                               f"models[0].source: the weights of 'w_missing' do not fit LlamaForCausalLM: missing "
                               f"{UP} (transformers would start it random)"),
    "weights_unexpected_tensor": (_norms("w_unexpected"), 1,
                                  "holds model.layers.0.mlp.extra_proj.weight, which LlamaForCausalLM has no place "
                                  "for; the checkpoint is damaged or for another model"),
    "weights_wider_config": (_norms("w_wider"), 1,
                             "the weights of 'w_wider' do not match its config.json: lm_head.weight (64x32 in the "
                             "checkpoint, 64x48 by config.json)"),
    "weights_transposed_shape": (_norms("w_transposed"), 1,
                                 f"do not match its config.json: {UP} (32x64 in the checkpoint, 64x32 by config.json)"),
    "weights_header_calls_float_int32": (_norms("w_int32"), 1,
                                         "the safetensors header of 'w_int32' declares integer data for floating-point "
                                         f"weights: {UP} (I32, a float32 weight)"),
    "config_heads_do_not_divide_width": (_norms("w_heads"), 1,
                                         "models[0].source: the config.json of 'w_heads' is invalid: The hidden size "
                                         "(640) is not a multiple of the number of attention heads (9)"),
    "loop_identity_heads_do_not_divide_width": (_loop_identity("w_heads"), 1,
                                                "the config.json of 'w_heads' is invalid: The hidden size (640) is "
                                                "not a multiple of the number of attention heads (9)"),
    "config_with_auto_map_code": (_norms("w_remote"), 1,
                                  "models[0].trust_remote_code: 'w_remote' needs model code shipped with it (its "
                                  "config.json's auto_map)"),
    "source_symlink_loop": (_norms("w_loop"), 1, "models[0].source: 'w_loop' is a symlink loop"),
}


def prepare(root: Path, tiny_model: Path, forks) -> None:
    damaged_models(root, tiny_model)
