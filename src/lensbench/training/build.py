"""Build the model a ``lensbench fit`` run trains: a transformers config (from scratch or on top of
another model's config), optional pretrained layers, and the tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import LensbenchError, did_you_mean
from ..models.embedded import embedded_smollm2_folder
from ..models.loading import ModelSpec, resolve_source
from ..models.spec import EMBEDDED


def source_folder(source: str, field: str) -> Path:
    """The local folder of a model source (embedded alias, folder, or a hub id already cached)."""
    res = resolve_source(ModelSpec(source=source), field)
    if res.kind == "embedded":
        return embedded_smollm2_folder() if res.location == "smollm2" else EMBEDDED[res.location].locate(res.location, field)
    if res.kind == "folder":
        return Path(res.location)
    if res.kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(res.location, cache_dir=res.cache_dir, local_files_only=res.local_only))
        except Exception as exc:  # network or missing-file errors of the hub client
            raise LensbenchError(f"cannot fetch {res.location!r} from the Hugging Face hub ({type(exc).__name__}); "
                                 "download it on a connected machine or give a local folder", field) from None
    raise LensbenchError(f"{source!r} is a single weights file; give a model folder (with config.json and the "
                         "tokenizer files) or an embedded alias", field)


def load_tokenizer(source: str, field: str) -> Any:
    """A fast tokenizer from a model source, a folder holding only tokenizer files, or ``chars``
    (one token per character, ``lensbench.synthetic.tokenizer``)."""
    from transformers import AutoTokenizer

    from ..synthetic.tokenizer import NAME, char_tokenizer

    if source == NAME:
        return char_tokenizer()

    plain = Path(source).expanduser()
    if plain.is_dir() and (plain / "tokenizer.json").is_file() and not (plain / "config.json").is_file():
        folder = plain
    else:
        folder = source_folder(source, field)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        raise LensbenchError(f"no usable tokenizer in {folder} ({str(exc).splitlines()[0][:120]}); give a model "
                             "folder with tokenizer.json", field) from None
    if not getattr(tok, "is_fast", False):
        raise LensbenchError(f"the tokenizer of {source!r} is not a fast tokenizer, which answer masking needs "
                             "(character offsets); give a folder with tokenizer.json", field)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def build_config(config: dict[str, Any], base_model: str | None, tokenizer: Any, field: str) -> Any:
    """A transformers config: ``base_model``'s config.json (when given) updated by ``config``;
    ``model_type`` picks the class (default ``memory_llama`` without a base); ``vocab_size``
    defaults to the tokenizer's."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    values: dict[str, Any] = {}
    if base_model is not None:
        from ..models.checkpoint import _read_config

        base = _read_config(source_folder(base_model, f"{field}.base_model"))
        if base is None:
            raise LensbenchError(f"{base_model!r} has no config.json to start from; give a model folder", f"{field}.base_model")
        values.update({k: v for k, v in base.items() if k not in ("architectures", "transformers_version", "quantization_config")})
    values.update(config or {})
    model_type = values.pop("model_type", None) or "memory_llama"
    if model_type not in CONFIG_MAPPING:
        raise LensbenchError(f"unknown model_type {model_type!r}; {did_you_mean(model_type, list(CONFIG_MAPPING.keys()))}",
                             f"{field}.config.model_type")
    values.setdefault("vocab_size", len(tokenizer))
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        values.setdefault(key, getattr(tokenizer, key))
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, TypeError) as exc:
        raise LensbenchError(f"{str(exc).splitlines()[0]}; fix it in the model config", f"{field}.config") from None


def build_model(config: Any, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)
