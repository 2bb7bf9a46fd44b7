"""Where a model's weights go while it loads: device_map and max_memory (checked before loading,
then turned into from_pretrained arguments with the offload folder and the quantization's), and
the hook that brings inputs to a model placed away from the rank's device.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import TYPE_CHECKING, Any

import torch

from ..errors import LensbenchError, did_you_mean
from .placed_weights import input_device
from .quantized import check_quantization, quantization, quantization_kwargs
from .sources import cache_dir

if TYPE_CHECKING:
    from .spec import ModelSpec


#: device_map strategies of transformers/accelerate (the rest of the values are devices or maps).
NAMED_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _map_device(value: Any) -> int | str | None:
    """A device of a device_map as transformers takes it (a GPU index, cuda:N, cpu, disk, ...);
    None when ``value`` is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    if re.fullmatch(r"\d+", text):
        return int(text)
    if text in ("cpu", "disk"):
        return text
    try:
        kind = torch.device(text).type
    except (RuntimeError, TypeError, ValueError):
        return None
    return text if kind in ("cuda", "mps", "xpu", "npu", "hpu") else None


def check_placement(spec: ModelSpec, field: str = "model") -> None:
    """Refuse, before any weights are read, a device_map, max_memory or quantization that cannot work."""
    dm = spec.device_map
    where = f"{field}.device_map"
    if isinstance(dm, str):
        if dm not in NAMED_MAPS and _map_device(dm) in (None, "disk"):
            raise LensbenchError(f"device_map {dm!r} is neither a strategy ({', '.join(NAMED_MAPS)}) nor a device "
                                 "(cpu, cuda:1, 0, ...) nor a map {module: device}", where)
    elif isinstance(dm, dict):
        if not dm:
            raise LensbenchError("device_map is an empty map; give every module a device, or use auto", where)
        for key, value in dm.items():
            if not isinstance(key, str):
                raise LensbenchError(f"device_map key {key!r} is not a module name (e.g. model.layers.0)", where)
            if _map_device(value) is None:
                raise LensbenchError(f"device_map gives {key!r} the device {value!r}; use a GPU index (0, 1), "
                                     "cuda:N, cpu or disk", where)
    elif dm is not None:
        raise LensbenchError(f"device_map must be a strategy ({', '.join(NAMED_MAPS)}), a device or a map "
                             f"{{module: device}}, got {dm!r}", where)
    if spec.max_memory is not None:
        mwhere = f"{field}.max_memory"
        if dm not in NAMED_MAPS:
            raise LensbenchError(f"max_memory only applies with device_map {', '.join(NAMED_MAPS)}; an explicit map "
                                 "places every module itself (set device_map: auto, or remove max_memory)", mwhere)
        if not isinstance(spec.max_memory, dict) or not spec.max_memory:
            raise LensbenchError("max_memory must be a map {device: size}, e.g. {0: 20GiB, cpu: 64GiB}", mwhere)
        from accelerate.utils import convert_file_size_to_int

        for key, value in spec.max_memory.items():
            if _map_device(key) is None:
                raise LensbenchError(f"max_memory key {key!r} is not a device; use a GPU index (0, 1), cpu or disk",
                                     mwhere)
            try:
                size = convert_file_size_to_int(value) if not isinstance(value, bool) else -1
            except (ValueError, TypeError):
                size = -1
            if size < 0:
                raise LensbenchError(f"max_memory[{key!r}] = {value!r} is not a size; give bytes or a string "
                                     "such as 20GiB or 500MB", mwhere)
    check_quantization(spec, field)


def _local_ranks() -> int:
    """How many ranks of this run share this node: torchrun's LOCAL_WORLD_SIZE, SLURM's tasks per
    node, or the WORLD_SIZE Lightning's own launcher sets (one node); 1 outside a distributed run."""
    if os.environ.get("LOCAL_WORLD_SIZE", "").isdigit():
        return max(1, int(os.environ["LOCAL_WORLD_SIZE"]))
    tasks = re.match(r"\d+", os.environ.get("SLURM_NTASKS_PER_NODE", ""))
    if tasks and "SLURM_PROCID" in os.environ:
        return max(1, int(tasks.group()))
    if "LOCAL_RANK" in os.environ and os.environ.get("WORLD_SIZE", "").isdigit() \
            and os.environ.get("NODE_RANK", "0") == "0" and "GROUP_RANK" not in os.environ:
        return max(1, int(os.environ["WORLD_SIZE"]))
    return 1


def _rank_max_memory(device: torch.device | None) -> dict[int | str, int] | None:
    """max_memory of a named device_map given none: on a CPU rank the host memory alone; on a GPU
    rank sharing its node with others, every ``local``-th GPU from its own (cuda:1 of 2 ranks on 4
    GPUs: 1 and 3) and its share of host memory; None (every visible GPU, then the CPU) otherwise."""
    if device is None:
        return None
    local = _local_ranks()
    if device.type == "cuda" and local <= 1:
        return None
    import psutil

    host = int(psutil.virtual_memory().available * 0.9) // local
    if device.type != "cuda":
        return {"cpu": host}
    count = torch.cuda.device_count()
    first = device.index if device.index is not None else torch.cuda.current_device()
    if count < local:
        raise LensbenchError(f"{local} ranks share this node's {count} GPUs, and a named device_map gives each rank "
                             "its own GPUs: run at most one rank per GPU (trainer.devices), one rank per node for "
                             "models that need several GPUs", "trainer.devices")
    group = list(range(first % local, count, local))
    return {**{g: int(torch.cuda.mem_get_info(g)[0] * 0.9) for g in group}, "cpu": host}


def _offload_folder(model_holder: list) -> str:
    """A private folder for weights accelerate writes to disk, removed with the model."""
    root = cache_dir() / "offload"
    root.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root)
    model_holder.append(folder)
    return folder


def _check_explicit_map(device_map: dict[str, Any], config: Any, auto_cls: Any, spec: ModelSpec, field: str) -> None:
    """Every key a module of the model, no key inside another, every weight given a device: checked
    on the architecture built on the meta device (transformers would put unmapped weights on the CPU)."""
    try:
        with torch.device("meta"):
            skeleton = auto_cls.from_config(config, trust_remote_code=spec.trust_remote_code)
    except Exception:  # noqa: BLE001 - an architecture that cannot be built here: transformers checks what it can
        return
    where = f"{field}.device_map"
    modules = [name for name, _ in skeleton.named_modules()]
    known = set(modules)
    for key in device_map:
        if key and key not in known:
            raise LensbenchError(f"device_map names {key!r}, which is not a module of {type(skeleton).__name__}; "
                                 f"{did_you_mean(key, modules)}", where)
    keys = sorted(device_map, key=len)
    for i, outer in enumerate(keys):
        for inner in keys[i + 1:]:
            if outer == "" or inner.startswith(outer + "."):
                raise LensbenchError(f"device_map entries {outer!r} and {inner!r} overlap; give each module one "
                                     "device (list the modules of the rest instead of \"\")", where)
    missing = [name for name in skeleton.state_dict()
               if not any(k == "" or name == k or name.startswith(k + ".") for k in device_map)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise LensbenchError(f"device_map gives no device to {missing[0]}{more}; map every module "
                             f"(e.g. {missing[0].rsplit('.', 1)[0]!r}), or use auto", where)


def placement_kwargs(spec: ModelSpec, device: torch.device | None, config: Any, auto_cls: Any, field: str,
                     cleanup: list) -> dict[str, Any]:
    """The from_pretrained arguments placing the model: device_map, max_memory, offload_folder and
    quantization_config; empty for a model loaded whole and moved to the rank's device."""
    if quantization(spec):  # placed on the rank's device while loading: the CPU when none is given
        device = device or torch.device("cpu")
    kwargs = quantization_kwargs(spec, device, field)
    dm = spec.device_map
    if dm is None:
        return kwargs
    if isinstance(dm, dict):
        dm = {key: _map_device(value) for key, value in dm.items()}
        _check_explicit_map(dm, config, auto_cls, spec, field)
        disk = "disk" in dm.values()
    elif dm in NAMED_MAPS:
        memory = spec.max_memory or _rank_max_memory(device)
        if memory is not None:
            kwargs["max_memory"] = {_map_device(k): v for k, v in memory.items()}
        disk = True  # accelerate may send what fits nowhere else to the disk
    else:
        dm = _map_device(dm)
        disk = False
    kwargs["device_map"] = dm
    if disk:
        kwargs["offload_folder"] = _offload_folder(cleanup)
    return kwargs


def align_inputs(model: torch.nn.Module, device: torch.device) -> None:
    """A model placed by a device_map takes inputs on any device and returns outputs on theirs:
    accelerate's top-level hook does that once the model spans devices; a model placed whole on one
    device other than the rank's gets such a hook here."""
    if getattr(model, "_hf_hook", None) is not None:
        return
    devices = {p.device for p in model.parameters()}
    if devices == {device} or not devices:
        return
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    add_hook_to_module(model, AlignDevicesHook(execution_device=input_device(model), io_same_device=True))
