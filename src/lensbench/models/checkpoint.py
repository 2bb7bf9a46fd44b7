"""Read a checkpoint one tensor at a time, whatever its format.

``open_checkpoint(spec)`` returns a ``CheckpointReader`` over: a folder of safetensors files (one
or many shards, with or without their index), a single ``.safetensors`` file, a folder of
``pytorch_model*.bin`` shards, a ``.gguf`` file (de-quantized tensor by tensor and renamed to the
transformers names), an embedded alias, or a hub id already in the Hugging Face cache.
``CheckpointReader`` may also hold tensors in memory (``lensbench.data.checkpoints.perturbed_reader``:
a model moved to a perturbed state, compared with its checkpoint without a copy on disk).

Memory stays near one tensor: a safetensors tensor is read from its byte range (found in the
header, parsed once) straight into its own memory, and ``.bin`` shards are memory-mapped
(``torch.load(mmap=True, weights_only=True)``) for each read only, because a mapping kept open
accumulates every page ever touched in the process's resident memory. A ``.bin`` file in
PyTorch's legacy (non-zip) format cannot be memory-mapped: it is loaded once without mmap
(``weights_only=True`` still) and the whole file then sits in memory while the reader lives.
A ``.bin`` file that is not a PyTorch checkpoint at all (truncated, corrupt) is refused with one line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LensbenchError
from ..logs import console
from .embedded import embedded_smollm2_folder
from .loading import ModelSpec, resolve_source
from .spec import EMBEDDED

BIN_PATTERNS = ("pytorch_model*.bin", "model*.bin")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def pin_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Serve allocations above ``nbytes`` by mmap and return them to the OS when freed.

    glibc raises its mmap threshold after large blocks are freed, so later tensors of the same
    size come from the heap, which fragments and keeps several freed tensors resident. Pinning the
    threshold (which also stops that adjustment) keeps streaming reads at about one tensor at a
    time. Returns False where there is no glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False


@dataclass
class CheckpointReader:
    """Lazy access to the tensors of one checkpoint: ``names()``, ``shape()``, ``get()``."""

    label: str
    location: str  # what it reads, for messages
    config: dict[str, Any] | None  # config.json (or the GGUF metadata turned into one)
    _index: dict[str, tuple[str, Any]] = field(default_factory=dict, repr=False)  # name -> (kind, where)
    _shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    _gguf: Any = field(default=None, repr=False)

    def names(self) -> list[str]:
        return list(self._index)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``, materialised in memory on the CPU, in its stored dtype."""
        kind, where = self._index[name]
        if kind == "memory":  # a copy: the caller may change it in place
            return where.clone()
        if kind == "safetensors":
            return _read_safetensors(where, name)
        if kind == "bin":
            state, _ = _load_bin(Path(where))
            tensor = state[name].clone()
            del state
            return tensor
        return self._gguf.get(name)

    def iter_rows(self, name: str, max_bytes: int = 1 << 22):
        """The tensor ``name`` in consecutive blocks of rows of at most ``max_bytes`` each
        (read piece by piece from safetensors files; other formats yield the whole tensor)."""
        kind, where = self._index[name]
        if kind == "safetensors":
            yield from _iter_safetensors_rows(where, name, max_bytes)
        elif kind == "memory" and where.dim() > 0:  # views of the tensor held: no copy
            row_bytes = max(1, where[0].numel() * where.element_size())
            step = max(1, max_bytes // row_bytes)
            for row in range(0, where.shape[0], step):
                yield where[row : row + step]
        else:
            yield self.get(name)


ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _safetensors_header(path: Path) -> dict[str, tuple[torch.dtype, list[int], int]]:
    """name -> (dtype, shape, first byte in the file) for every tensor, from the header alone."""
    import json as _json
    import struct

    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = _json.loads(fh.read(size))
            fh.seek(0, 2)
            end = fh.tell()
        header.pop("__metadata__", None)
        entries = {name: (ST_DTYPES[e["dtype"]], e["shape"], 8 + size + e["data_offsets"][0])
                   for name, e in header.items()}
        last = max((8 + size + e["data_offsets"][1] for e in header.values()), default=8 + size)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise LensbenchError(f"{path} is not a readable safetensors file (its header is cut short or corrupt); "
                             "download or save it again", "model.source") from None
    if end < last:
        raise LensbenchError(f"{path} is cut short ({end} of {last} bytes, a partial download?); download or save "
                             "it again", "model.source")
    return entries


def _fill(fh, tensor: torch.Tensor, path: str, name: str) -> torch.Tensor:
    view = tensor.reshape(-1).view(torch.uint8).numpy()
    if view.size and fh.readinto(view) != view.size:
        raise LensbenchError(f"{path} is truncated at tensor {name!r}; copy the checkpoint again")
    return tensor


def _read_safetensors(where: tuple, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, read straight into its own memory.

    The header (parsed once, when the checkpoint is opened) gives the tensor's byte range;
    ``readinto`` fills a fresh tensor from the file, so no mapping of the file and no second copy
    is ever resident (a memory map's touched pages count as this process's memory until closed).
    """
    path, dtype, shape, first = where
    with open(path, "rb") as fh:
        fh.seek(first)
        return _fill(fh, torch.empty(shape, dtype=dtype), path, name)


def _iter_safetensors_rows(where: tuple, name: str, max_bytes: int):
    path, dtype, shape, first = where
    with open(path, "rb") as fh:
        if not shape:
            fh.seek(first)
            yield _fill(fh, torch.empty(shape, dtype=dtype), path, name)
            return
        row_bytes = max(1, math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size())
        step = max(1, max_bytes // row_bytes)
        for row in range(0, shape[0], step):
            rows = min(step, shape[0] - row)
            fh.seek(first + row * row_bytes)
            yield _fill(fh, torch.empty([rows, *shape[1:]], dtype=dtype), path, name)


def _safetensors_entries(files: list[Path]) -> tuple[dict, dict]:
    index, shapes = {}, {}
    for path in files:
        for name, (dtype, shape, first) in _safetensors_header(path).items():
            index[name] = ("safetensors", (str(path), dtype, shape, first))
            shapes[name] = tuple(shape)
    return index, shapes


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format starts as a zip archive


def _load_bin(path: Path, field: str | None = None) -> tuple[dict[str, Any], bool]:
    """The state dict of a ``torch.save``d file and whether it is memory-mapped.

    The zip format is memory-mapped (pages come from the file as tensors are touched); the legacy
    format (``_use_new_zipfile_serialization=False``), or a zip file mmap fails on, is loaded
    without mmap, wholly into memory. Both with ``weights_only=True``: no code in the file runs.
    Anything else is one ``LensbenchError`` naming the file.
    """
    with open(path, "rb") as fh:
        zipped = fh.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    state, mapped = None, False
    if zipped:
        try:
            state, mapped = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True), True
        except Exception:  # noqa: BLE001 - retried without mmap below, which reports the failure
            state = None
    if state is None:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises several types for unreadable files
            raise LensbenchError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: truncated, "
                                 "corrupt, or holding more than tensors); re-save it with save_pretrained or as "
                                 "safetensors", field) from None
    if not isinstance(state, dict):
        raise LensbenchError(f"{path} holds a {type(state).__name__}, not a state dict of tensors; re-save it with "
                             "save_pretrained or as safetensors", field)
    return state, mapped


def _bin_entries(files: list[Path], field: str | None = None) -> tuple[dict, dict]:
    """Names and shapes of ``.bin`` shards. Memory-mappable (zip) shards are indexed by file and
    re-opened at each read; legacy-format shards are kept loaded (their tensors stay in memory)."""
    index, shapes = {}, {}
    for path in files:
        state, mapped = _load_bin(path, field)
        if not mapped:
            console.info(f"lensbench: {path} is in PyTorch's legacy (non-zip) format, which cannot be "
                         "memory-mapped: it is held in memory whole; re-save it with save_pretrained to stream it")
        for name, tensor in state.items():
            if isinstance(tensor, torch.Tensor):
                index[name] = ("bin", str(path)) if mapped else ("memory", tensor)
                shapes[name] = tuple(tensor.shape)
        del state
    return index, shapes


def _read_config(folder: Path) -> dict[str, Any] | None:
    path = folder / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _folder_reader(label: str, folder: Path, field: str) -> CheckpointReader:
    shards = sorted(folder.glob("*.safetensors"))
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():  # only the shards the index names
        weight_map = json.loads(index_file.read_text())["weight_map"]
        shards = sorted({folder / f for f in weight_map.values()})
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise LensbenchError(f"{folder} lacks shards named by its index: {', '.join(missing[:3])}; "
                                 "copy the complete checkpoint", field)
    if shards:
        index, shapes = _safetensors_entries(shards)
    else:
        bins = sorted({p for pattern in BIN_PATTERNS for p in folder.glob(pattern)})
        if not bins:
            raise LensbenchError(f"{folder} holds no *.safetensors or pytorch_model*.bin files; "
                                 "give a folder written by save_pretrained", field)
        index, shapes = _bin_entries(bins, field)
    return CheckpointReader(label, str(folder), _read_config(folder), index, shapes)


class _Flat:
    """A model seen without its children: transformers' GGUF name map then runs once, not per module."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.config = model.config
        self._names = model.state_dict()

    def state_dict(self) -> dict:
        return self._names

    def named_children(self):
        return iter(())


class _GGUFTensors:
    """De-quantizes one GGUF tensor at a time and gives it its transformers name and layout."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, load_gguf_checkpoint, read_field)

        self.reader = GGUFReader(str(path))
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
        self.config_dict = dict(parsed.get("config", {}))
        config = AutoConfig.for_model(**self.config_dict)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
        arch = read_field(self.reader, "general.architecture")[0]
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=self.config_dict)
        self.mapping = get_gguf_hf_weights_map(_Flat(meta), self.processor)
        self.config = config.to_dict()
        self.tensors = {self.mapping[t.name]: t for t in self.reader.tensors if t.name in self.mapping}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def get(self, name: str) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        tensor = self.tensors[name]
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = self.processor.process(weights=weights, name=tensor.name, tensor_key_mapping=self.mapping,
                                        parsed_parameters={"config": self.config_dict, "tensors": {}})
        return torch.from_numpy(np.array(result.weights, copy=True)).reshape(self.shape(name))


def _gguf_reader(label: str, path: Path, field: str | None = None) -> CheckpointReader:
    try:
        tensors = _GGUFTensors(path)
    except Exception as exc:  # noqa: BLE001 - gguf and transformers raise several types for a bad file
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise LensbenchError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {detail}; cut short by a "
                             "partial download?); download or convert it again", field) from None
    index = {name: ("gguf", None) for name in tensors.tensors}
    shapes = {name: tensors.shape(name) for name in tensors.tensors}
    return CheckpointReader(label, str(path), tensors.config, index, shapes, tensors)


def open_checkpoint(spec: ModelSpec, field: str = "model") -> CheckpointReader:
    """A lazy reader of ``spec``'s tensors; one-line errors for sources that cannot be read."""
    if getattr(spec, "transforms", None):
        raise LensbenchError("are not applied to weights read from a checkpoint's files; compare with a perturbed "
                             "entry ({perturbation, level, param_group}) instead, or drop transforms",
                             f"{field}.transforms")
    res = resolve_source(spec, field)
    label = spec.label()
    if res.kind == "embedded":
        folder = embedded_smollm2_folder() if res.location == "smollm2" else EMBEDDED[res.location].locate(
            res.location, f"{field}.source")
        return _folder_reader(label, Path(folder), f"{field}.source")
    if res.kind == "gguf":
        return _gguf_reader(label, Path(res.location) / res.gguf_file, f"{field}.source")
    if res.kind == "safetensors":
        index, shapes = _safetensors_entries([Path(res.weights_file)])
        return CheckpointReader(label, str(res.weights_file), _read_config(Path(res.location)), index, shapes)
    if res.kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(res.location, revision=spec.revision, cache_dir=res.cache_dir,
                                       local_files_only=res.local_only)
        except Exception as exc:  # network or missing-file errors of the hub client
            raise LensbenchError(f"cannot fetch {res.location!r} from the Hugging Face hub ({type(exc).__name__}); "
                                 "download it on a connected machine or give a local folder", f"{field}.source") from None
        if spec.gguf_file:
            return _gguf_reader(label, Path(folder) / spec.gguf_file, f"{field}.source")
        return _folder_reader(label, Path(folder), f"{field}.source")
    return _folder_reader(label, Path(res.location), f"{field}.source")
