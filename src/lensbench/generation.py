"""Batched generation with left padding and out-of-memory back-off, and perplexity (torchmetrics)."""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from dataclasses import dataclass

import torch

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
    """Most prompts per generate call; halved and retried on a CUDA out-of-memory error."""
    chat_template: bool | None = None
    """Wrap prompts in the tokenizer's chat template; default: when the tokenizer has one."""
    max_input_length: int = 512
    """Prompts without a picture are truncated to this many tokens (prompts with one never are)."""
    images: str = "auto"
    """Pictures of prompts that have one: auto (shown to a vision-language model; a text-only model
    gets the text alone, recorded as image_used false), always (a text-only model is an error) or
    never (text alone for every model)."""


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


def generate(model, tokenizer, prompts: list[str], settings: GenerationSettings, seed: int | list[int],
             device: torch.device, images: list | None = None, processor=None) -> list[Generated]:
    """Generate for every prompt in chunks of ``max_batch_size``, halving on CUDA OOM.

    ``seed`` seeds every generator before each generate call: one int for all calls, or one per
    prompt (a call is seeded with its first prompt's), so that with ``max_batch_size: 1`` every
    prompt's sample depends only on its own seed, however the run was batched, sharded or resumed.
    Each result carries the seed its call really used (``Generated.seed``).

    Each out-of-memory back-off is logged at INFO on the console logger (``lightning.pytorch.lensbench``),
    each call at INFO in the run log only (``lensbench.run``: its batch size and, on CUDA, the
    memory allocated).

    ``images`` gives each prompt a picture (a PIL image) or None; pictures go through ``processor``
    (a vision-language model's), and a chunk holds consecutive prompts showing the same picture.
    """
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
    images = list(images) if images is not None else [None] * len(prompts)
    if any(img is not None for img in images) and processor is None:
        raise ValueError("prompts with pictures need the model's processor")
    size = max(1, settings.max_batch_size)
    out: list[Generated] = []
    start = 0
    while start < len(prompts):
        end = start + 1
        while end < len(prompts) and end - start < size and images[end] is images[start]:
            end += 1
        try:
            chunk = _generate_chunk(model, tokenizer, prompts[start:end], settings, seeds[start], device,
                                    processor, images[start])
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            torch.cuda.empty_cache()
            log.info(f"lensbench: batch size {size} -> {max(1, size // 2)} after CUDA out-of-memory "
                     f"({end - start} prompts in the failed call)")
            size = max(1, size // 2)
            continue
        run_log.info(f"generated {end - start} prompts (batch size {size}) in {chunk[0].duration:.2f} s"
                     f"{_cuda_memory(device)}")
        out += chunk
        start = end
    return out


def _cuda_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    gib = 2**30
    return (f", {torch.cuda.memory_allocated(device) / gib:.2f} GiB allocated "
            f"(peak {torch.cuda.max_memory_allocated(device) / gib:.2f} GiB)")


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


def _generate_chunk(model, tokenizer, prompts, settings, seed, device, processor=None, image=None) -> list[Generated]:
    batch = _encode(tokenizer, processor, prompts, image, settings, device, next(model.parameters()).dtype)
    set_all_seeds(seed)
    kwargs = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample,
              "pad_token_id": tokenizer.pad_token_id}
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    begin = time.perf_counter()
    with torch.inference_mode():
        sequences = model.generate(**batch, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    duration = time.perf_counter() - begin
    new = sequences[:, batch["input_ids"].shape[1] :].cpu()
    eos = _eos_ids(model, tokenizer)
    results = []
    for row in new.tolist():
        n = len(row)
        for i, token in enumerate(row):
            if token in eos:
                n = i + 1
                break
        results.append(Generated(tokenizer.decode(row[:n], skip_special_tokens=True), n, duration, len(prompts), seed))
    return results


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
