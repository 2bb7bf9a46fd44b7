"""Pictures for vision-language models: loading with the processor, prompt files naming pictures,
and generation that feeds the picture through the processor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lensbench.data.images import load_image
from lensbench.data.modules import PromptDataModule
from lensbench.errors import LensbenchError
from lensbench.generation import GenerationSettings, _encode, generate
from lensbench.models.loading import ModelSpec, load_model, takes_images

KITCHEN = Path(__file__).resolve().parents[1] / "src" / "lensbench" / "data" / "prompts" / "kitchen_scene.png"
PROMPTS = ["tell me everything you see in this picture", "describe the picture", "the sun and the moon"]
GREEDY = GenerationSettings(max_new_tokens=6, do_sample=False, max_batch_size=8)
CPU = torch.device("cpu")


# The two architectures: Llava (CLIP tower, 2x2 patches -> 4 image tokens) and Gemma 3 (that of
# gemma-3-4b-it: SigLIP tower pooled to mm_tokens_per_image = 4 image tokens).
KINDS = {"llava": ("LlavaForConditionalGeneration", "LlavaProcessor"),
         "gemma3": ("Gemma3ForConditionalGeneration", "Gemma3Processor")}


@pytest.fixture(scope="module")
def vlms(tmp_path_factory, tiny_llava):
    from tiny import save_tiny_gemma3

    gemma3 = save_tiny_gemma3(tmp_path_factory.mktemp("models") / "tiny_gemma3")
    return {"llava": load_model(ModelSpec(str(tiny_llava)), padding_side="left"),
            "gemma3": load_model(ModelSpec(str(gemma3)), padding_side="left")}


@pytest.fixture(scope="module")
def llava(vlms):
    return vlms["llava"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_vision_language_model_loads_with_its_processor(vlms, kind, tiny_model):
    vlm = vlms[kind]
    assert (type(vlm.model).__name__, type(vlm.processor).__name__) == KINDS[kind]
    assert vlm.tokenizer is vlm.processor.tokenizer
    assert takes_images(vlm.spec) and not takes_images(ModelSpec(str(tiny_model)))
    # The anatomy is the language model's: groups perturb the text layers, not the vision tower.
    assert vlm.anatomy.block_names == ["model.language_model.layers.0", "model.language_model.layers.1"]


def test_a_text_only_model_has_no_processor(tiny_model):
    assert load_model(ModelSpec(str(tiny_model))).processor is None


@pytest.mark.parametrize("kind", KINDS)
def test_the_picture_reaches_the_model_as_its_pixels_and_image_tokens(vlms, kind, monkeypatch):
    vlm = vlms[kind]
    kitchen = load_image(str(KITCHEN))
    calls = []
    real = vlm.model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(vlm.model, "generate", spy)
    results = generate(vlm.model, vlm.tokenizer, PROMPTS, GREEDY, 0, CPU, images=[kitchen, kitchen, None],
                       processor=vlm.processor)
    assert len(calls) == 2  # the two prompts with the picture together, the text prompt alone
    assert [r.batch_size for r in results] == [2, 2, 1]
    expected = vlm.processor.image_processor(kitchen, return_tensors="pt")["pixel_values"]
    assert calls[0]["pixel_values"].shape == (2, 3, 28, 28)
    assert torch.equal(calls[0]["pixel_values"][0], expected[0]) and torch.equal(calls[0]["pixel_values"][1], expected[0])
    image_id = vlm.model.config.image_token_id
    assert (calls[0]["input_ids"] == image_id).sum(dim=1).tolist() == [4, 4]
    assert "pixel_values" not in calls[1] and not (calls[1]["input_ids"] == image_id).any()


@pytest.mark.parametrize("kind", KINDS)
def test_generation_with_a_picture_matches_transformers_and_depends_on_the_picture(vlms, kind):
    vlm = vlms[kind]
    kitchen, black = load_image(str(KITCHEN)), Image.new("RGB", (64, 48))
    ours = generate(vlm.model, vlm.tokenizer, PROMPTS, GREEDY, 0, CPU, images=[kitchen] * 3, processor=vlm.processor)
    proc = vlm.processor
    for prompt, result in zip(PROMPTS, ours):  # one prompt at a time, straight through transformers
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = proc.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        batch = proc(text=[text], images=[[kitchen]], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            seq = vlm.model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
        new = seq[0, batch["input_ids"].shape[1]:].tolist()
        new = new[: new.index(2) + 1] if 2 in new else new
        assert (result.output, result.tokens) == (proc.tokenizer.decode(new, skip_special_tokens=True), len(new))
    # What the model is given depends on the picture: its next-token logits differ.
    logits = []
    for picture in (kitchen, black):
        batch = _encode(vlm.tokenizer, proc, PROMPTS, picture, GREEDY, CPU, torch.float32)
        with torch.no_grad():
            logits.append(vlm.model(**batch).logits[:, -1])
    assert (logits[0] - logits[1]).abs().max() > 1e-4


def test_pictures_without_a_processor_are_refused(llava):
    with pytest.raises(ValueError, match="processor"):
        generate(llava.model, llava.tokenizer, PROMPTS[:1], GREEDY, 0, CPU, images=[load_image(str(KITCHEN))])


# -- prompt files naming pictures ------------------------------------------------------------------

def digests(data: PromptDataModule) -> list[str]:
    return [unit.digest for unit in data.units()]


def test_the_shipped_picture_prompts_show_the_kitchen_scene():
    from lensbench.data.images import file_sha256

    data = PromptDataModule(["cookie_theft"])
    assert len(data.prompts) == 20 and {p.image for p in data.prompts} == {str(KITCHEN.resolve())}
    assert [p.prompt_id for p in data.prompts] == list(range(1, 21))  # 1-based, as in the seed's records
    # The picture's content (not its location) is part of each prompt's identity.
    assert data.image_hashes == {str(KITCHEN.resolve()): file_sha256(str(KITCHEN))}
    assert PromptDataModule(["dreams"]).image_hashes == {}
    assert all(d is not None for d in digests(data)) and len(set(digests(data))) == 20


def test_a_prompt_file_names_pictures_relative_to_itself(tmp_path, monkeypatch):
    (tmp_path / "pics").mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "pics" / "red.png")
    Image.new("RGB", (8, 8), (10, 10, 200)).save(tmp_path / "blue.png")
    (tmp_path / "p.jsonl").write_text('{"text": "one", "image": "pics/red.png"}\n{"text": "two"}\n')
    monkeypatch.chdir(tmp_path)
    plain = PromptDataModule(["p.jsonl"])
    assert [p.image for p in plain.prompts] == [str((tmp_path / "pics" / "red.png").resolve()), None]
    shared = PromptDataModule(["p.jsonl"], image="blue.png")  # for prompts that name none
    assert [Path(p.image).name for p in shared.prompts] == ["red.png", "blue.png"]
    # The shared picture changes the second prompt's identity only.
    assert digests(shared)[0] == digests(plain)[0] and digests(shared)[1] != digests(plain)[1]


@pytest.mark.parametrize("line, field, words", [
    ('{"text": "one", "image": "missing.png"}', "data.init_args.prompts[0]", "does not exist"),
    ('{"text": "one", "image": "notes.png"}', "data.init_args.prompts", "is not a readable picture"),
    ('{"text": "one", "image": ""}', "data.init_args.prompts[0]", "must be a file name"),
])
def test_a_bad_picture_is_one_clear_error(tmp_path, monkeypatch, line, field, words):
    (tmp_path / "notes.png").write_text("not a picture")
    (tmp_path / "p.jsonl").write_text(line + "\n")
    monkeypatch.chdir(tmp_path)
    load_image.cache_clear()
    with pytest.raises(LensbenchError) as err:
        PromptDataModule(["p.jsonl"])
    assert err.value.field == field and words in str(err.value)


def test_a_missing_shared_picture_names_the_image_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LensbenchError) as err:
        PromptDataModule(["dreams"], image="nowhere.png")
    assert err.value.field == "data.init_args.image"
