"""Quantized models: the load_in_4bit/load_in_8bit settings (checked before loading, turned into
transformers' BitsAndBytesConfig) and what tells quantized weights apart (``quant_method``,
``loaded_in_4bit``, ``check_not_quantized``: transforms cannot change packed values).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

import torch

from ..errors import LensbenchError
from .sources import DTYPES

if TYPE_CHECKING:
    from .spec import ModelSpec


_QUANT_FIELDS = ("load_in_4bit", "load_in_8bit")


#: The first bitsandbytes release that quantizes and multiplies on a CPU (its torch-operator backends).
BNB_CPU = "0.46"


def _bitsandbytes_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return "(not installed)"


def _bitsandbytes_on_cpu() -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(_bitsandbytes_version()) >= Version(BNB_CPU)
    except InvalidVersion:
        return False


def quantization(spec: ModelSpec) -> str | None:
    """The quantization field that is on (load_in_4bit or load_in_8bit), else None."""
    return next((name for name in _QUANT_FIELDS if getattr(spec, name, False)), None)


def check_quantization(spec: ModelSpec, field: str = "model") -> None:
    """Refuse, before any weights are read, load_in_4bit and load_in_8bit together, or either without
    the bitsandbytes package."""
    if spec.load_in_4bit and spec.load_in_8bit:
        raise LensbenchError("load_in_4bit and load_in_8bit are both on; choose one", f"{field}.load_in_8bit")
    quant = quantization(spec)
    if quant and importlib.util.find_spec("bitsandbytes") is None:
        raise LensbenchError(f"{quant} needs the bitsandbytes package, which is not installed; install it with: "
                             f"pip install 'bitsandbytes>={BNB_CPU}' (or set it to false)", f"{field}.{quant}")


def quantization_kwargs(spec: ModelSpec, device: torch.device, field: str) -> dict[str, Any]:
    """The from_pretrained arguments quantizing the model while loading on ``device`` (the rank's):
    quantization_config, and a device_map placing it there unless the spec has its own; empty
    without load_in_4bit/load_in_8bit."""
    quant = quantization(spec)
    if not quant:
        return {}
    if device.type not in ("cuda", "cpu") or (device.type == "cpu" and not _bitsandbytes_on_cpu()):
        raise LensbenchError(f"{quant} needs a CUDA GPU, or bitsandbytes {BNB_CPU} or newer on a CPU, and this "
                             f"rank runs on {device} with bitsandbytes {_bitsandbytes_version()}; set "
                             f"trainer.accelerator: gpu, upgrade bitsandbytes, or set {quant} to false",
                             f"{field}.{quant}")
    from transformers import BitsAndBytesConfig

    compute = DTYPES[spec.dtype] or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = BitsAndBytesConfig(load_in_4bit=spec.load_in_4bit, load_in_8bit=spec.load_in_8bit,
                                bnb_4bit_compute_dtype=compute)
    kwargs: dict[str, Any] = {"quantization_config": config}
    if spec.device_map is None:  # quantized weights are placed while loading, not moved afterwards
        kwargs["device_map"] = {"": "cpu" if device.type == "cpu" else
                                device.index if device.index is not None else torch.cuda.current_device()}
    return kwargs


def _quantized(param: torch.Tensor) -> bool:
    """Whether ``param`` holds quantized values rather than weights: an integer tensor, a float of
    fewer than 16 bits (float8 and float4 kinds, whose scales are kept elsewhere), or a bitsandbytes
    parameter (``Params4bit`` packs its 4-bit values into whatever dtype ``bnb_4bit_quant_storage``
    names, float32 or bfloat16 included)."""
    return not param.is_floating_point() or param.dtype.itemsize < 2 or hasattr(param, "quant_state") or \
        type(param).__name__ in ("Params4bit", "Int8Params")


def quant_method(quantization_config: Any) -> str | None:
    """The ``quant_method`` of a ``quantization_config`` (a config.json's mapping or transformers'
    object, whose value is an enum) as a string: bitsandbytes, gptq, gguf, ...; None without one."""
    if not quantization_config:
        return None
    method = quantization_config.get("quant_method") if isinstance(quantization_config, dict) else \
        getattr(quantization_config, "quant_method", None)
    return str(getattr(method, "value", method) or "quantized")


def loaded_in_4bit(model: torch.nn.Module) -> bool:
    """Whether ``model``'s weights are quantized to 4 bits: loaded with ``load_in_4bit`` or from a
    checkpoint saved in 4 bits (its config's ``quantization_config``)."""
    config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    return bool(getattr(config, "load_in_4bit", False))


def check_not_quantized(model: torch.nn.Module, names: list[str], field: str | None = None) -> None:
    """Refuse, in one line, parameters ``names`` that are quantized (load_in_4bit/load_in_8bit, or a
    checkpoint saved quantized): transforms cannot change them."""
    if getattr(model, "hf_quantizer", None) is None:
        return
    for name in dict.fromkeys(names):
        module_name, _, leaf = name.rpartition(".")
        param = model.get_submodule(module_name)._parameters.get(leaf)
        if param is not None and _quantized(param):
            dtype = str(param.dtype).replace("torch.", "")
            if getattr(model.hf_quantizer, "pre_quantized", False):  # the checkpoint itself is quantized
                how = f"saved quantized: {quant_method(getattr(model.hf_quantizer, 'quantization_config', None))}"
                fix = "perturb a float checkpoint of the model"
            else:
                bits = "4" if "4bit" in type(param).__name__.lower() or param.dtype == torch.uint8 else "8"
                how, fix = f"load_in_{bits}bit", "load the model without quantization to perturb it"
            raise LensbenchError(f"{name} is quantized ({dtype}, {how}): transforms cannot change it; {fix}, or "
                                 "choose a group of float weights (norms, embeddings)", field)
