"""Pooled embeddings of every requested layer from one forward pass, and the MTEB encoder that reads them.

``LayerEmbeddings`` owns one model state and one task's texts: asked for the embeddings of some
texts at one layer, it runs the model once over the texts it has not seen (``output_hidden_states``,
every layer at once), pools each requested layer (mean over non-padding tokens, first or last
non-padding token) and keeps all layers. The evaluations of the other layers then read what is
kept: a layer is never recomputed by a separate forward pass.

The state of a layer (``layer_states``, shared with the representation metrics) is, with
``final_norm`` given, the hidden state passed through the model's final norm, as in the reference
(OFSkean/information_flow, ``experiments/utils/model_definitions/text_automodel_wrapper.py``),
which loads the model cut to ``L`` blocks (``config.num_hidden_layers = L``) and takes
``hidden_states[L]``: transformers gives the last hidden state of a language model after its final
norm, so every layer of the cut model is normed. One forward pass of the whole model gives the
same: the norm applied to hidden states ``0 .. n-1``, and the model's own output (already normed)
for ``n``. Without ``final_norm`` the states are ``output_hidden_states`` as transformers gives them.

Each forward pass also counts, per layer, the texts whose pooled embedding is not finite (NaN
or inf, as a model whose weights hold NaN gives): ``nonfinite_texts(layer)``.

What is kept grows as layers x texts x width (float32). Above ``memory_limit`` bytes the kept
chunks are written to ``.npy`` files in ``spill_dir`` and read back through memory maps, so the
resident size stays below the limit plus one forward batch.

``LayerEncoder`` is an ``mteb`` encoder (``AbsEncoder``) for one layer; its ``ModelMeta`` differs
per layer, pooling and state (``experiment_kwargs``), so MTEB's result cache keeps every layer apart.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LensbenchError

POOLINGS = ("mean", "first", "last")
#: ``layer_norm`` / ``metrics_layer_norm``: the model's final norm applied to every layer, or the raw states.
LAYER_NORMS = ("final", "none")


def reference_dtype(dtype: str, device: torch.device | str) -> str:
    """The dtype the sweep loads a model in: the spec's own when it sets one (not ``auto``), else
    float16 on a CUDA device as the reference loads it (``torch_dtype=torch.float16``), float32
    elsewhere (half precision on a CPU is slow and inexact)."""
    if dtype != "auto":
        return dtype
    return "float16" if torch.device(device).type == "cuda" else "float32"


def final_norm(loaded: Any) -> tuple[str | None, torch.nn.Module | None]:
    """The qualified name and module of ``loaded``'s final norm (its anatomy's ``final_norm_name``:
    Llama's ``model.norm``, GPT-NeoX's ``gpt_neox.final_layer_norm``); ``(None, None)`` for a model
    without one (BERT)."""
    name = loaded.anatomy.final_norm_name
    return name, None if name is None else loaded.model.get_submodule(name)


def layer_states(model: torch.nn.Module, batch: Any, layers: list[int],
                 final_norm: torch.nn.Module | None = None) -> list[torch.Tensor]:
    """One forward pass of ``model`` over ``batch`` (a tokenizer's output): the ``[B, T, D]`` state
    of each of ``layers`` (indices into ``output_hidden_states``, ``0 .. n``). With ``final_norm``
    (the model's final norm module), hidden states ``0 .. n-1`` pass through it and ``n`` is the
    model's ``last_hidden_state`` (which transformers has already normed; never normed twice);
    without it, the hidden states as transformers gives them."""
    with torch.inference_mode():
        out = model(**batch, output_hidden_states=True)
        hidden = out.hidden_states
        if final_norm is None:
            return [hidden[layer] for layer in layers]
        last = len(hidden) - 1
        output = getattr(out, "last_hidden_state", None)
        if output is None or output.shape != hidden[last].shape:
            output = hidden[last]
        return [output if layer == last else final_norm(hidden[layer]) for layer in layers]


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[B, T, D]`` hidden states -> ``[B, D]``: the mean over non-padding tokens, or the first or
    last non-padding token (found from the mask, so left and right padding both work; the states at
    padding positions never enter, not even a NaN there). The mean is summed in float32 (a sum of
    float16 states over a long text overflows)."""
    mask = mask.to(hidden.device)
    if pooling == "mean":
        keep = mask.bool().unsqueeze(-1)
        return torch.where(keep, hidden.float(), 0.0).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    if pooling == "first":
        index = torch.where(mask.bool(), positions, mask.shape[1]).min(dim=1).values
    else:
        index = torch.where(mask.bool(), positions, -1).max(dim=1).values
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index.clamp(min=0)]


def text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class LayerEmbeddings:
    """Pooled embeddings of ``layers`` for any texts, each text run through the model once."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, layers: list[int], pooling: str = "mean",
                 batch_size: int = 32, max_length: int | None = None, device: Any = "cpu",
                 memory_limit: int = 2 << 30, spill_dir: Path | None = None,
                 final_norm: torch.nn.Module | None = None) -> None:
        if pooling not in POOLINGS:
            raise LensbenchError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}",
                                 "model.init_args.pooling")
        self.model = model
        self.tokenizer = tokenizer
        self.layers = list(layers)
        self.column = {layer: i for i, layer in enumerate(self.layers)}
        self.pooling = pooling
        self.final_norm = final_norm  # applied to every layer but the last (see layer_states)
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self.memory_limit = memory_limit
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.index: dict[bytes, tuple[int, int]] = {}  # text key -> (chunk, row)
        self.chunks: list[np.ndarray] = []  # [rows, len(layers), D] float32, in memory or memory-mapped
        self.resident = 0  # bytes of chunks held in memory
        self.peak_resident = 0
        self.forward_passes = 0  # batches run through the model
        self.spilled = 0  # chunks written to disk
        self.nonfinite = np.zeros(len(self.layers), dtype=np.int64)  # texts with a non-finite embedding, per layer

    @property
    def n_texts(self) -> int:
        return len(self.index)

    def nonfinite_texts(self, layer: int) -> int:
        """How many of the distinct texts embedded so far have a non-finite (NaN or inf) embedding at ``layer``."""
        return int(self.nonfinite[self.column[layer]])

    def get(self, layer: int, texts: list[str]) -> np.ndarray:
        """``[len(texts), D]`` float32 embeddings of ``texts`` at ``layer`` (computed when new)."""
        if layer not in self.column:
            raise KeyError(f"layer {layer} is not kept (kept: {self.layers})")
        self.embed(texts)
        col = self.column[layer]
        rows = [self.index[text_key(t)] for t in texts]
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        out = np.empty((len(rows), self.chunks[rows[0][0]].shape[-1]), dtype=np.float32)
        for i, (chunk, row) in enumerate(rows):
            out[i] = self.chunks[chunk][row, col]
        return out

    def embed(self, texts: list[str]) -> None:
        """Run the model over the texts not seen yet (each once), keeping every requested layer."""
        todo: dict[bytes, str] = {}
        for text in texts:
            key = text_key(text)
            if key not in self.index:
                todo.setdefault(key, text)
        pending = list(todo.items())
        for start in range(0, len(pending), self.batch_size):
            part = pending[start : start + self.batch_size]
            pooled = self._forward([t for _, t in part])  # [B, len(layers), D]
            chunk = len(self.chunks)
            self.chunks.append(pooled)
            for row, (key, _) in enumerate(part):
                self.index[key] = (chunk, row)
            self.resident += pooled.nbytes
            self.peak_resident = max(self.peak_resident, self.resident)
            if self.resident > self.memory_limit:
                self._spill()

    def _forward(self, texts: list[str]) -> np.ndarray:
        kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": True}
        if self.max_length is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        batch = self.tokenizer(texts, **kwargs).to(self.device)
        states = layer_states(self.model, batch, self.layers, self.final_norm)
        self.forward_passes += 1
        mask = batch["attention_mask"]
        pooled = torch.stack([pool(state, mask, self.pooling).float() for state in states], dim=1)
        self.nonfinite += (~torch.isfinite(pooled).all(dim=-1)).sum(dim=0).cpu().numpy()
        return pooled.cpu().numpy()

    def _spill(self) -> None:
        """Write every in-memory chunk to disk and map it back read-only."""
        if self.spill_dir is None:
            raise LensbenchError("the embeddings outgrow embedding_memory_mb and no spill folder is set",
                                 "model.init_args.embedding_memory_mb")
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        for i, chunk in enumerate(self.chunks):
            if isinstance(chunk, np.memmap):
                continue
            path = self.spill_dir / f"chunk{i:07d}.npy"
            np.save(path, chunk)
            self.chunks[i] = np.load(path, mmap_mode="r")
            self.spilled += 1
        self.resident = 0

    def close(self) -> None:
        """Drop what is kept and remove the spill files."""
        self.chunks, self.index, self.resident = [], {}, 0
        if self.spill_dir is not None and self.spill_dir.exists():
            shutil.rmtree(self.spill_dir, ignore_errors=True)


def batch_texts(batch: dict[str, Any]) -> list[str]:
    """The texts of one MTEB input batch (for a retrieval corpus MTEB has already joined each
    document's title to its body in ``text``)."""
    if "text" in batch:
        return list(batch["text"])
    raise LensbenchError(f"MTEB handed the encoder a batch without text (keys: {', '.join(batch)}); layer_sweep "
                         "scores text tasks only", "data.init_args.tasks")


def layer_meta(model_name: str, revision: str | None, layer: int, experiment: dict[str, Any], dim: int | None,
               max_tokens: int | None = None):
    """An MTEB ``ModelMeta`` naming one layer of one model state."""
    from mteb.models import ModelMeta

    name = model_name if "/" in model_name else f"lensbench/{model_name}"
    return ModelMeta(
        loader=None, name=name, revision=revision or "main", release_date=None, languages=None,
        n_parameters=None, memory_usage_mb=None, max_tokens=max_tokens, embed_dim=dim, license=None,
        open_weights=True, public_training_code=None, public_training_data=None, framework=["PyTorch"],
        similarity_fn_name="cosine", use_instructions=False, training_datasets=None,
        experiment_kwargs={"layer": layer, **experiment},
    )


def make_encoder(store: LayerEmbeddings, layer: int, meta: Any):
    """An MTEB encoder returning ``store``'s embeddings of ``layer``."""
    from mteb.models.abs_encoder import AbsEncoder

    class LayerEncoder(AbsEncoder):
        def __init__(self) -> None:
            self.model = store
            self.mteb_model_meta = meta
            self.layer = layer

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
            texts: list[str] = []
            for batch in inputs:
                texts += batch_texts(batch)
            return store.get(layer, texts)

    return LayerEncoder()
