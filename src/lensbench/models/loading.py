"""Load a model and its tokenizer (and processor) from an embedded alias, a local folder/file, a
GGUF file or a hub id: ``ModelSpec`` (a model entry of a config), ``resolve_source`` (every check
made before weights are read), ``load_model`` and the ``LoadedModel`` it returns.

Every bad input is reported early, before any weights are read, as a one-line ``LensbenchError``;
errors of transformers while loading are translated into one line here too. Where the files are:
models/sources.py; where the weights go: models/placement.py and models/quantized.py.
"""

from __future__ import annotations

import re
import shutil
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LensbenchError
from ..transforms import check_transforms
from .embedded import embedded_smollm2_folder
from .integrity import check_loaded, config_refusal, load_refusal, load_report_held, safetensors_files
from .placed_weights import input_device, is_placed
from .placement import align_inputs, check_placement, placement_kwargs
from .quantized import quant_method, quantization
from .sources import DTYPES, HEADS, ResolvedSource, locate_source, offline_error
from .spec import EMBEDDED, ModelSpec

#: What other modules import from here.
__all__ = ["LoadedModel", "ModelSpec", "load_model", "resolve_source", "takes_images"]


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
    return locate_source(spec, field)


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
    kwargs.update(placement_kwargs(spec, device, config, auto_cls, field, folders))
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
            raise offline_error(res.location, field) from exc
        raise LensbenchError(f"model {res.location!r} could not be loaded from the Hugging Face hub "
                             f"({text.splitlines()[0][:160]}); check the hub id and revision, or set source to a "
                             f"local folder", f"{field}.source") from exc
    model.eval().requires_grad_(False)
    if spec.device_map is None and quantization(spec) is None:
        model.to(device)
    else:  # placed while loading: not moved to the rank's device
        align_inputs(model, device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = padding_side
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, label=spec.label(), processor=processor,
                       config_field=field)
