"""Batched generation with left padding, out-of-memory back-off kept for the run and memory-aware
batch sizes (``Batching``), and perplexity (torchmetrics)."""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .errors import LensbenchError
from .logs import run_log

# A child of Lightning's logger, so that its messages print like Lightning's own, on every rank.
log = logging.getLogger("lightning.pytorch.lensbench")

DEFAULT_PERPLEXITY_TEXT = "The quick brown fox jumps over the lazy dog."
"""The sentence scored when perplexity names neither a text nor a file (the seed's perplexity_text)."""


@dataclass
class GenerationSettings:
    """How outputs are generated."""

    max_new_tokens: int = 64
    """Most tokens generated per prompt."""
    do_sample: bool = True
    """Sample (True) or decode greedily (False; bit-identical reruns)."""
    temperature: float = 1.0
    """Sampling temperature (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest token set with this probability mass (0 < top_p <= 1)."""
    max_batch_size: int = 8
    """Most prompts per generate call; halved and retried on a CUDA out-of-memory error, and the size
    that worked kept for the rest of the run (per state and prompt length class)."""
    chat_template: bool | None = None
    """Wrap prompts in the tokenizer's chat template; default: when the tokenizer has one."""
    max_input_length: int = 512
    """Prompts without a picture are truncated to this many tokens (prompts with one never are)."""
    images: str = "auto"
    """Pictures of prompts that have one: auto (shown to a vision-language model; a text-only model
    gets the text alone, recorded as image_used false), always (a text-only model is an error) or
    never (text alone for every model)."""
    memory_grow_below: float = 0.40
    """GPU only: after an out-of-memory back-off, a shorter length class starts at the size that
    worked for the longer one and doubles (up to max_batch_size) after each batch that kept memory
    use below this fraction of the GPU's memory (the seed's 40%; 0: never grows)."""
    memory_warn_above: float = 0.90
    """GPU only: warn once in the run log when a batch's peak memory use passes this fraction (the
    seed's 90%)."""
    memory_stop_above: float = 0.95
    """GPU only: stop the run, results saved, when a batch's peak memory use passes this fraction
    (the seed's 95%; 1: never stops)."""


@dataclass
class PerplexitySettings:
    """Perplexity of the perturbed model, once per (level, repetition)."""

    text: str | None = None
    """A sentence to score; with neither text nor file, "The quick brown fox jumps over the lazy dog."
    Give text or file, not both."""
    file: str | None = None
    """A UTF-8 text file, or a registered dataset (retain, forget), scored whole: token-weighted
    over windows of max_length tokens. Give text or file, not both."""
    max_length: int = 512
    """Window length in tokens."""


#: Config fields giving the positions a model reads (its context), the first one set wins.
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_bounded: set[tuple] = set()  # (field, value, context) already warned about in this process


def model_positions(model) -> tuple[int, str] | None:
    """The model's context in tokens and the config field giving it (of the text model, for a
    vision-language one); None when its config names none (then nothing is bounded)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in CONTEXT_FIELDS:
        for cfg in (text, config):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, name
    return None


def within_context(value: int, limit: int | None, field: str, where: tuple[int, str] | None, what: str) -> int:
    """``value`` or, when it exceeds ``limit`` (derived from the model's context ``where``), ``limit``,
    with one warning (console and run log) per field, value and context: a setting beyond the
    context would otherwise run past the model's positions (for 1e9 new tokens, until killed)."""
    if limit is None or where is None or value <= limit:
        return value
    key = (field, value, where)
    if key not in _bounded:
        _bounded.add(key)
        source = f"config {where[1]}" if where[1] in CONTEXT_FIELDS else where[1]
        line = f"lensbench: {field} {value} goes beyond the model's context ({where[0]} tokens, {source}): {what}"
        log.warning(line)
        run_log.warning(line)
    return limit


#: transformers' ``model_max_length`` when a tokenizer does not set it (a huge placeholder).
UNSET_MODEL_MAX_LENGTH = 10**9


def model_context(loaded) -> int | None:
    """Tokens the model reads at once: the tokenizer's ``model_max_length`` when it is set (not
    transformers' huge placeholder), else the model config's ``max_position_embeddings`` (of its
    text model, for vision-language models); None when neither says (no truncation)."""
    limit = getattr(loaded.tokenizer, "model_max_length", None)
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < UNSET_MODEL_MAX_LENGTH:
        return limit
    config = getattr(loaded.model, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(text_config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) and not isinstance(positions, bool) and positions > 0 else None


def length_limit(max_length: int | None, loaded, field: str) -> tuple[int | None, str]:
    """An analysis's truncation length for ``loaded``'s texts and what sets it: ``max_length``, or
    the model's context (``model_context``: the tokenizer's ``model_max_length``, else the
    config's ``max_position_embeddings``) when ``max_length`` is null or goes beyond it (then with
    one warning naming ``field``); ``(None, "context")`` when neither is known."""
    context = model_context(loaded)
    if max_length is None:
        return context, "context"
    if context is None or max_length <= context:
        return max_length, "max_length"
    within_context(max_length, context, field, (context, "the tokenizer's model_max_length or config "
                                                         "max_position_embeddings"), f"texts are cut at {context} tokens")
    return context, "context"


def set_all_seeds(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every GPU) generators."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def build_inputs(tokenizer, prompts: list[str], use_chat: bool | None, processor=None,
                 image: bool = False) -> tuple[list[str], bool]:
    """The texts to encode and whether the chat template (which holds the special tokens) was used.

    With a processor the template is the processor's and each message's content is a list of parts
    (a picture placeholder first when ``image``); without a template a picture is marked by the
    processor's image placeholder before the prompt.
    """
    templater = processor if getattr(processor, "chat_template", None) is not None else tokenizer
    chat = getattr(templater, "chat_template", None) is not None if use_chat is None else use_chat
    if not chat:
        if image:
            mark = getattr(processor, "boi_token", None) or getattr(processor, "image_token", None)
            return [f"{mark}\n{p}" for p in prompts], False
        return list(prompts), False

    def message(text: str) -> list[dict]:
        if templater is tokenizer:
            return [{"role": "user", "content": text}]
        return [{"role": "user", "content": [*([{"type": "image"}] if image else []), {"type": "text", "text": text}]}]

    return [templater.apply_chat_template(message(p), tokenize=False, add_generation_prompt=True) for p in prompts], True


@dataclass
class Generated:
    output: str
    tokens: int  # generated tokens up to and including the first end-of-sequence token
    duration: float  # seconds of the generate call that produced it
    batch_size: int  # prompts in that call
    seed: int  # the seed every generator was given before that call (its first prompt's)
    peak_memory: int | None = None  # bytes of CUDA memory allocated at that call's peak (None off CUDA)
    max_new_tokens: int | None = None  # the call's limit: the setting, or less where the context ends first


class GenerationStopped(LensbenchError):
    """Generation stopped before the GPU ran out of memory; ``results`` holds those of the prompts
    done before the stop (the first ``len(results)`` prompts), for the caller to save."""

    def __init__(self, message: str, field: str | None, results: list[Generated]) -> None:
        super().__init__(message, field)
        self.results = results


MemoryProbe = Callable[[], tuple[int, int]]
"""A function returning ``(free, total)`` bytes of the generating device's memory."""

_DEFAULT = object()


def default_memory_probe(device: torch.device) -> MemoryProbe | None:
    """``(free, total)`` of a CUDA device as this process can use it: ``torch.cuda.mem_get_info``'s
    free memory plus the blocks PyTorch holds cached but unallocated, within the cap of
    ``torch.cuda.set_per_process_memory_fraction`` when one is set. None on other devices."""
    if device.type != "cuda":
        return None
    if device.index is None:  # "cuda": the current device (the per-process cap is read per index)
        device = torch.device("cuda", torch.cuda.current_device())

    def probe() -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device)
        cached = reserved - torch.cuda.memory_allocated(device)
        get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        fraction = get_fraction(device) if get_fraction is not None else 1.0
        if fraction < 1:
            total = int(fraction * total)
            free = min(free, max(0, total - reserved))
        return free + cached, total

    return probe


def length_class(tokens: int) -> int:
    """Prompts' padded length rounded up to a power of two: batch sizes are remembered per class."""
    return 1 << max(0, tokens - 1).bit_length()


class Batching:
    """Batch sizes of ``generate`` for a whole run, keyed by (model state, length class, max_new_tokens).

    - **Out-of-memory memory.** A call that fails with an out-of-memory error is retried with half
      the batch size; the size is then kept for that key for the rest of the run, so later batches
      start there (``max_batch_size: 64`` capped by memory at 16 fails twice in a run, not twice per
      batch). It also bounds longer length classes. Larger sizes are tried again only for a shorter
      class: starting from the size of the nearest longer class, doubled after each full batch that
      kept memory use below ``memory_grow_below`` (every full batch when there is no memory probe),
      up to ``max_batch_size``.
    - **Memory readings** (``memory_probe``, by default on CUDA: :func:`default_memory_probe`):
      after each call, the fraction of the device's memory in use at the call's peak (the
      probe's used memory plus what the call allocated at its peak above what stays allocated).
      Above ``memory_warn_above`` the run log warns once; above ``memory_stop_above``
      :class:`GenerationStopped` is raised, carrying the results so far.

    ``key`` of :meth:`size` and friends is the model state (any hashable). :meth:`encodings`
    keeps each prompt's token ids across calls (the same prompts are generated in every state).
    """

    def __init__(self, settings: GenerationSettings, device: torch.device | str = "cpu",
                 memory_probe: MemoryProbe | None = _DEFAULT) -> None:  # type: ignore[assignment]
        self.settings = settings
        self.max = max(1, settings.max_batch_size)
        self.device = torch.device(device)
        self.probe = default_memory_probe(self.device) if memory_probe is _DEFAULT else memory_probe
        self._limits: dict[tuple, dict[int, int]] = {}  # (key, new tokens) -> {class: size kept after OOM}
        self._grown: dict[tuple, dict[int, int]] = {}  # (key, new tokens) -> {class: size reached}
        self._encodings: dict[tuple, dict[str, list[int]]] = {}
        self._encoder: tuple = (None, None)  # the (tokenizer, processor) the encodings are theirs
        self.out_of_memory = 0  # out-of-memory errors caught in the run
        self.warned = False

    def size(self, key, new_tokens: int, lclass: int) -> int:
        """The batch size to use for prompts of length class ``lclass``."""
        limits = self._limits.get((key, new_tokens), {})
        if lclass in limits:
            return limits[lclass]
        cap = min([s for c, s in limits.items() if c < lclass], default=self.max)  # longer needs no less
        grown = self._grown.get((key, new_tokens), {}).get(lclass)
        if grown is not None:
            return min(grown, cap)
        longer = [c for c in limits if c > lclass]
        return min(cap, limits[min(longer)]) if longer else cap

    def failed(self, key, new_tokens: int, lclass: int, size: int) -> int:
        """Record an out-of-memory error at ``size``; the size to retry with."""
        self.out_of_memory += 1
        new = max(1, size // 2)
        limits = self._limits.setdefault((key, new_tokens), {})
        limits[lclass] = min(limits.get(lclass, new), new)
        self._grown.get((key, new_tokens), {}).pop(lclass, None)
        return new

    def worked(self, key, new_tokens: int, lclass: int, size: int, full: bool, used: float | None) -> None:
        """After a call that worked at ``size`` (``full``: it had that many prompts), with memory
        use ``used`` (a fraction at its peak, None without a probe): grow where allowed."""
        if lclass in self._limits.get((key, new_tokens), {}):
            return  # a size that failed for this class is never tried again
        low = used is None if self.probe is None else (used is not None and used < self.settings.memory_grow_below)
        grown = self._grown.setdefault((key, new_tokens), {})
        grown[lclass] = 2 * size if full and low else size

    def encodings(self, tokenizer, processor) -> dict[tuple, dict[str, list[int]]]:
        """Prompt -> token ids of this tokenizer and processor (emptied when they change)."""
        if self._encoder[0] is not tokenizer or self._encoder[1] is not processor:
            self._encoder, self._encodings = (tokenizer, processor), {}
        return self._encodings

    def reading(self) -> tuple[float, int] | None:
        """``(used fraction, total bytes)`` at the peak of the call just made, or None without a probe."""
        if self.probe is None:
            return None
        free, total = self.probe()
        used = total - free
        if self.device.type == "cuda":  # what the call held at its peak beyond what stays allocated
            used += max(0, torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device))
        return used / max(total, 1), total


def generate(model, tokenizer, prompts: list[str], settings: GenerationSettings, seed: int | list[int],
             device: torch.device, images: list | None = None, processor=None,
             batching: Batching | None = None, key=None) -> list[Generated]:
    """Generate for every prompt in chunks of at most ``max_batch_size``, backing off on out-of-memory.

    ``seed`` seeds every generator before each generate call: one int for all calls, or one per
    prompt (a call is seeded with its first prompt's), so that with ``max_batch_size: 1`` every
    prompt's sample depends only on its own seed, however the run was batched, sharded or resumed.
    Each result carries the seed its call really used (``Generated.seed``).

    ``batching`` holds the batch sizes across calls (a run's :class:`Batching`; a fresh one for
    this call when None), ``key`` the model state they are kept for. Each out-of-memory back-off
    is logged at INFO on the console logger (``lightning.pytorch.lensbench``), each call at INFO in
    the run log only (``lensbench.run``: its batch size and, on CUDA, its peak memory). When memory
    use passes ``memory_stop_above``, :class:`GenerationStopped` is raised after the call, with the
    results so far.

    ``images`` gives each prompt a picture (a PIL image) or None; pictures go through ``processor``
    (a vision-language model's), and a chunk holds consecutive prompts showing the same picture.
    """
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
    images = list(images) if images is not None else [None] * len(prompts)
    if any(img is not None for img in images) and processor is None:
        raise ValueError("prompts with pictures need the model's processor")
    batching = batching if batching is not None else Batching(settings, device)
    context = model_positions(model)
    asked = settings.max_input_length
    if context is not None and asked > context[0] - 1:  # prompts cut so that one new token fits
        settings = replace(settings, max_input_length=context[0] - 1)
    rows = _token_rows(tokenizer, processor, prompts, images, settings, batching.encodings(tokenizer, processor))
    if settings.max_input_length < asked and any(len(r["input_ids"]) >= settings.max_input_length for r in rows):
        within_context(asked, settings.max_input_length, "model.init_args.generation.max_input_length", context,
                       f"prompts longer than {settings.max_input_length} tokens are cut there")
    lengths = [len(r["input_ids"]) for r in rows]
    new_tokens = settings.max_new_tokens
    dtype = next(model.parameters()).dtype
    eos = _eos_ids(model, tokenizer)
    cuda = device.type == "cuda"
    out: list[Generated] = []
    start = 0
    while start < len(prompts):
        group_end = start + 1  # a chunk shows one picture (or none)
        while group_end < len(prompts) and images[group_end] is images[start]:
            group_end += 1
        size, end, lclass = batching.max, start, 0
        while True:  # the largest chunk its own length class allows
            end = min(start + size, group_end)
            lclass = length_class(max(lengths[start:end]))
            allowed = batching.size(key, new_tokens, lclass)
            if allowed >= end - start:
                size = allowed
                break
            size = allowed
        if images[start] is None:
            batch = _pad_left(rows[start:end], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
        else:
            batch = _encode(tokenizer, processor, prompts[start:end], images[start], settings, device, dtype)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        chunk_settings = settings
        if context is not None:
            room = max(1, context[0] - batch["input_ids"].shape[1])
            chunk_settings = replace(settings, max_new_tokens=within_context(
                settings.max_new_tokens, room, "model.init_args.generation.max_new_tokens", context,
                "generation stops where prompt and new tokens fill the context"))
        try:
            chunk = _generate_chunk(model, tokenizer, batch, chunk_settings, seeds[start], end - start, eos)
        except torch.OutOfMemoryError:
            if end - start == 1:
                raise
            chunk = None
        if chunk is None:  # out of the except block: the failed call's tensors are freed
            del batch
            if cuda:
                torch.cuda.empty_cache()
            new = batching.failed(key, new_tokens, lclass, size)
            log.info(f"lensbench: batch size {size} -> {new} after CUDA out-of-memory "
                     f"({end - start} prompts in the failed call)")
            continue
        reading = batching.reading()
        batching.worked(key, new_tokens, lclass, size, full=end - start == size,
                        used=None if reading is None else reading[0])
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        for g in chunk:
            g.peak_memory = peak
        memory = ""
        if peak is not None:
            memory += f", peak {peak / 2**30:.2f} GiB allocated"
        if reading is not None:
            memory += f", {reading[0]:.0%} of {reading[1] / 2**30:.2f} GiB in use at its peak"
        run_log.info(f"generated {end - start} prompts (batch size {size}) of length class {lclass} in "
                     f"{chunk[0].duration:.2f} s{memory}")
        out += chunk
        start = end
        if reading is None:
            continue
        used, total = reading
        s = settings
        if used > s.memory_stop_above and s.memory_stop_above < 1:
            raise GenerationStopped(
                f"stopped before the GPU runs out of memory: {used:.0%} of its {total / 2**30:.1f} GiB was in use at "
                f"the peak of a batch of {end - start} prompts (memory_stop_above: {s.memory_stop_above}); the results "
                "so far are saved: rerun to resume, with a lower max_batch_size or more free GPU memory",
                "model.init_args.generation.max_batch_size", out)
        if used > s.memory_warn_above and s.memory_warn_above < 1 and not batching.warned:
            batching.warned = True
            run_log.warning(f"GPU memory high: {used:.0%} of {total / 2**30:.1f} GiB in use at the peak of a batch "
                            f"of {end - start} prompts (memory_warn_above: {s.memory_warn_above}; the run stops above "
                            f"memory_stop_above: {s.memory_stop_above})")
    return out


def _token_rows(tokenizer, processor, prompts, images, settings: GenerationSettings, cache: dict):
    """Each prompt's token ids (and the other fields the tokenizer gives), unpadded, tokenized once
    per run (``cache``); for a prompt with a picture, those of its text (for its length class:
    the processor encodes it with the picture when its chunk is generated)."""
    keys = [(p, img is not None, settings.chat_template, settings.max_input_length) for p, img in zip(prompts, images)]
    for image in (False, True):
        todo = [i for i, k in enumerate(keys) if k[1] == image and k not in cache]
        if not todo:
            continue
        texts, chat = build_inputs(tokenizer, [prompts[i] for i in todo], settings.chat_template, processor, image)
        enc = tokenizer(texts, truncation=not image, max_length=settings.max_input_length if not image else None,
                        add_special_tokens=not chat)
        for j, i in enumerate(todo):
            cache[keys[i]] = {k: list(v[j]) for k, v in enc.items()}
    return [cache[k] for k in keys]


def _pad_left(rows: list[dict[str, list[int]]], pad_id: int | None) -> dict[str, torch.Tensor]:
    """The rows as one left-padded batch, as ``tokenizer(texts, padding=True)`` with left padding."""
    width = max(len(r["input_ids"]) for r in rows)
    if pad_id is None and any(len(r["input_ids"]) < width for r in rows):
        raise ValueError("prompts of different lengths need a padding token; the tokenizer has none")
    batch = {}
    for name in rows[0]:
        fill = pad_id if name == "input_ids" else 0
        batch[name] = torch.tensor([[fill] * (width - len(r[name])) + r[name] for r in rows], dtype=torch.long)
    return batch


def _encode(tokenizer, processor, prompts: list[str], image, settings: GenerationSettings, device, dtype):
    tokenizer.padding_side = "left"
    texts, chat = build_inputs(tokenizer, prompts, settings.chat_template, processor, image is not None)
    if image is None:
        return tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                         max_length=settings.max_input_length, add_special_tokens=not chat).to(device)
    # Never truncated: a cut would split the picture's tokens.
    batch = processor(text=texts, images=[[image] for _ in texts], return_tensors="pt", padding=True,
                      add_special_tokens=not chat)
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def _generate_chunk(model, tokenizer, batch, settings: GenerationSettings, seed: int, n: int,
                    eos: set[int]) -> list[Generated]:
    set_all_seeds(seed)
    kwargs = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample,
              "pad_token_id": tokenizer.pad_token_id}
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    width = batch["input_ids"].shape[1]
    begin = time.perf_counter()
    with torch.inference_mode():
        sequences = model.generate(**batch, **kwargs)
    new = sequences[:, width:].cpu()  # the one wait for the device (it ends the timing, as a synchronize would)
    duration = time.perf_counter() - begin
    # tokens up to and including the first end-of-sequence token, found for all rows at once
    no_eos = torch.zeros_like(new, dtype=torch.bool)
    hits = torch.isin(new, torch.tensor(sorted(eos), dtype=new.dtype)) if eos else no_eos
    counts = torch.where(hits.any(1), hits.int().argmax(1) + 1, new.shape[1]).tolist()
    texts = tokenizer.batch_decode([row[:k] for row, k in zip(new.tolist(), counts)], skip_special_tokens=True)
    return [Generated(text, k, duration, n, seed, max_new_tokens=settings.max_new_tokens)
            for text, k in zip(texts, counts)]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if isinstance(ids, list) else [ids]
    return {i for i in [*ids, tokenizer.eos_token_id] if i is not None}


# Positions per torchmetrics update: bounds the float64 copy of the logits (positions x vocabulary).
PERPLEXITY_CHUNK = 128


def _perplexity_metric(device: torch.device | None = None):
    """An empty ``torchmetrics.text.Perplexity`` with float64 states (float32 on MPS, which has no
    float64), never synchronised across processes: each rank scores its own states."""
    from torchmetrics.text import Perplexity

    dtype = torch.float32 if device is not None and device.type == "mps" else torch.float64
    metric = Perplexity(sync_on_compute=False, compute_with_cache=False).set_dtype(dtype)
    return metric.to(device) if device is not None else metric


def perplexity_state(model, tokenizer, text: str, max_length: int, device: torch.device) -> dict[str, float]:
    """The torchmetrics Perplexity state of ``text``: ``{"total": summed next-token negative
    log-likelihood (nats), "count": predicted tokens}``, over consecutive windows of max_length tokens.

    Each window predicts its tokens 2..n from the ones before (no padding, so no ignore_index);
    the logits are cast to float64 before torchmetrics' softmax, so that tokens a damaged model
    gives a probability below float32's range still count with their finite likelihood.
    """
    metric = _perplexity_metric(device)
    dtype = metric.total_log_probs.dtype
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    for start in range(0, len(ids), max_length):
        window = ids[start : start + max_length].to(device)
        if len(window) < 2:
            continue
        with torch.inference_mode():
            logits = model(input_ids=window[None]).logits
        for lo in range(0, len(window) - 1, PERPLEXITY_CHUNK):
            hi = min(lo + PERPLEXITY_CHUNK, len(window) - 1)
            metric.update(logits[:, lo:hi].to(dtype), window[None, lo + 1 : hi + 1])
    return {"total": float(metric.total_log_probs), "count": int(metric.count)}


def pooled_perplexity(states: list[dict[str, float]]) -> float:
    """The perplexity of one or more Perplexity states pooled: each state rebuilt as a torchmetrics
    Perplexity and combined with ``Metric.merge_state``, i.e. ``exp(sum total / sum count)``.
    NaN when no token was scored."""
    metrics = []
    for state in states:
        metric = _perplexity_metric()
        metric.merge_state({"total_log_probs": torch.tensor(float(state["total"]), dtype=torch.float64),
                            "count": torch.tensor(float(state["count"]), dtype=torch.float64)})
        metrics.append(metric)
    if not metrics:
        return math.nan
    pooled = metrics[0]
    for other in metrics[1:]:
        pooled.merge_state(other)
    if float(pooled.count) == 0:
        return math.nan
    with warnings.catch_warnings():  # merged states count no update() call; the states are complete
        warnings.filterwarnings("ignore", message=r".*called before the ``update`` method")
        return float(pooled.compute())


def perplexity(model, tokenizer, text: str, max_length: int, device: torch.device) -> float:
    """exp(mean next-token negative log-likelihood), token-weighted over windows of max_length
    (torchmetrics' Perplexity; NaN when the text has fewer than 2 tokens)."""
    return pooled_perplexity([perplexity_state(model, tokenizer, text, max_length, device)])
