"""The weights of a model transformers or accelerate placed (a device map: offloaded to host memory
or disk, spread over devices) or quantized: where inputs go (``input_device``), and reading and
changing weights in place wherever they are (``editable_weights``, ``on_one_device``), as
transforms and the state manager's restores do.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..errors import LensbenchError
from .quantized import check_not_quantized


def _hooks(module: torch.nn.Module) -> list:
    """accelerate's hooks on ``module`` (a SequentialHook's members), [] when it has none."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def _split(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    module_name, _, leaf = name.rpartition(".")
    return model.get_submodule(module_name), leaf


def _offloaded(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str, Any, str] | None:
    """``(module, leaf, loader, key)`` of a parameter accelerate keeps offloaded (on the meta device,
    its values in a hook's weights map: a dict in host memory (``cpu_offload``), or an
    ``OffloadedWeightsLoader`` holding host tensors and an index of tensors on disk); None for one
    that is on a device."""
    module, leaf = _split(model, name)
    param = module._parameters.get(leaf)
    if param is None or param.device.type != "meta":
        return None
    parts = name.split(".")[:-1]
    for depth in range(len(parts), -1, -1):  # the module's own hook, else an ancestor's that places it
        owner = model.get_submodule(".".join(parts[:depth]))
        relative = ".".join([*parts[depth:], leaf])
        for hook in _hooks(owner):
            weights = getattr(hook, "weights_map", None)
            if not getattr(hook, "offload", False) or weights is None:
                continue
            loader = getattr(weights, "dataset", weights)
            key = getattr(weights, "prefix", "") + relative
            if key in _host(loader) or key in getattr(loader, "index", {}):
                return module, leaf, loader, key
    raise LensbenchError(f"{name} is on the meta device and no accelerate hook holds its values; load the model "
                         "with a device_map lensbench understands (auto, or an explicit map)")


def _host(loader: Any) -> dict:
    """The host-memory tensors of a weights map (what its hooks read first)."""
    return loader if isinstance(loader, dict) else loader.state_dict


def is_placed(model: torch.nn.Module) -> bool:
    """Whether transformers or accelerate placed ``model`` (a device map, ``cpu_offload``: weights
    possibly offloaded or spread over devices) or quantized it. A model that is neither has every
    weight, in floating point, on the one device it was moved to: the helpers below have nothing
    to do for it."""
    return (getattr(model, "hf_device_map", None) is not None or getattr(model, "hf_quantizer", None) is not None
            or getattr(model, "_hf_hook", None) is not None)  # accelerate's own cpu_offload/dispatch_model


def input_device(model: torch.nn.Module) -> torch.device:
    """The device inputs of ``model`` go to: its input embeddings' (their execution device when
    accelerate keeps them offloaded), else its first weight's."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embed, "weight", None)
    for hook in _hooks(embed) if embed is not None else []:
        if getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
    if weight is None or weight.device.type == "meta":
        weight = next((p for p in model.parameters() if p.device.type != "meta"), None)
    return weight.device if weight is not None else torch.device("cpu")


@contextlib.contextmanager
def editable_weights(model: torch.nn.Module, names: list[str]):
    """While open, the parameters ``names`` can be read and changed in place wherever they are: each
    one accelerate keeps offloaded is the very tensor its hook loads from (in host memory), so that
    changing it changes what the model computes with; a disk-offloaded one is read once into host
    memory and stays there (the hook reads its host copy first). Parameters on a device are left as
    they are. Quantized ones (load_in_4bit/load_in_8bit: not floating point) are refused."""
    if not is_placed(model):
        yield
        return
    check_not_quantized(model, names)
    swapped = []
    try:
        for name in dict.fromkeys(names):
            found = _offloaded(model, name)
            if found is None:
                continue
            module, leaf, loader, key = found
            host = _host(loader)
            if key not in host:  # on disk: from now on in host memory
                host[key] = loader[key].detach().to("cpu", copy=True)
            original = module._parameters[leaf]
            module._parameters[leaf] = torch.nn.Parameter(host[key], requires_grad=False)
            swapped.append((module, leaf, original))
        yield
    finally:
        for module, leaf, original in reversed(swapped):
            module._parameters[leaf] = original


@contextlib.contextmanager
def on_one_device(model: torch.nn.Module, names: list[str]):
    """Yield the device a transform's generator goes on: the device of the parameters ``names``
    when they share one (the CPU when there are none); else the CPU, the parameters on other
    devices being replaced by host copies while the context lasts and written back on exit. A
    transform thus draws one random stream whatever the device map. Open it inside
    ``editable_weights`` (offloaded parameters are then on the CPU)."""
    if not is_placed(model):  # every weight on one device
        yield model.get_parameter(names[0]).device if names else torch.device("cpu")
        return
    params = {}
    for name in dict.fromkeys(names):
        module, leaf = _split(model, name)
        params[name] = (module, leaf, module._parameters[leaf])
    devices = {param.device for _, _, param in params.values()}
    if len(devices) <= 1:
        yield next(iter(devices), torch.device("cpu"))
        return
    staged: dict[int, tuple[torch.Tensor, torch.nn.Parameter]] = {}
    swapped = []
    try:
        for module, leaf, original in params.values():
            if original.device.type == "cpu":
                continue
            if id(original) not in staged:
                staged[id(original)] = (original, torch.nn.Parameter(original.detach().to("cpu", copy=True),
                                                                     requires_grad=False))
            module._parameters[leaf] = staged[id(original)][1]
            swapped.append((module, leaf, original))
        yield torch.device("cpu")
    finally:
        for module, leaf, original in reversed(swapped):
            module._parameters[leaf] = original
        with torch.no_grad():
            for original, copy in staged.values():
                original.copy_(copy)
