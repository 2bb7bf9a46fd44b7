"""Helpers for testing lensbench plugins (and lensbench itself), in the spirit of pytest's ``pytester``.

- ``use_plugins(*plugins)``: a fresh plugin manager and registries holding the built-ins and the
  given plugin modules (installed plugins only with ``load_installed=True``), made the active ones
  inside the block, so analyses, configs and ``lensbench.cli.main([...])`` see them;
- ``apply_transform(folder, name, seed=..., **params)``: a saved model with one registered
  transform applied exactly as a run applies it;
- tiny random models built from configs in milliseconds, no hub: ``save_tiny_llama``,
  ``save_tiny_llava``, ``save_tiny_gemma3``; ``tiny_tokenizer``; ``write_texts``;
- ``char_tokenizer``/``save_char_tokenizer``: one token per printable character (for synthetic
  memorization data, whose answer masks are defined on characters).

The helpers import what they need; ``import lensbench`` itself registers the memory model with
transformers' Auto classes.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import pluggy
    from transformers import PreTrainedTokenizerFast

    from .models.loading import LoadedModel
    from .registry import Registries

__all__ = [
    "GEMMA3_TEMPLATE",
    "LLAVA_TEMPLATE",
    "WORDS",
    "apply_transform",
    "char_tokenizer",
    "plugin_manager",
    "registries_for",
    "save_char_tokenizer",
    "save_tiny_gemma3",
    "save_tiny_llama",
    "save_tiny_llava",
    "tiny_tokenizer",
    "use_plugins",
    "write_texts",
]

# -- plugins ------------------------------------------------------------------------------------------


def plugin_manager(*plugins: Any, load_installed: bool = False) -> pluggy.PluginManager:
    """A fresh plugin manager: the built-ins, the installed plugins if ``load_installed`` (their
    usual environment switches apply), then ``plugins`` (modules, importable module names, or any
    object with ``@hookimpl`` functions), each registered under its module name.

    A plugin already loaded from its installed entry point is not registered a second time.
    """
    from .errors import LensbenchError
    from .plugins import get_plugin_manager

    pm = get_plugin_manager(load_installed=load_installed)
    for i, plugin in enumerate(plugins):
        if isinstance(plugin, str):
            plugin = importlib.import_module(plugin)
        if pm.is_registered(plugin):
            continue
        name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{id(plugin)}"
        if pm.has_plugin(name):
            raise LensbenchError(f"another plugin is already registered as {name!r}; give each plugin module "
                                 f"its own name", f"plugins[{i}]")
        pm.register(plugin, name=name)
    return pm


def registries_for(*plugins: Any, load_installed: bool = False) -> Registries:
    """The registries of ``plugin_manager(*plugins, load_installed=...)`` (not made active)."""
    from .plugins import build_registries

    return build_registries(plugin_manager(*plugins, load_installed=load_installed))


@contextlib.contextmanager
def use_plugins(*plugins: Any, load_installed: bool = False) -> Iterator[Registries]:
    """Inside the block, ``registries_for(*plugins, load_installed=...)`` are the active registries."""
    from .plugins import use_registries

    with use_registries(registries_for(*plugins, load_installed=load_installed)) as registries:
        yield registries


def apply_transform(folder: str | Path, name: str, seed: int = 0, device: str = "cpu", **params: Any) -> LoadedModel:
    """The model saved in ``folder`` with the registered transform ``name`` applied as a run applies
    it: constructed with ``**params`` (a perturbation takes ``level`` and ``group``), validated, given a
    fresh generator seeded ``seed`` on the device of its first touched parameter. The transform is
    looked up in the active registries (``use_plugins``)."""
    import torch

    from .models.loading import ModelSpec
    from .plugins import active_registries
    from .state import State, SubjectManager, TransformSpec

    manager = SubjectManager({"subject": ModelSpec(str(folder))}, torch.device(device), active_registries().perturbations)
    return manager.activate(State("subject", (TransformSpec(name, tuple(sorted(params.items())), seed),)))


# -- tiny models and texts ------------------------------------------------------------------------------

WORDS = ("the a of and to in is was on for with as by at it from this that be are "
         "paris france capital water tardigrade moss cell protein sun moon sea train").split()


def tiny_tokenizer(extra: tuple[str, ...] = (), **special: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``WORDS`` (plus ``extra`` and the ``special`` tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in (*special.values(), *WORDS, *extra):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens=special)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character (offsets are character positions), with ``<s>``, ``</s>``
    and ``<pad>``: the tokenizer ``tokenizer: chars`` names in a ``lensbench fit`` config."""
    from .synthetic.tokenizer import char_tokenizer as build

    return build()


def save_char_tokenizer(folder: Path) -> Path:
    """``char_tokenizer()`` saved to ``folder`` (a ``tokenizer:`` of ``lensbench fit``); returns ``folder``."""
    char_tokenizer().save_pretrained(folder)
    return Path(folder)


def save_tiny_llama(folder: Path, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    """A Llama of ``layers`` blocks of width ``hidden`` (MLP width twice that) with a word-level
    tokenizer, saved as safetensors. bitsandbytes' 4-bit CPU kernels need ``hidden`` of 64 or more."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return Path(folder)


def write_texts(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` lines of 3 to 12 random ``WORDS``, one text per line."""
    import random

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(path)


# A chat template in the shape of real vision-language ones: content is a string or a list of
# parts, a picture part becoming the processor's <image> placeholder.
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %} </s> {% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)


def save_tiny_llava(folder: Path, seed: int = 0) -> Path:
    """A Llava vision-language model (1-layer CLIP vision tower on 28x28 pictures, 2x2 patches of 14,
    2-layer width-32 Llama) with its processor and chat template, saved as safetensors."""
    import torch
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = tiny_tokenizer(("user", "assistant", ":", "picture", "describe", "tell", "me", "see"),
                               image_token="<image>")
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=16)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    images = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                   chat_template=LLAVA_TEMPLATE, image_token="<image>", num_additional_image_tokens=1).save_pretrained(folder)
    return Path(folder)


GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def save_tiny_gemma3(folder: Path, seed: int = 0) -> Path:
    """A Gemma 3 vision-language model (the architecture of gemma-3-4b-it: a 1-layer SigLIP tower on
    28x28 pictures pooled to 4 image tokens, 2-layer width-32 Gemma 3 text model) with its processor."""
    import torch
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil,
                              Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig)

    tokenizer = tiny_tokenizer(("user", "model", "picture", "describe", "tell", "me", "see"),
                               boi_token="<start_of_image>", eoi_token="<end_of_image>",
                               image_token="<image_soft_token>")
    ids = tokenizer.convert_tokens_to_ids
    text = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                            sliding_window=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=7)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                          image_token_index=ids("<image_soft_token>"))
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # initialised to zeros, which would hide the picture from the text model
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 1.0)
    model.save_pretrained(folder)
    Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 28, "width": 28}), tokenizer=tokenizer,
                    chat_template=GEMMA3_TEMPLATE, image_seq_length=4).save_pretrained(folder)
    return Path(folder)
