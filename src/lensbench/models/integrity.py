"""Weights that do not match their model, and configs that cannot build one, refused in one line.

transformers loads a checkpoint missing a tensor with that tensor randomly initialised, and one
whose safetensors header calls float data integers with the integers cast to floats; it mentions
either only in its load report, if at all. ``check_loaded`` reads transformers' loading info
(missing, unexpected and mismatched tensors) and the safetensors headers (dtypes only: no data is
read) and refuses such a model in one line naming the tensors. The other helpers turn what
transformers raises for a config it rejects, for model code it will not run, and for a symlink
loop into one line each.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from lensbench.errors import LensbenchError

#: How many tensors a line names before "and N more".
SHOWN = 3
_REPORT_LOGGER = "transformers.modeling_utils"


def _listed(names: list[str]) -> str:
    names = sorted(names)
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def _shape(size: Any) -> str:
    return "x".join(str(n) for n in size) or "scalar"


def allowed_missing(allow: bool | list[str] | None, name: str) -> bool:
    """Whether the model entry's ``allow_missing_weights`` (true, or globs of parameter names)
    lets ``name`` start untrained."""
    if isinstance(allow, bool) or allow is None:
        return bool(allow)
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in allow)


def _dropped_head(model: torch.nn.Module, name: str) -> bool:
    """Whether checkpoint tensor ``name``, unexpected in ``model``, belongs to a head that a base
    model (``head: base``) leaves out: the base model's weights sit under its prefix
    (``model.``, ``bert.``) or, saved from a base model, under its own modules (``layers.``), a
    head's (``lm_head``, ``cls.``) outside both."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix or getattr(model, "base_model", None) is not model:
        return False
    return not name.startswith(prefix + ".") and name.split(".")[0] not in dict(model.named_children())


#: Buffers older transformers versions saved with the weights (GPT-2's ``attn.masked_bias`` and
#: ``attn.bias`` masks, rotary ``inv_freq``, ``position_ids``, fairseq's ``_float_tensor``): not
#: weights, rebuilt by the model, so an unexpected one is no damage.
OLD_BUFFERS = ("masked_bias", "attn.bias", "inv_freq", "position_ids", "_float_tensor")


def _old_buffer(name: str) -> bool:
    return any(name == suffix or name.endswith("." + suffix) for suffix in OLD_BUFFERS)


def check_loaded(model: torch.nn.Module, info: dict[str, Any], files: list[Path], location: str,
                 allow: bool | list[str] | None, field: str) -> list[str]:
    """Refuse, in one line, a model whose checkpoint lacks tensors it needs (unless ``allow``
    lets them start untrained), holds tensors it has no place for, holds tensors of other shapes
    than its config.json gives them, or declares integer data for its floating-point weights
    (``files``: the safetensors files read, for their headers). Returns the missing tensors that
    ``allow`` let start untrained."""
    where = f"{field}.source"
    mismatched = info.get("mismatched_keys") or ()
    if mismatched:
        shown = sorted(mismatched)[:SHOWN]
        more = f" and {len(mismatched) - SHOWN} more" if len(mismatched) > SHOWN else ""
        details = ", ".join(f"{name} ({_shape(saved)} in the checkpoint, {_shape(wanted)} by config.json)"
                            for name, saved, wanted in shown)
        raise LensbenchError(f"the weights of '{location}' do not match its config.json: {details}{more}; the "
                             "config.json is for another model (hidden_size, intermediate_size, ...) or the "
                             "checkpoint is damaged: give the config.json saved with these weights", where)
    missing = sorted(info.get("missing_keys") or ())
    refused_missing = [name for name in missing if not allowed_missing(allow, name)]
    unexpected = [name for name in info.get("unexpected_keys") or ()
                  if not _dropped_head(model, name) and not _old_buffer(name)]
    if refused_missing or unexpected:
        parts = []
        if refused_missing:
            parts.append(f"missing {_listed(refused_missing)} (transformers would start "
                         f"{'it' if len(refused_missing) == 1 else 'them'} random)")
        if unexpected:
            parts.append(f"holds {_listed(unexpected)}, which {type(model).__name__} has no place for")
        fix = "; the checkpoint is damaged or for another model: download or save it again"
        if refused_missing:
            fix += ", or set allow_missing_weights: true on the model entry if you mean to train those weights"
        raise LensbenchError(f"the weights of '{location}' do not fit {type(model).__name__}: "
                             f"{'; it '.join(parts)}{fix}", where)
    errors = info.get("error_msgs") or ()
    if errors:
        raise LensbenchError(f"the weights of '{location}' do not load into {type(model).__name__} "
                             f"({str(errors[0]).splitlines()[0][:160]}); download or save them again", where)
    check_dtypes(model, files, location, field)
    return [name for name in missing if name not in refused_missing]


#: safetensors dtypes of integer (and boolean) data.
_INTEGER_DTYPES = ("BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64")


def _parameter_for(key: str, floats: dict[str, torch.dtype]) -> str | None:
    """The parameter of the model that checkpoint tensor ``key`` loads into (its name the same, or
    the same but for a prefix: a base model's, a checkpoint saved from a base model), else None."""
    if key in floats:
        return key
    return next((name for name in floats if key.endswith("." + name) or name.endswith("." + key)), None)


def check_dtypes(model: torch.nn.Module, files: list[Path], location: str, field: str) -> None:
    """Refuse safetensors files whose header declares integer data for a weight the model holds in
    floating point: the bytes are floats read as integers (a damaged header), or quantized values
    whose config.json lacks the quantization_config that would unpack them."""
    if not files:
        return
    from safetensors import safe_open

    floats = {name: p.dtype for name, p in model.named_parameters() if p.is_floating_point()}
    lies = []
    for path in files:
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                dtype = handle.get_slice(key).get_dtype()
                if dtype in _INTEGER_DTYPES and (name := _parameter_for(key, floats)) is not None:
                    lies.append(f"{key} ({dtype}, a {str(floats[name]).replace('torch.', '')} weight)")
    if lies:
        raise LensbenchError(f"the safetensors header of '{location}' declares integer data for floating-point "
                             f"weights: {_listed(lies)}; the header is damaged, or the checkpoint is quantized and "
                             "its config.json lacks the quantization_config: download or save the weights again",
                             f"{field}.source")


def safetensors_files(folder: Path | None = None, weights_file: Path | None = None, hub: Any = None) -> list[Path]:
    """The safetensors files transformers reads for a model: ``weights_file`` itself; in a folder
    the shards its ``model.safetensors.index.json`` names, else its ``model.safetensors``;
    ``hub``, a callable taking a file name and returning a cached path or None, for a hub model."""
    if weights_file is not None:
        return [Path(weights_file)] if Path(weights_file).suffix == ".safetensors" else []

    def find(name: str) -> Path | None:
        if hub is not None:
            found = hub(name)
            return Path(found) if isinstance(found, str) else None
        path = Path(folder) / name
        return path if path.is_file() else None

    index = find("model.safetensors.index.json")
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        except (OSError, ValueError, AttributeError):
            return []  # transformers reports an unreadable index itself
        found = [find(shard) for shard in shards]
        return [path for path in found if path is not None]
    single = find("model.safetensors")
    return [single] if single is not None else []


@contextlib.contextmanager
def load_report_held():
    """While open, transformers' load report (a table of missing, unexpected and mismatched
    tensors, logged at every load that has any) is held back: ``check_loaded`` turns what it says
    into one line, or accepts it. Should loading fail otherwise, the held report is logged after all."""
    logger = logging.getLogger(_REPORT_LOGGER)
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            held.append(record)
            return False
        return True

    logger.addFilter(hold)
    try:
        yield held
    except Exception as exc:
        logger.removeFilter(hold)
        if not isinstance(exc, LensbenchError):
            for record in held:
                logger.handle(record)
        raise
    finally:
        logger.removeFilter(hold)


def config_refusal(exc: BaseException, location: str, field: str) -> LensbenchError | None:
    """One line for a config transformers refuses to build (its strict validation: a hidden size
    that is no multiple of the number of heads, ...) or whose model code it will not run without
    ``trust_remote_code``; None for any other failure."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub validates nothing
        StrictDataclassError = ()
    if isinstance(exc, StrictDataclassError):
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = lines[-1].split(": ", 1)[-1] if len(lines) > 1 else (lines or [type(exc).__name__])[0]
        return LensbenchError(f"the config.json of '{location}' is invalid: {reason.rstrip('.')}; fix that "
                              "config.json (or give the one saved with these weights)", f"{field}.source")
    if isinstance(exc, ValueError) and "trust_remote_code" in str(exc) and "custom code" in str(exc):
        return LensbenchError(f"'{location}' needs model code shipped with it (its config.json's auto_map), which "
                              "lensbench does not run unless asked: set trust_remote_code: true on the model entry, "
                              "if you trust that code", f"{field}.trust_remote_code")
    return None


def load_refusal(exc: BaseException, location: str, field: str) -> LensbenchError | None:
    """One line for what transformers raises while putting a checkpoint's tensors into the model
    (its ``Error(s) in loading state_dict``), or for model code it will not run; None otherwise."""
    refused = config_refusal(exc, location, field)
    if refused is not None or not isinstance(exc, RuntimeError) or "Error(s) in loading state_dict" not in str(exc):
        return refused
    lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    return LensbenchError(f"the weights of '{location}' do not load into the model its config.json describes "
                          f"({(lines or ['no details'])[0][:200]}); give the config.json saved with these weights, "
                          "or download or save them again", f"{field}.source")


def link_refusal(path: Path, field: str) -> LensbenchError | None:
    """One line for a source path that is a symlink loop or a link to nothing (which
    ``Path.exists`` reports as absent, and would be taken for a hub id); None otherwise."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return LensbenchError(f"'{path}' is a symlink loop (following its links leads back to them); point the "
                                  "link at a model folder or file, or give the folder itself", field)
        if os.path.islink(path):
            return LensbenchError(f"'{path}' is a symlink to '{os.readlink(path)}', which does not exist; point the "
                                  "link at a model folder or file, or give the folder itself", field)
    return None
