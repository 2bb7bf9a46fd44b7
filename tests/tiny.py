"""Tiny random models and text files for tests: built from configs in milliseconds, no hub."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ("the a of and to in is was on for with as by at it from this that be are "
         "paris france capital water tardigrade moss cell protein sun moon sea train").split()


def tiny_tokenizer(extra: tuple[str, ...] = (), **special: str) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in (*special.values(), *WORDS, *extra):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens=special)


def save_tiny_llama(folder: Path, seed: int = 0, layers: int = 2) -> Path:
    """A 2-layer, width-32 Llama with a word-level tokenizer, saved as safetensors."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return Path(folder)


def write_texts(path: Path, n: int, seed: int = 0) -> Path:
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
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

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
